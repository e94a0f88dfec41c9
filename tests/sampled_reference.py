"""Helpers for checking the kernels at long T: an fp64 reference on sampled query rows.

The full T x T reference does not fit at T = 32k; the attention of a few query rows does, and those
rows (block edges, first and last, random) are where a wrong tile or mask shows. With the plan's
start indices the reference computes exactly the pruned attention (tight check); without, the
dense attention (check within the eps bound). Used by tests/gpu, whose W1-like gated inputs come from
helpers.fox_inputs(gate="w1", draw_on="device"); not part of the installed package.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def sample_rows(Tq, n=48, seed=0):
    """Sorted query indices: the first and last rows, block edges and random rows."""
    g = torch.Generator().manual_seed(seed)
    fixed = {0, Tq - 1, min(63, Tq - 1), min(64, Tq - 1), min(127, Tq - 1), min(128, Tq - 1), Tq // 2}
    rand = torch.randint(0, Tq, (n,), generator=g).tolist()
    return torch.tensor(sorted(fixed | set(rand)), dtype=torch.long)


def rows_reference(q, k, v, c, scale, rows, start=None, block_m=None, block_n=None):
    """fp64 (o, lse) for the query rows `rows` only: o (B, Hq, R, D), lse (B, Hq, R).

    With start (B, Hq, Mq) and the tile sizes, only the keys that the plan keeps are used
    (key block j // block_n >= start[row // block_m]), i.e. the exact pruned attention.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rows = rows.to(q.device)
    qr = q[:, :, rows].double()                                            # (B, Hq, R, D)
    kr = k.double().repeat_interleave(Hq // Hkv, dim=1)                    # (B, Hq, Tk, D)
    vr = v.double().repeat_interleave(Hq // Hkv, dim=1)
    pos = rows + (Tk - Tq)                                                 # (R,)
    s = scale * (qr @ kr.transpose(-1, -2))                                # (B, Hq, R, Tk)
    cd = c.double()
    s = s + cd[..., pos][..., :, None] - cd[..., None, :]
    cols = torch.arange(Tk, device=q.device)
    visible = cols[None, :] <= pos[:, None]                                # (R, Tk)
    visible = visible.expand(B, Hq, -1, -1)
    if start is not None:
        first = start.long()[..., rows // block_m] * block_n               # (B, Hq, R)
        visible = visible & (cols >= first[..., None])
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.exp(s - lse[..., None]) @ vr
    return o, lse


def eps_bound(v: Tensor, log_eps: float) -> float:
    """2 eps max_j ||v_j||: how far the pruned output may lie from the dense one."""
    return 2 * math.exp(log_eps) * v.float().norm(dim=-1).amax().item()
