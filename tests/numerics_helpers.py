"""Shared helpers of the numerics tests (tests/test_numerics.py, tests/triton_interpret/test_numerics.py,
tests/gpu/test_gpu_backward.py); their inputs come from helpers.fox_inputs.

Truth is fp64: `reference_grads` computes o, lse and the gradients of FoX attention in fp64, in chunks
of query rows (never a whole T x T matrix), with the exact formulas: P = softmax(s), dP = dO V^T,
Delta_i = sum_j P_ij dP_ij, dS = P (dP - Delta), dq = scale dS K, dk = scale dS^T Q, dv = P^T dO and
dc_t = sum_j dS_tj - sum_i dS_it (both terms). `eager_grads` is eager autograd of the FoX formula in
the inputs' dtype (the FoX model's spelling: q k^T in the dtype, + (c_i - c_j) in fp32, softmax in
fp32, cast to the dtype, @ v), also row-chunked; its error against fp64 is the yardstick.
"""
from __future__ import annotations

import math

import torch


def gate_options(kind, H):
    """helpers.fox_inputs options of the numerics tests' log gates: "uniform2" U(-2, 0); "mixed" 3/4 of the
    heads W1's local decay -(30/1024) U(0.5, 1.5), the rest -1e-6 U(0.5, 1.5) (global)."""
    if kind == "uniform2":
        return dict(gate="uniform", strength=2.0, log_f=True)
    return dict(gate="w1", n_global=max(1, H // 4), log_f=True)


def reverse_cumsum(x):
    return x.flip(-1).cumsum(-1).flip(-1)


def reference_grads(q, k, v, c, do, sm_scale=None, chunk=512):
    """fp64 (o, lse, dq, dk, dv, dc) of causal FoX attention; q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q64, do64, c64 = q.double(), do.double(), c.double()
    k64 = k.double().repeat_interleave(g, dim=1)
    v64 = v.double().repeat_interleave(g, dim=1)
    o = torch.empty(B, Hq, Tq, D, dtype=torch.float64)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float64)
    dq = torch.empty_like(o)
    dk = torch.zeros(B, Hq, Tk, D, dtype=torch.float64)
    dv = torch.zeros_like(dk)
    dc = torch.zeros(B, Hq, Tk, dtype=torch.float64)
    o, lse, dq, dk, dv, dc = (t.to(q.device) for t in (o, lse, dq, dk, dv, dc))
    keys = torch.arange(Tk, device=q.device)
    for r0 in range(0, Tq, chunk):
        r1 = min(Tq, r0 + chunk)
        pos = torch.arange(r0, r1, device=q.device) + (Tk - Tq)
        s = scale * (q64[:, :, r0:r1] @ k64.transpose(-1, -2)) + (c64[..., pos][..., :, None] - c64[..., None, :])
        s = s.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
        lse[:, :, r0:r1] = torch.logsumexp(s, dim=-1)
        p = torch.softmax(s, dim=-1)
        del s
        o[:, :, r0:r1] = p @ v64
        dp = do64[:, :, r0:r1] @ v64.transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        dq[:, :, r0:r1] = scale * ds @ k64
        dk += scale * ds.transpose(-1, -2) @ q64[:, :, r0:r1]
        dv += p.transpose(-1, -2) @ do64[:, :, r0:r1]
        dc -= ds.sum(-2)
        dc[..., pos] += ds.sum(-1)
    dk = dk.view(B, Hkv, g, Tk, D).sum(2)
    dv = dv.view(B, Hkv, g, Tk, D).sum(2)
    return o, lse, dq, dk, dv, dc


def eager_grads(q, k, v, log_f, do, sm_scale=None, chunk=1024):
    """Eager autograd of the FoX formula in q's dtype (row-chunked); returns (dq, dk, dv, dlog_f) in fp64.
    q, k, v (B, H, T, D) with Hq == Hkv, log_f (B, H, T) fp32."""
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    dq = torch.empty(B, H, T, D, dtype=torch.float64)
    dk = torch.zeros(B, H, T, D, dtype=torch.float64)
    dv = torch.zeros_like(dk)
    dlf = torch.zeros(B, H, T, dtype=torch.float64)
    dq, dk, dv, dlf = (t.to(q.device) for t in (dq, dk, dv, dlf))
    keys = torch.arange(T, device=q.device)
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        ql = q[:, :, r0:r1].detach().clone().requires_grad_()
        kl, vl, lfl = (t.detach().clone().requires_grad_() for t in (k, v, log_f))
        c = torch.cumsum(lfl, dim=-1)
        s = (ql @ kl.transpose(-1, -2)) * scale
        s = s.to(c.dtype) + (c[..., r0:r1, None] - c[..., None, :])
        s = s.masked_fill(keys[None, :] > torch.arange(r0, r1, device=q.device)[:, None], float("-inf"))
        o = torch.softmax(s, dim=-1).to(v.dtype) @ vl
        o.backward(do[:, :, r0:r1].to(o.dtype))
        dq[:, :, r0:r1] = ql.grad.double()
        dk += kl.grad.double()
        dv += vl.grad.double()
        dlf += lfl.grad.double()
    return dq, dk, dv, dlf


def op_grads(q, k, v, log_f, do, **kw):
    """(dq, dk, dv, dlog_f) in fp64 of acp_compile.fox_attention."""
    import acp_compile

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, log_f)]
    o = acp_compile.fox_attention(*leaves, **kw)
    o.backward(do.to(o.dtype))
    return tuple(t.grad.double() for t in leaves)


def rel_err(x, ref):
    return (x.double() - ref).norm().item() / max(ref.norm().item(), 1e-300)
