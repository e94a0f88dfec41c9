"""Triton decode kernels: FoX attention for a few new query tokens against a long KV cache, with ACP.

  decode(q, k, v, c, sm_scale, delta, splits=None) -> (o, lse)

Notation (one batch element b, kv head hk, its G = Hq / Hkv query heads):
  q (B, Hq, Tq, D) with Tq <= MAX_QUERIES of kernels/short_queries.py (one token, or a speculative block
  being verified);
  k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv): the cache; query token t sits at position p_t = Tk - Tq + t.
  c (B, Hq, Tk) fp32, c_t = cumsum(log f) (the query side reads c at p_t).
  rows r = g * Tq + t of one program: all G heads times all Tq tokens of the kv group, so that k and v
  are read once per kv head, not once per query head (GQA), and the dot has R = G * Tq rows.
  s_rj = scale q_r . k_j + c[h_r, p_r] - c[h_r, j]  for j <= p_r (causal), else -inf.
  delta (B, Hq, Tq) fp32 nats: the ACP threshold of each row (-inf: dense). A key block is skipped for
  the program when every row's largest decay over the block, c[h_r, p_r] - min_j c[h_r, j], is below
  its delta: every skipped entry then has s_rj <= U_r + delta_r (the caller's delta uses a bound U_r
  >= scale |q_r . k_j|), and the row's own key (decay 0, never skipped) gives a denominator of at least
  exp(-U_r), so the dropped mass of each row is at most Tk * exp(2 U_r + delta_r) = eps.

Grid (B * Hkv, S): program (bhk, s) walks the key blocks of split s (flash-decoding: the keys are
divided among S programs per kv head so the GPU is busy whichever heads are global), newest first,
down to the oldest kept block of the split (found in a first pass over c alone; the walk itself has no
branch, so its loads pipeline), and writes its partial row maximum M, sum L (exp of s - M) and
accumulator ACC (unnormalised) to a workspace; fox_decode_combine_kernel then merges the S partials of each row. Splits with no kept
block write M = -inf, L = 0, ACC = 0. Offsets: batch and head offsets are int64.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from acp_compile.kernels.fox_triton.common import LOG2E, LN2
from acp_compile.kernels.fox_triton.configs import padded_head_dim

BLOCK_N = 64
BLOCKS_PER_SPLIT = 16         # key blocks one program walks at most (default_splits)
MAX_SPLITS = 1024
SPLIT_WARPS = 4               # warps of the split kernels (bench_decode.py --warps compares)


@triton.jit
def block_kept(c_q, c_k, vis, delta, row_ok, PRUNE: tl.constexpr):
    """Scalar: the key block must be computed. With PRUNE, it is skipped only when its largest decay over
    the visible keys is below delta for every real row (a NaN decay keeps it, so NaN spreads as in eager)."""
    if PRUNE:
        decay = tl.max(tl.where(vis, c_q[:, None] - c_k, float("-inf")), axis=1)        # (R,)
        below = (decay < delta) | (row_ok == 0)
        keep = tl.min(below.to(tl.int32), axis=0) == 0
    else:
        keep = True
    return keep


@triton.jit
def attend_keys(q, k, v, c_q, c_k, vis, m_i, l_i, acc, qk_scale):
    """One key block into the running (m_i, l_i, acc) of the rows (online softmax, log2 units)."""
    qk = tl.dot(q, tl.trans(k))                                           # (R, N)
    s = qk * qk_scale + (c_q[:, None] - c_k) * LOG2E
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                # rows with nothing visible yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def fox_decode_split_kernel(
    Q, K, V, C, DELTA, M_OUT, L_OUT, ACC,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sc_b, sc_h, sc_t,
    Hkv, Tq, Tk, S, keys_per_split, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRUNE: tl.constexpr,
):
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)                                           # (R,) rows g * Tq + t
    row_ok = offs_r < GROUP * Tq
    g = offs_r // Tq
    t = offs_r % Tq
    h = hk * GROUP + g                                                       # (R,) query head of each row
    pos = Tk - Tq + t                                                        # (R,) position of each row
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)            # (R, D_PAD)
    Cb = C + b * sc_b + h * sc_h                                             # (R,) row pointers into c
    c_q = tl.load(Cb + pos * sc_t, mask=row_ok, other=0.0).to(tl.float32)    # (R,)
    row_idx = ((b * Hkv + hk) * GROUP + g) * Tq + t                          # (R,) flat (b, h, t)
    if PRUNE:
        delta = tl.load(DELTA + row_idx, mask=row_ok, other=float("-inf"))   # (R,) nats
    else:
        delta = tl.zeros((BLOCK_R,), tl.float32)                             # not read
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, DV_PAD), tl.float32)
    k_lo = split * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, Tk)
    n_blocks = tl.cdiv(k_hi - k_lo, BLOCK_N)
    Kb = K + b * sk_b + hk * sk_h
    Vb = V + b * sv_b + hk * sv_h
    # Pass 1 (PRUNE): c alone, to find the oldest kept block; pass 2 walks every block from the newest down
    # to it without a branch, so the loads of k and v are pipelined as in the dense kernel. The blocks
    # pass 2 computes are a superset of the kept ones (a skippable block between two kept ones is
    # computed too), which only lowers the dropped mass.
    n_run = n_blocks
    if PRUNE:
        n_run = 0
        for i in range(0, n_blocks):
            offs_n = k_hi - (i + 1) * BLOCK_N + tl.arange(0, BLOCK_N)
            vis = row_ok[:, None] & (offs_n >= k_lo)[None, :] & (offs_n[None, :] <= pos[:, None])
            c_k = tl.load(Cb[:, None] + offs_n[None, :] * sc_t, mask=vis, other=0.0).to(tl.float32)
            n_run = tl.where(block_kept(c_q, c_k, vis, delta, row_ok, PRUNE), i + 1, n_run)
    for i in range(0, n_run):
        n0 = k_hi - (i + 1) * BLOCK_N                                        # newest block first
        offs_n = n0 + tl.arange(0, BLOCK_N)                                  # (BN,) key positions
        key_ok = (offs_n >= k_lo) & (offs_n < k_hi)
        vis = row_ok[:, None] & key_ok[None, :] & (offs_n[None, :] <= pos[:, None])   # (R, BN)
        c_k = tl.load(Cb[:, None] + offs_n[None, :] * sc_t, mask=vis, other=0.0).to(tl.float32)
        k = tl.load(Kb + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d,
                    mask=key_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)       # (BN, D_PAD)
        v = tl.load(Vb + offs_n[:, None] * sv_t + offs_dv[None, :] * sv_d,
                    mask=key_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
        m_i, l_i, acc = attend_keys(q, k, v, c_q, c_k, vis, m_i, l_i, acc, qk_scale)
    out = row_idx * S + split
    tl.store(M_OUT + out, m_i, mask=row_ok)                                  # log2 units
    tl.store(L_OUT + out, l_i, mask=row_ok)
    tl.store(ACC + out[:, None] * DV_PAD + offs_dv[None, :], acc, mask=row_ok[:, None])


@triton.jit
def fox_decode_combine_kernel(
    M_IN, L_IN, ACC, O, LSE,
    so_b, so_h, so_t, so_d,
    Hq, Tq, S,
    HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, S_PAD: tl.constexpr, S_CHUNK: tl.constexpr,
):
    """One program per row (b, h, t): o = sum_s 2^(M_s - M) ACC_s / sum_s 2^(M_s - M) L_s, over the S
    partials in chunks of S_CHUNK (the accumulators of all splits need not fit in registers at once)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // (Hq * Tq)
    h = (row // Tq) % Hq
    t = row % Tq
    offs_s = tl.arange(0, S_PAD)
    m_all = tl.load(M_IN + row * S + offs_s, mask=offs_s < S, other=float("-inf"))
    m_max = tl.max(m_all, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    offs_dv = tl.arange(0, DV_PAD)
    num = tl.zeros((DV_PAD,), tl.float32)
    den = tl.zeros((S_CHUNK,), tl.float32)
    for s0 in range(0, S, S_CHUNK):
        offs_c = s0 + tl.arange(0, S_CHUNK)
        ok = offs_c < S
        m = tl.load(M_IN + row * S + offs_c, mask=ok, other=float("-inf"))
        w = tl.math.exp2(m - m_safe)                                          # (S_CHUNK,)
        den += tl.load(L_IN + row * S + offs_c, mask=ok, other=0.0) * w
        acc = tl.load(ACC + (row * S + offs_c)[:, None] * DV_PAD + offs_dv[None, :], mask=ok[:, None], other=0.0)
        num += tl.sum(acc * w[:, None], axis=0)
    total = tl.sum(den, axis=0)
    tl.store(O + b * so_b + h * so_h + t * so_t + offs_dv * so_d, (num / total).to(O.dtype.element_ty),
             mask=offs_dv < HEAD_DIM_V)
    tl.store(LSE + row, (m_safe + tl.math.log2(total)) * LN2)


def default_splits(B: int, Hkv: int, Tk: int, device: torch.device) -> int:
    """Splits of the keys per kv head: enough programs to fill the GPU (about four per SM over the grid)
    and at most about BLOCKS_PER_SPLIT key blocks per program, so that when pruning leaves only a few
    heads' work (the global ones) it is still spread over many programs instead of walking long splits
    one block after the other."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    blocks = triton.cdiv(Tk, BLOCK_N)
    fill = triton.cdiv(4 * sms, max(1, B * Hkv))
    short = triton.cdiv(blocks, BLOCKS_PER_SPLIT)
    return int(max(1, min(max(fill, short), blocks, MAX_SPLITS)))


def decode(q, k, v, c, sm_scale: float, delta=None, splits: int | None = None, out=None):
    """(o (B, Hq, Tq, Dv) in q's dtype, lse (B, Hq, Tq) fp32 natural log). delta (B, Hq, Tq) fp32 nats or
    None (dense). out: o's storage (any strides), or None for a new contiguous tensor. Shapes are the
    caller's to check (acp_compile/generation.py, kernels/short_queries.py)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    S = splits or default_splits(B, Hkv, Tk, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(Tk, S), BLOCK_N) * BLOCK_N
    S = triton.cdiv(Tk, keys_per_split)
    dv_pad = padded_head_dim(Dv)
    f32 = dict(device=q.device, dtype=torch.float32)
    m_part = torch.empty((B, Hq, Tq, S), **f32)
    l_part = torch.empty((B, Hq, Tq, S), **f32)
    acc = torch.empty((B, Hq, Tq, S, dv_pad), **f32)
    prune = delta is not None
    if prune:
        delta = delta.to(torch.float32).expand(B, Hq, Tq).contiguous()
    block_r = max(16, triton.next_power_of_2(G * Tq))
    fox_decode_split_kernel[(B * Hkv, S)](
        q, k, v, c, delta if prune else m_part, m_part, l_part, acc,
        *q.stride(), *k.stride(), *v.stride(), *c.stride(),
        Hkv, Tq, Tk, S, keys_per_split, sm_scale * math.log2(math.e),
        GROUP=G, HEAD_DIM=D, D_PAD=padded_head_dim(D), HEAD_DIM_V=Dv, DV_PAD=dv_pad,
        BLOCK_R=block_r, BLOCK_N=BLOCK_N, PRUNE=prune, num_warps=SPLIT_WARPS, num_stages=2,
    )
    o = torch.empty((B, Hq, Tq, Dv), device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty((B, Hq, Tq), **f32)
    fox_decode_combine_kernel[(B * Hq * Tq,)](
        m_part, l_part, acc, o, lse, *o.stride(), Hq, Tq, S,
        HEAD_DIM_V=Dv, DV_PAD=dv_pad, S_PAD=max(2, triton.next_power_of_2(S)),
        S_CHUNK=min(16, max(2, triton.next_power_of_2(S))),
    )
    return o, lse
