"""Blocked PyTorch forward with the online certificate (kernels/certificate.py, DESIGN.md 1.1).

Notation as in blocked.py (off = Tk - Tq, query block m has rows [r0, r1), k1 = off + r1), plus:
  n0 = (off + r0) // BN, d0 = n0 * BN: keys [d0, k1) are the diagonal segment, visited first (the
     causal mask touches only its last BMa columns); key blocks n0 - 1, ..., 0 are full (every row of
     the block sees every key), visited one at a time, newest first.
  lse_vis (G, BMa): log of each row's visited mass, G = B * Hq heads in one batch of matmuls.
  At boundary n (keys [n*BN, k1) visited) a head stops when certificate.stops holds for all its rows;
  start[b, h, m] = that n, or 0 when it never stops (then every key was visited).
After the loop, one softmax over keys [n_min*BN, k1) (n_min = the lowest block any head visited); a
head that stopped at start > n_min gets -inf on columns below start*BN, so each head's output is
exactly the attention over its kept keys [start*BN, k1). o = P V, lse = logsumexp.

Host reads: one per visited full key block (whether every head has stopped). This path is the CPU
implementation and the CUDA fallback; the Triton forward decides on the device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from acp_compile.kernels.blocked import _Block, _compute_dtype, _Heads, _matmul_heads, _scores
from acp_compile.kernels.certificate import CertStats, log_unvisited_bound, stops


def forward(q: Tensor, k: Tensor, v: Tensor, c: Tensor, sm_scale: float, log_eps: float, stats: CertStats,
            block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """(o like q, lse (B, Hq, Tq) fp32, start (B, Hq, Mq) int32 in units of stats.block_n keys)."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    off, bn = Tk - Tq, stats.block_n
    dt = _compute_dtype(q)
    heads = _Heads("all", flat_q=slice(None), flat_kv=slice(None))
    a = stats.a.flatten(0, 1).to(dt)                                       # (G, Tq)
    a_hi = stats.a_hi.flatten().to(dt)                                     # (G,)
    cmin, phi = stats.cmin.flatten(0, 1).to(dt), stats.phi.flatten(0, 1).to(dt)   # (G, Nk)
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    Mq = -(-Tq // block_m)
    start = torch.zeros((B * Hq, Mq), dtype=torch.int32, device=q.device)
    for m in range(Mq):
        r0, r1 = m * block_m, min((m + 1) * block_m, Tq)
        k1 = off + r1
        n = (off + r0) // bn
        q_blk, _, s_diag = _scores(_Block(r0, r1, n * bn, k1, heads), q, k, c, sm_scale, dt)   # (G, BMa, L0)
        c_rows = heads.q_rows(c, off + r0, off + r1, dt)                   # (G, BMa)
        a_rows = a[:, r0:r1]

        def bound(n_: int) -> Tensor:
            return log_unvisited_bound(n_, a_rows, c_rows, a_hi, cmin, phi, bn)

        lse_vis = torch.logsumexp(s_diag, dim=-1)                          # (G, BMa)
        stopped = stops(bound(n), lse_vis, log_eps)                        # (G,)
        st = torch.where(stopped, n, 0)
        pieces = [s_diag]
        while n > 0 and not bool(stopped.all()):
            n -= 1
            k_blk = heads.kv_rows(k, n * bn, (n + 1) * bn, dt)            # (Gk, BN, D)
            c_cols = heads.q_rows(c, n * bn, (n + 1) * bn, dt)            # (G, BN)
            bias = (c_rows[:, :, None] - c_cols[:, None, :]).contiguous()
            s_n = _matmul_heads(q_blk, k_blk, transpose_b=True, add_to=bias)   # (G, BMa, BN)
            pieces.append(s_n)
            lse_vis = torch.where(stopped[:, None], lse_vis, torch.logaddexp(lse_vis, torch.logsumexp(s_n, dim=-1)))
            now = ~stopped & stops(bound(n), lse_vis, log_eps)
            st = torch.where(now, n, st)
            stopped = stopped | now
        s = torch.cat(pieces[::-1], dim=-1)                                # (G, BMa, k1 - n*BN)
        cols = torch.arange(n * bn, k1, device=q.device)
        s.masked_fill_(cols[None, None, :] < (st * bn)[:, None, None], float("-inf"))
        row_max = s.amax(dim=-1)
        p = torch.softmax(s, dim=-1)
        heads.write_q_rows(lse, r0, r1, row_max - torch.log(p.amax(dim=-1)))
        v_blk = heads.kv_rows(v, n * bn, k1, dt)
        heads.write_q_rows(o, r0, r1, _matmul_heads(p, v_blk, transpose_b=False))
        start[:, m] = st.to(torch.int32)
    return o, lse, start.view(B, Hq, Mq)
