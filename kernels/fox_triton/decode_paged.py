"""Triton decode against a paged KV cache (acp_compile/cache/): the split kernel of decode.py with a page
table instead of contiguous keys, and a live range per kv head instead of "all Tk keys".

  decode_paged(q, k_pool, v_pool, c_pool, table, first, length, sm_scale, delta=None, splits=None) -> (o, lse)

Notation (batch element b, kv head hk, its G = Hq / Hkv query heads, rows r = g * Tq + t as in decode.py):
  k_pool (n_pages, P, D), v_pool (n_pages, P, Dv): the pool of pages of P keys; c_pool (n_pages, G, P) fp32:
  the cumulative log gate of each key for each query head of the page's kv head.
  table (B, Hkv, L) int64: the physical page holding logical page lp (keys lp*P .. lp*P + P - 1).
  first (B, Hkv) int64: the first live logical page (older pages were evicted: they are never read).
  length () int64 tensor: keys written so far (the same for every batch element); query token t sits at
  position p_t = length - Tq + t. Keys at positions >= length are never read.
  delta (B, Hq, Tq) fp32: the ACP threshold of each row, as in decode.py (-inf: dense).

Grid (B * Hkv, S), static: split s covers logical pages [s * pps, (s + 1) * pps) and walks those that are
live (>= first, <= the page of length - 1), newest first, down to the oldest kept one (two passes, as
decode.py), so the launch depends on the cache's capacity,
never on its current length (CUDA graphs replay it as it is). Partials merge in decode.py's combine kernel.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from acp_compile.kernels.fox_triton.configs import padded_head_dim
from acp_compile.kernels.fox_triton import decode as _decode
from acp_compile.kernels.fox_triton.decode import (
    BLOCKS_PER_SPLIT, MAX_SPLITS, attend_keys, block_kept, fox_decode_combine_kernel,
)


@triton.jit
def fox_decode_paged_split_kernel(
    Q, KP, VP, CP, TABLE, FIRST, LEN, DELTA, M_OUT, L_OUT, ACC,
    sq_b, sq_h, sq_t, sq_d,
    sk_p, sk_t, sk_d,
    sv_p, sv_t, sv_d,
    sc_p, sc_g, sc_t,
    st_b, st_h, st_l,
    Hkv, Tq, S, pages_per_split, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr, BLOCK_R: tl.constexpr, PAGE: tl.constexpr, PRUNE: tl.constexpr,
):
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)                                           # (R,) rows g * Tq + t
    row_ok = offs_r < GROUP * Tq
    g = offs_r // Tq
    t = offs_r % Tq
    h = hk * GROUP + g
    length = tl.load(LEN).to(tl.int64)
    pos = length - Tq + t                                                    # (R,) position of each row
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    offs_p = tl.arange(0, PAGE)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)            # (R, D_PAD)
    Tb = TABLE + b * st_b + hk * st_h
    # c at each row's own position, read through the table (the row's page is live: it is the newest)
    q_page = tl.load(Tb + (pos // PAGE) * st_l, mask=row_ok, other=0).to(tl.int64)          # (R,)
    c_q = tl.load(CP + q_page * sc_p + g * sc_g + (pos % PAGE) * sc_t, mask=row_ok, other=0.0).to(tl.float32)
    row_idx = ((b * Hkv + hk) * GROUP + g) * Tq + t                          # (R,) flat (b, h, t)
    if PRUNE:
        delta = tl.load(DELTA + row_idx, mask=row_ok, other=float("-inf"))
    else:
        delta = tl.zeros((BLOCK_R,), tl.float32)                             # not read
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, DV_PAD), tl.float32)
    first = tl.load(FIRST + b * Hkv + hk).to(tl.int64)
    lo = tl.maximum(split * pages_per_split, first)
    hi = tl.minimum((split + 1) * pages_per_split, (length - 1) // PAGE + 1)   # one past the newest page
    # two passes as in decode.py: c alone down to the oldest kept page, then every page down to it, branch-free
    n_run = hi - lo
    if PRUNE:
        n_run = hi - hi                                                      # 0, of the bounds' type
        for i in range(0, hi - lo):
            lp = hi - 1 - i
            phys = tl.load(Tb + lp * st_l).to(tl.int64)
            vis = row_ok[:, None] & ((lp * PAGE + offs_p)[None, :] <= pos[:, None])
            c_k = tl.load(CP + phys * sc_p + g[:, None] * sc_g + offs_p[None, :] * sc_t, mask=vis,
                          other=0.0).to(tl.float32)
            n_run = tl.where(block_kept(c_q, c_k, vis, delta, row_ok, PRUNE), i + 1, n_run)
    for i in range(0, n_run):
        lp = hi - 1 - i                                                      # newest page first
        phys = tl.load(Tb + lp * st_l).to(tl.int64)
        offs_n = lp * PAGE + offs_p                                          # (P,) key positions
        key_ok = offs_n < length
        vis = row_ok[:, None] & (offs_n[None, :] <= pos[:, None])            # (R, P)
        c_k = tl.load(CP + phys * sc_p + g[:, None] * sc_g + offs_p[None, :] * sc_t, mask=vis,
                      other=0.0).to(tl.float32)
        # slots past `length` are never loaded (a reused page may hold an evicted key's data there)
        k = tl.load(KP + phys * sk_p + offs_p[:, None] * sk_t + offs_d[None, :] * sk_d,
                    mask=key_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)       # (P, D_PAD)
        v = tl.load(VP + phys * sv_p + offs_p[:, None] * sv_t + offs_dv[None, :] * sv_d,
                    mask=key_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
        m_i, l_i, acc = attend_keys(q, k, v, c_q, c_k, vis, m_i, l_i, acc, qk_scale)
    out = row_idx * S + split
    tl.store(M_OUT + out, m_i, mask=row_ok)
    tl.store(L_OUT + out, l_i, mask=row_ok)
    tl.store(ACC + out[:, None] * DV_PAD + offs_dv[None, :], acc, mask=row_ok[:, None])


def default_paged_splits(B: int, Hkv: int, n_logical_pages: int, device: torch.device) -> int:
    """As decode.default_splits, over the capacity's logical pages (static: independent of the length)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    fill = triton.cdiv(4 * sms, max(1, B * Hkv))
    short = triton.cdiv(n_logical_pages, BLOCKS_PER_SPLIT)
    return int(max(1, min(max(fill, short), n_logical_pages, MAX_SPLITS)))


def decode_paged(q, k_pool, v_pool, c_pool, table, first, length, sm_scale: float, delta=None,
                 splits: int | None = None):
    """(o (B, Hq, Tq, Dv) in q's dtype, lse (B, Hq, Tq) fp32). Shapes are the caller's to check
    (acp_compile/cache/paged_decode.py)."""
    B, Hq, Tq, D = q.shape
    Hkv, L = table.shape[1], table.shape[2]
    P, Dv = k_pool.shape[1], v_pool.shape[2]
    G = Hq // Hkv
    S = splits or default_paged_splits(B, Hkv, L, q.device)
    pps = triton.cdiv(L, S)
    S = triton.cdiv(L, pps)
    dv_pad = padded_head_dim(Dv)
    f32 = dict(device=q.device, dtype=torch.float32)
    m_part = torch.empty((B, Hq, Tq, S), **f32)
    l_part = torch.empty((B, Hq, Tq, S), **f32)
    acc = torch.empty((B, Hq, Tq, S, dv_pad), **f32)
    prune = delta is not None
    if prune:
        delta = delta.to(torch.float32).expand(B, Hq, Tq).contiguous()
    fox_decode_paged_split_kernel[(B * Hkv, S)](
        q, k_pool, v_pool, c_pool, table, first, length, delta if prune else m_part, m_part, l_part, acc,
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *c_pool.stride(), *table.stride(),
        Hkv, Tq, S, pps, sm_scale * math.log2(math.e),
        GROUP=G, HEAD_DIM=D, D_PAD=padded_head_dim(D), HEAD_DIM_V=Dv, DV_PAD=dv_pad,
        BLOCK_R=max(16, triton.next_power_of_2(G * Tq)), PAGE=P, PRUNE=prune,
        num_warps=_decode.SPLIT_WARPS, num_stages=2,
    )
    o = torch.empty((B, Hq, Tq, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Tq), **f32)
    fox_decode_combine_kernel[(B * Hq * Tq,)](
        m_part, l_part, acc, o, lse, *o.stride(), Hq, Tq, S,
        HEAD_DIM_V=Dv, DV_PAD=dv_pad, S_PAD=max(2, triton.next_power_of_2(S)),
        S_CHUNK=min(16, max(2, triton.next_power_of_2(S))),
    )
    return o, lse
