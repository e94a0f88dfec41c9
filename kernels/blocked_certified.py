"""Blocked PyTorch forward with the online certificate (kernels/certificate.py, DESIGN.md 1.1).

Notation as in blocked.py (off = Tk - Tq, query block m has rows [r0, r1), k1 = off + r1), plus:
  n0 = (off + r0) // BN, d0 = n0 * BN: keys [d0, k1) are the diagonal segment, visited first (the
     causal mask touches only its last BMa columns); key blocks n0 - 1, ..., 0 are full (every row of
     the block sees every key, up to the segments' masks), visited one at a time, newest first.
  lse_vis (G, BMa): log of each row's visited mass, G = B * Hq heads in one batch of matmuls.
  At boundary n (keys [n*BN, k1) visited) a head stops when certificate.stops holds for all its rows;
  start[b, h, m] = that n, or 0 when it never stops (then every key was visited).
After the loop, one softmax over keys [n_min*BN, k1) (n_min = the lowest block any head visited); a
head that stopped at start > n_min gets -inf on columns below start*BN, so each head's output is
exactly the attention over its kept keys [start*BN, k1). o = P V, lse = logsumexp.
Segments (kernels/segments.py: key mask, packed documents) mask every visited entry as in blocked.py;
a row with no visible key at all (anchor -1) does not take part in the stop test (it outputs 0 and
drops nothing), and a boundary n with n*BN <= lo[p_first] stops unconditionally: every key below it
belongs to an earlier document, invisible to every row of the block (lo never decreases along rows).

Host reads: one per visited full key block (whether every head has stopped). This path is the CPU
implementation and the CUDA fallback; the Triton forward decides on the device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from acp_compile.kernels.blocked import _Block, _compute_dtype, _Heads, _matmul_heads, _scores, _softmax_rows
from acp_compile.kernels.certificate import CertStats, log_unvisited_bound, stops
from acp_compile.kernels.layout import empty_like_last
from acp_compile.kernels.segments import Segments


def forward(q: Tensor, k: Tensor, v: Tensor, c: Tensor, sm_scale: float, log_eps: float, stats: CertStats,
            block_m: int, seg: Segments | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(o (B, Hq, Tq, Dv) in q's layout, lse (B, Hq, Tq) fp32, start (B, Hq, Mq) int32 in units of
    stats.block_n keys)."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    off, bn = Tk - Tq, stats.block_n
    dt = _compute_dtype(q)
    heads = _Heads("all", flat_q=slice(None), flat_kv=slice(None))
    a = stats.a.flatten(0, 1).to(dt)                                       # (G, Tq)
    a_hi = stats.a_hi.flatten().to(dt)                                     # (G,)
    cmin, phi = stats.cmin.flatten(0, 1).to(dt), stats.phi.flatten(0, 1).to(dt)   # (G, Nk)
    o = empty_like_last(q, v.shape[-1])
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    Mq = -(-Tq // block_m)
    start = torch.zeros((B * Hq, Mq), dtype=torch.int32, device=q.device)
    live_all = None if seg is None else heads.batch_rows(seg.anchor, 0, Tq, Hq) >= 0   # (G, Tq)
    for m in range(Mq):
        r0, r1 = m * block_m, min((m + 1) * block_m, Tq)
        k1 = off + r1
        n = (off + r0) // bn
        q_blk, _, s_diag = _scores(_Block(r0, r1, n * bn, k1, heads), q, k, c, sm_scale, dt, seg)  # (G, BMa, L0)
        c_rows = heads.q_rows(c, off + r0, off + r1, dt)                   # (G, BMa)
        a_rows = a[:, r0:r1]
        live = None if seg is None else live_all[:, r0:r1]
        lo_first = None if seg is None else heads.batch_rows(seg.lo, off + r0, off + r0 + 1, Hq)[:, 0]   # (G,)

        def bound(n_: int) -> Tensor:
            b = log_unvisited_bound(n_, a_rows, c_rows, a_hi, cmin, phi, bn)
            if lo_first is not None:                                       # only earlier documents left
                b = b.masked_fill((n_ * bn <= lo_first)[:, None], float("-inf"))
            return b

        lse_vis = torch.logsumexp(s_diag, dim=-1)                          # (G, BMa)
        stopped = stops(bound(n), lse_vis, log_eps, live)                  # (G,)
        st = torch.where(stopped, n, 0)
        pieces = [s_diag]
        while n > 0 and not bool(stopped.all()):
            n -= 1
            k_blk = heads.kv_rows(k, n * bn, (n + 1) * bn, dt)            # (Gk, BN, D)
            c_cols = heads.q_rows(c, n * bn, (n + 1) * bn, dt)            # (G, BN)
            bias = (c_rows[:, :, None] - c_cols[:, None, :]).contiguous()
            s_n = _matmul_heads(q_blk, k_blk, transpose_b=True, add_to=bias)   # (G, BMa, BN)
            if seg is not None:
                key_ok = heads.batch_rows(seg.key_valid, n * bn, (n + 1) * bn, Hq)    # (G, BN)
                lo = heads.batch_rows(seg.lo, off + r0, off + r1, Hq)                  # (G, BMa)
                cols = torch.arange(n * bn, (n + 1) * bn, device=q.device)
                s_n.masked_fill_(~(key_ok[:, None, :] & (cols[None, None, :] >= lo[:, :, None])), float("-inf"))
            pieces.append(s_n)
            lse_vis = torch.where(stopped[:, None], lse_vis, torch.logaddexp(lse_vis, torch.logsumexp(s_n, dim=-1)))
            now = ~stopped & stops(bound(n), lse_vis, log_eps, live)
            st = torch.where(now, n, st)
            stopped = stopped | now
        s = torch.cat(pieces[::-1], dim=-1)                                # (G, BMa, k1 - n*BN)
        cols = torch.arange(n * bn, k1, device=q.device)
        s.masked_fill_(cols[None, None, :] < (st * bn)[:, None, None], float("-inf"))
        p, row_max = _softmax_rows(s, seg)
        row_lse = row_max - torch.log(p.amax(dim=-1))
        if seg is not None:                                               # no visible key: -inf, not NaN
            row_lse = row_lse.masked_fill(row_max == float("-inf"), float("-inf"))
        heads.write_q_rows(lse, r0, r1, row_lse)
        v_blk = heads.kv_rows(v, n * bn, k1, dt)                          # (Gk, L, Dv)
        heads.write_q_rows(o, r0, r1, _matmul_heads(p, v_blk, transpose_b=False))
        start[:, m] = st.to(torch.int32)
    return o, lse, start.view(B, Hq, Mq)
