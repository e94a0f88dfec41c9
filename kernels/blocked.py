"""TEMPORARY dense-masked stand-in for the blocked path (being replaced by the real blocked
implementation that visits only kept tiles). It computes exactly the pruned attention of the plan."""
from __future__ import annotations

import torch

from acp_compile.kernels.plan import Plan, kept_entries
from acp_compile.kernels.reference import logits, repeat_kv

BLOCK_M = 64
BLOCK_N = 64


def forward(q, k, v, c, sm_scale: float, plan: Plan):
    Tq, Tk = q.shape[2], k.shape[2]
    s = logits(q.float(), k.float(), c.float(), sm_scale).float()
    s = s.masked_fill(~kept_entries(plan, Tq, Tk), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    o = torch.empty_like(q)
    o.copy_(p @ repeat_kv(v.float(), q.shape[1]))
    return o, lse


def backward(do, q, k, v, c, o, lse, sm_scale: float, plan: Plan):
    Hq, Hkv = q.shape[1], k.shape[1]
    Tq, Tk = q.shape[2], k.shape[2]
    s = logits(q.float(), k.float(), c.float(), sm_scale).float()
    s = s.masked_fill(~kept_entries(plan, Tq, Tk), float("-inf"))
    p = torch.exp(s - lse[..., None])
    kr, vr = repeat_kv(k.float(), Hq), repeat_kv(v.float(), Hq)
    dof = do.float()
    dv_full = p.transpose(-1, -2) @ dof
    dp = dof @ vr.transpose(-1, -2)
    delta = (dof * o.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq_ = sm_scale * ds @ kr
    dk_full = sm_scale * ds.transpose(-1, -2) @ q.float()
    dc = -ds.sum(-2)
    B, _, _, D = q.shape
    g = Hq // Hkv
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dq.copy_(dq_)
    dk.copy_(dk_full.view(B, Hkv, g, Tk, D).sum(2))
    dv.copy_(dv_full.view(B, Hkv, g, Tk, D).sum(2))
    return dq, dk, dv, dc
