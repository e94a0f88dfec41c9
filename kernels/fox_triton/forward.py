"""Triton forward kernel of FoX attention with ACP tile skipping.

Notation (one program = one query block m of one (batch b, query head h)):
  q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), c (B, Hq, Tk) fp32, o (B, Hq, Tq, Dv),
  lse (B, Hq, Tq) fp32; HEAD_DIM = D padded to D_PAD, HEAD_DIM_V = Dv padded to DV_PAD (the q, k tiles
  are (., D_PAD), the v tile and the o accumulator (., DV_PAD))
  kv head = h // G with G = Hq // Hkv (grouped-query attention without repeating k, v)
  query i sits at position p_i = Tk - Tq + i;  rows of block m: i in [m*BM, (m+1)*BM)
  s_ij = scale q_i.k_j + c[p_i] - c[j]   (j <= p_i)
  Softmax ignores a per-row shift, so the kernel works with the shifted logits, in base 2:
    t_ij = log2(e) * (scale q_i.k_j - (c[j] - c_ref))        c_ref = c[p_first] of the block
  (one fused multiply-add per entry), and adds the row term back to the log-sum-exp at the end:
    lse_i = ln2 * (m_i + log2 l_i) + (c[p_i] - c_ref)
  with m_i the running max of t and l_i = sum_j 2^(t_ij - m_i) (online softmax). Its rounding is
  about (|c_i - c_j| + spread) * 2^-24 per logit, spread = max - min of c over the block's rows; when
  the spread exceeds C_SPAN_LIMIT (configs.py: a hard reset, a steep decay) the program takes the
  exact form instead, t_ij = log2(e) * scale q_i.k_j + log2(e) * (c[p_i] - c[j]) per entry, and
  lse_i = ln2 * (m_i + log2 l_i) (an `if` on a per-program scalar around the two key loops).
  HAS_SEG (padded and packed batches, kernels/segments.py): KV (B, Tk) uint8 key_valid and LO (B, Tk)
  int32 first key of each position's document; every visited tile also masks keys with KV = 0 or
  j < LO[p_i], and a row left with no visible key (l_i = 0) stores o = 0 and lse = -inf. The plan's
  start then already skips the key blocks of earlier documents.
  BAD (B, Hq, Dv) fp32 (0, or NaN in the columns where v of the kv head is non-finite somewhere) is
  added to o, for eager's NaN semantics (kernels/dispatch.py).

Key blocks visited by block m (BN keys each):
  [start[m], n_full)         full tiles (every key j <= p_first): no mask
  [max(start[m], n_full), n_hi]   diagonal tiles: causal mask j <= p_i (and j < Tk)
  n_full = (p_first + 1) // BN, n_hi = p_last // BN; start[m] = 0 without pruning (PRUNE=False
  does not even read the plan). Query blocks run heaviest-first (m reversed) to shorten the tail;
  config.heads_fastest launches the heaviest block of every head before the next-heaviest ones
  (grid (B * Hq, Mq)) instead of all blocks of one head side by side (grid (Mq, Hq, B)).
  config.newest_first visits the same tiles from n_hi back to start[m]: diagonal tiles first, then
  the full tiles from the newest key block back (measured 3-4% faster on the H200, see configs.py).

Online certificate (CERT=True, DESIGN.md 1.1; fox_triton/certificate.py holds the stop test):
  A (B, Hq, Tq) fp32 a_i = scale ||q_i||, AHI (B, Hq) its max, CMIN, PHI (B, Hq, Nk) fp32 prefixes
  (kernels/certificate.py). The program visits the diagonal tiles [n_full, n_hi] newest first, then
  key blocks n_full - 1, n_full - 2, ... while cert_must_visit(n) (a `while` on a per-program
  scalar, which tests after every CERT_CHUNK blocks: configs.cert_chunk), and stores the boundary where it stopped, n, into START (B, Hq, Mq) int32 (an output here;
  an input when PRUNE). The visiting order is newest first whatever config.newest_first says.

Compile-time specialisation: head dims D, Dv and their power-of-two paddings, dtype (through the pointers),
GQA group, pruning on/off (PRUNE: a given plan; CERT: the online certificate), whether Tq divides the block (EVEN_M), whether Tq < Tk (TQ_LT_TK),
tensor descriptors on/off; strides equal to 1 and divisibility by 16 are specialised by Triton. Offsets that can exceed 2^31 (batch, head, row * stride)
are computed in int64. fp32 inputs: tl.dot runs in TF32 (see support.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from acp_compile.kernels.certificate import CertStats, cert_stats, keep_from_rows
from acp_compile.kernels.fox_triton.certificate import cert_must_visit
from acp_compile.kernels.fox_triton.common import LN2, LOG2E
from acp_compile.kernels.fox_triton.configs import FwdConfig, c_span_limit, cert_chunk, forward_config, padded_head_dim
from acp_compile.kernels.fox_triton.plan import compute_plan, num_blocks
from acp_compile.kernels.layout import empty_like_last
from acp_compile.kernels.threshold import pruning_enabled



@triton.jit
def _attend_block(
    acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, n, pos, c_ref, qk_scale2, Tk,
    sk_t, sk_d, sv_t, sv_d, sc_t,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr, EXACT_C: tl.constexpr,
    kv_base, lo_q, HAS_SEG: tl.constexpr,
):
    """One key block n for the BM queries of this program; returns the updated (acc, l_i, m_i).

    k_src/v_src: tensor descriptors of k, v (B, Hkv, Tk, D) when USE_TMA (rows and columns out of
    range read as 0), else pointers to the (b, kv head) slice.
    """
    rn = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    key0 = n * BLOCK_N
    cols = key0 + rn                                                   # (BN,) key index j
    if MASKED:
        ck = tl.load(c_base + cols * sc_t, mask=cols < Tk, other=0.0).to(tl.float32)
    else:
        ck = tl.load(c_base + cols * sc_t).to(tl.float32)
    if USE_TMA:
        k = k_src.load([b, hk, key0, 0]).reshape(BLOCK_N, D_PAD)
    else:
        row0 = key0.to(tl.int64)
        k_ptrs = k_src + row0 * sk_t + rn[:, None] * sk_t + d[None, :] * sk_d
        v_ptrs = v_src + row0 * sv_t + rn[:, None] * sv_t + dv[None, :] * sv_d
        if MASKED:
            kv_mask = (cols[:, None] < Tk) & (d[None, :] < HEAD_DIM)
            v_mask = (cols[:, None] < Tk) & (dv[None, :] < HEAD_DIM_V)
        else:
            kv_mask = d[None, :] < HEAD_DIM                             # all-true when D == D_PAD
            v_mask = dv[None, :] < HEAD_DIM_V
        if HEAD_DIM == D_PAD and not MASKED:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)                 # (BN, D_PAD)
    if EXACT_C:
        # c_ref is the (BM,) vector c[p_i]: c_i - c_j per entry, rounded relative to |c_i - c_j|
        t = tl.dot(q, tl.trans(k)) * qk_scale2 + (c_ref[:, None] - ck[None, :]) * LOG2E
    else:
        ck2 = (ck - c_ref) * LOG2E                          # (BN,) log2 units
        t = tl.dot(q, tl.trans(k)) * qk_scale2 - ck2[None, :]           # (BM, BN) shifted log2 logits
    if MASKED:
        visible = (cols[None, :] <= pos[:, None]) & (cols[None, :] < Tk)
        t = tl.where(visible, t, float("-inf"))
    if HAS_SEG:
        # padded keys and keys of earlier documents (kernels/segments.py); rows past Tq have lo_q = 0
        kv_ok = tl.load(kv_base + cols, mask=cols < Tk, other=0) != 0
        t = tl.where(kv_ok[None, :] & (cols[None, :] >= lo_q[:, None]), t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(t, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(t - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_TMA:
        v = v_src.load([b, hk, key0, 0]).reshape(BLOCK_N, DV_PAD)
    elif HEAD_DIM_V == DV_PAD and not MASKED:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)                      # (BN, DV_PAD)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attend_all(
    acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, lo, n_full, n_diag, n_hi, pos, c_ref, qk_scale2, Tk,
    sk_t, sk_d, sv_t, sv_d, sc_t,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, NEWEST_FIRST: tl.constexpr, EXACT_C: tl.constexpr,
    kv_base, lo_q, HAS_SEG: tl.constexpr,
):
    """Every kept key block of this program: full tiles [lo, n_full), diagonal tiles [n_diag, n_hi]."""
    if NEWEST_FIRST:
        for i in range(0, n_hi + 1 - n_diag):
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, n_hi - i, pos, c_ref,
                                          qk_scale2, Tk, sk_t, sk_d, sv_t, sv_d, sc_t, HEAD_DIM, D_PAD, HEAD_DIM_V, DV_PAD, BLOCK_N,
                                          True, USE_TMA, EXACT_C, kv_base, lo_q, HAS_SEG)
        for i in range(0, n_full - lo):
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, n_full - 1 - i, pos, c_ref,
                                          qk_scale2, Tk, sk_t, sk_d, sv_t, sv_d, sc_t, HEAD_DIM, D_PAD, HEAD_DIM_V, DV_PAD, BLOCK_N,
                                          False, USE_TMA, EXACT_C, kv_base, lo_q, HAS_SEG)
    else:
        for n in range(lo, n_full):
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, n, pos, c_ref, qk_scale2,
                                          Tk, sk_t, sk_d, sv_t, sv_d, sc_t, HEAD_DIM, D_PAD, HEAD_DIM_V, DV_PAD, BLOCK_N, False, USE_TMA,
                                          EXACT_C, kv_base, lo_q, HAS_SEG)
        for n in range(n_diag, n_hi + 1):
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, n, pos, c_ref, qk_scale2,
                                          Tk, sk_t, sk_d, sv_t, sv_d, sc_t, HEAD_DIM, D_PAD, HEAD_DIM_V, DV_PAD, BLOCK_N, True, USE_TMA,
                                          EXACT_C, kv_base, lo_q, HAS_SEG)
    return acc, l_i, m_i


@triton.jit
def _attend_certified(
    acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, n_full, n_hi, pos, c_ref, qk_scale2, Tk,
    sk_t, sk_d, sv_t, sv_d, sc_t, row_c, cq, a_t, row_ok, CMIN_BH, PHI_BH, log_eps,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, EXACT_C: tl.constexpr,
    kv_base, lo_q, HAS_SEG: tl.constexpr, CERT_CHUNK: tl.constexpr,
):
    """Diagonal tiles newest first, then full key blocks newest first until the certificate holds;
    returns (acc, l_i, m_i, n) with n the first kept key block. row_c: the row term of lse (c[p_i] -
    c_ref, or 0 in the exact form)."""
    for i in range(0, n_hi + 1 - n_full):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, n_hi - i, pos, c_ref,
                                      qk_scale2, Tk, sk_t, sk_d, sv_t, sv_d, sc_t, HEAD_DIM, D_PAD, HEAD_DIM_V,
                                      DV_PAD, BLOCK_N, True, USE_TMA, EXACT_C, kv_base, lo_q, HAS_SEG)
    n = n_full
    lse_vis = (m_i + tl.math.log2(l_i)) * LN2 + row_c
    go = cert_must_visit(n, a_t, cq, lse_vis, row_ok, CMIN_BH, PHI_BH, log_eps, BLOCK_N)
    while go:
        # CERT_CHUNK blocks per test: a `for` the compiler can pipeline (loads of the next tile issued
        # while this one computes), at the price of at most CERT_CHUNK - 1 blocks past the stop point
        steps = tl.minimum(n, CERT_CHUNK)
        for i in range(0, steps):
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, n - 1 - i, pos, c_ref,
                                          qk_scale2, Tk, sk_t, sk_d, sv_t, sv_d, sc_t, HEAD_DIM, D_PAD, HEAD_DIM_V,
                                          DV_PAD, BLOCK_N, False, USE_TMA, EXACT_C, kv_base, lo_q, HAS_SEG)
        n -= steps
        lse_vis = (m_i + tl.math.log2(l_i)) * LN2 + row_c
        go = cert_must_visit(n, a_t, cq, lse_vis, row_ok, CMIN_BH, PHI_BH, log_eps, BLOCK_N)
    return acc, l_i, m_i, n


@triton.jit
def _fox_fwd_kernel(
    Q, K, V, C, START, BAD, O, LSE, KV, LO, A, AHI, CMIN, PHI,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sc_b, sc_h, sc_t,
    so_b, so_h, so_t, so_d,
    Hq, Tq, Tk, Mq, Nk, qk_scale2, log_eps,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRUNE: tl.constexpr, EVEN_M: tl.constexpr, TQ_LT_TK: tl.constexpr,
    USE_TMA: tl.constexpr, HEADS_FASTEST: tl.constexpr, NEWEST_FIRST: tl.constexpr, C_SPAN_LIMIT: tl.constexpr,
    HAS_SEG: tl.constexpr, CERT: tl.constexpr, CERT_CHUNK: tl.constexpr,
):
    if HEADS_FASTEST:                             # grid (B * Hq, Mq): every head's heaviest block first
        bh = tl.program_id(0)
        h = bh % Hq
        b = bh // Hq
        m = Mq - 1 - tl.program_id(1)
    else:                                         # grid (Mq, Hq, B): blocks of one head side by side
        m = Mq - 1 - tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk = h // GROUP
    hk64 = hk.to(tl.int64)
    if TQ_LT_TK:
        offset = Tk - Tq                          # queries are the last Tq positions
    else:
        offset = 0

    rm = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    q_row0 = m * BLOCK_M
    rows = q_row0 + rm                                                   # (BM,) query index i
    pos = offset + rows                                                  # (BM,) position p_i
    row_ok = rows < Tq
    if USE_TMA:
        q = Q.load([b, h, q_row0, 0]).reshape(BLOCK_M, D_PAD)
        k_src = K
        v_src = V
    else:
        q_ptrs = Q + b64 * sq_b + h64 * sq_h + q_row0.to(tl.int64) * sq_t + rm[:, None] * sq_t + d[None, :] * sq_d
        if EVEN_M and HEAD_DIM == D_PAD:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)   # (BM, D_PAD)
        k_src = K + b64 * sk_b + hk64 * sk_h
        v_src = V + b64 * sv_b + hk64 * sv_h

    c_base = C + b64 * sc_b + h64 * sc_h
    p_first = offset + q_row0
    c_first = tl.load(c_base + p_first * sc_t).to(tl.float32)
    if EVEN_M:
        cq = tl.load(c_base + pos * sc_t).to(tl.float32)
    else:
        cq = tl.load(c_base + pos * sc_t, mask=row_ok, other=c_first).to(tl.float32)
    # Exact path when c varies by more than C_SPAN_LIMIT nats over the block's rows (a hard reset, a
    # steep decay); NaN compares False (the fast path, which spreads the NaN the same way).
    exact = (tl.max(cq, axis=0) - tl.min(cq, axis=0)) > C_SPAN_LIMIT

    p_last = offset + tl.minimum(q_row0 + BLOCK_M, Tq) - 1
    n_full = (p_first + 1) // BLOCK_N
    n_hi = p_last // BLOCK_N
    if PRUNE:
        lo = tl.load(START + (b64 * Hq + h) * Mq + m)
    else:
        lo = 0

    if HAS_SEG:
        kv_base = KV + b64 * Tk                                          # (Tk,) key_valid of batch b
        lo_q = tl.load(LO + b64 * Tk + pos, mask=row_ok, other=0)       # (BM,) first key of each row's document
    else:
        kv_base = KV
        lo_q = 0
    # A finite start for the running max: a row whose first visited tile is all masked (the diagonal
    # tile in newest-first order) then gets p = 2^-inf = 0 instead of 2^(-inf + inf) = NaN.
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DV_PAD), tl.float32)
    n_diag = tl.maximum(lo, n_full)               # first diagonal (masked) tile
    if CERT:
        bh64 = b64 * Hq + h
        a = tl.load(A + bh64 * Tq + rows, mask=row_ok, other=0.0)
        a_hi = tl.load(AHI + bh64)
        a_t = tl.where(a_hi > 0, a / a_hi, 0.0)       # in [0, 1]; NaN stays NaN (never stops)
        if exact:
            row_c = tl.zeros((BLOCK_M,), tl.float32)        # t already holds c[p_i] - c[j]
            acc, l_i, m_i, n_stop = _attend_certified(
                acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, n_full, n_hi, pos, cq, qk_scale2, Tk,
                sk_t, sk_d, sv_t, sv_d, sc_t, row_c, cq, a_t, row_ok, CMIN + bh64 * Nk, PHI + bh64 * Nk, log_eps,
                HEAD_DIM, D_PAD, HEAD_DIM_V, DV_PAD, BLOCK_N, USE_TMA, True, kv_base, lo_q, HAS_SEG, CERT_CHUNK)
        else:
            row_c = cq - c_first
            acc, l_i, m_i, n_stop = _attend_certified(
                acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, n_full, n_hi, pos, c_first, qk_scale2, Tk,
                sk_t, sk_d, sv_t, sv_d, sc_t, row_c, cq, a_t, row_ok, CMIN + bh64 * Nk, PHI + bh64 * Nk, log_eps,
                HEAD_DIM, D_PAD, HEAD_DIM_V, DV_PAD, BLOCK_N, USE_TMA, False, kv_base, lo_q, HAS_SEG, CERT_CHUNK)
        tl.store(START + bh64 * Mq + m, n_stop.to(tl.int32))
    elif exact:
        acc, l_i, m_i = _attend_all(acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, lo, n_full, n_diag, n_hi, pos, cq,
                                    qk_scale2, Tk, sk_t, sk_d, sv_t, sv_d, sc_t, HEAD_DIM, D_PAD, HEAD_DIM_V, DV_PAD, BLOCK_N, USE_TMA,
                                    NEWEST_FIRST, True, kv_base, lo_q, HAS_SEG)
        row_c = tl.zeros((BLOCK_M,), tl.float32)        # t already holds c[p_i] - c[j]
    else:
        acc, l_i, m_i = _attend_all(acc, l_i, m_i, q, k_src, v_src, b, hk, c_base, lo, n_full, n_diag, n_hi, pos,
                                    c_first, qk_scale2, Tk, sk_t, sk_d, sv_t, sv_d, sc_t, HEAD_DIM, D_PAD, HEAD_DIM_V, DV_PAD, BLOCK_N,
                                    USE_TMA, NEWEST_FIRST, False, kv_base, lo_q, HAS_SEG)
        row_c = cq - c_first
    lse = (m_i + tl.math.log2(l_i)) * LN2 + row_c
    if HAS_SEG:                                   # a row with no visible key: o = 0, lse = -inf
        empty = l_i == 0.0
        lse = tl.where(empty, float("-inf"), lse)
        l_i = tl.where(empty, 1.0, l_i)
    # BAD (B, Hq, Dv): 0, or NaN in the columns where v of this head's kv head holds a non-finite value
    # anywhere (eager's 0 x NaN; see dispatch._poison)
    dv = tl.arange(0, DV_PAD)
    o = acc / l_i[:, None] + tl.load(BAD + (b64 * Hq + h) * HEAD_DIM_V + dv, mask=dv < HEAD_DIM_V, other=0.0)[None, :]
    lse_ptrs = LSE + (b64 * Hq + h) * Tq + rows
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=row_ok)
    if USE_TMA:
        O.store([b, h, q_row0, 0], o.to(O.dtype).reshape(1, 1, BLOCK_M, DV_PAD))    # clipped to (Tq, Dv)
    else:
        o_ptrs = O + b64 * so_b + h64 * so_h + q_row0.to(tl.int64) * so_t + rm[:, None] * so_t + dv[None, :] * so_d
        if EVEN_M and HEAD_DIM_V == DV_PAD:
            tl.store(o_ptrs, o.to(O.dtype.element_ty))
        else:
            tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < HEAD_DIM_V))


def tma_compatible(*tensors: Tensor) -> bool:
    """Tensor descriptors need a unit last stride, 16-byte aligned other strides and base address."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _descriptor(t: Tensor, rows: int, d_pad: int):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d_pad])


def launch_forward(
    q: Tensor, k: Tensor, v: Tensor, c: Tensor, sm_scale: float, start: Tensor | None, config: FwdConfig,
    o: Tensor | None = None, lse: Tensor | None = None, bad: Tensor | None = None, seg=None,
    cert: CertStats | None = None, log_eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Runs the kernel with a given plan (start None = dense). o (B, Hq, Tq, Dv) and lse may be passed
    (tests poison them). With cert (and log_eps), the online certificate decides and start, (B, Hq, Mq)
    int32, is written (launch_certified is the entry point for that).

    config.tma asks for tensor-descriptor (TMA) loads and stores; they are used when the GPU has
    them (compute capability >= 9, or the interpreter) and the strides allow, else plain loads.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bm, bn = config.block_m, config.block_n
    d_pad, dv_pad = padded_head_dim(D), padded_head_dim(Dv)
    Mq = num_blocks(Tq, bm)
    o = empty_like_last(q, Dv) if o is None else o
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device) if lse is None else lse
    prune = start is not None and cert is None
    if bad is None:
        bad = torch.zeros((B, Hq, Dv), dtype=torch.float32, device=q.device)
    bad = bad.contiguous()
    use_tma = config.tma and tma_available(q.device) and tma_compatible(q, k, v, o)
    if use_tma:
        qa, ka, va, oa = (_descriptor(q, bm, d_pad), _descriptor(k, bn, d_pad), _descriptor(v, bn, dv_pad),
                          _descriptor(o, bm, dv_pad))
    else:
        qa, ka, va, oa = q, k, v, o
    grid = (B * Hq, Mq) if config.heads_fastest else (Mq, Hq, B)
    kv_arg, lo_arg = (seg.key_valid.view(torch.uint8), seg.lo) if seg is not None else (lse, lse)
    if cert is not None:
        assert cert.block_n == bn, "the certificate's prefixes must be built for the kernel's block_n"
        cert_args = (cert.a.contiguous(), cert.a_hi.contiguous(), cert.cmin.contiguous(), cert.phi.contiguous())
        nk = cert.cmin.shape[-1]
    else:
        cert_args, nk = (lse, lse, lse, lse), 0
    _fox_fwd_kernel[grid](
        qa, ka, va, c, start if start is not None else lse, bad, oa, lse, kv_arg, lo_arg, *cert_args,
        *q.stride(), *k.stride(), *v.stride(), *c.stride(), *o.stride(),
        Hq, Tq, Tk, Mq, nk, float(sm_scale) * LOG2E.value, float(log_eps if log_eps is not None else 0.0),
        GROUP=Hq // Hkv, HEAD_DIM=D, D_PAD=d_pad, HEAD_DIM_V=Dv, DV_PAD=dv_pad, BLOCK_M=bm, BLOCK_N=bn,
        PRUNE=prune, EVEN_M=(Tq % bm == 0), TQ_LT_TK=(Tq < Tk), USE_TMA=use_tma, HEADS_FASTEST=config.heads_fastest, NEWEST_FIRST=config.newest_first,
        C_SPAN_LIMIT=c_span_limit(), HAS_SEG=seg is not None, CERT=cert is not None, CERT_CHUNK=cert_chunk(config),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return o, lse


def launch_certified(
    q: Tensor, k: Tensor, v: Tensor, c: Tensor, sm_scale: float, log_eps: float, stats: CertStats,
    config: FwdConfig, o: Tensor | None = None, lse: Tensor | None = None, start: Tensor | None = None,
    bad: Tensor | None = None, seg=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(o, lse, start): the forward under the online certificate (stats built for config.block_n, fp32);
    start (B, Hq, Mq) int32, the first kept key block of each query block, is written by the kernel
    (pass one to poison it)."""
    B, Hq, Tq, _ = q.shape
    if start is None:
        start = torch.empty((B, Hq, num_blocks(Tq, config.block_m)), dtype=torch.int32, device=q.device)
    o, lse = launch_forward(q, k, v, c, sm_scale, start, config, o=o, lse=lse, bad=bad, cert=stats, log_eps=log_eps,
                            seg=seg)
    return o, lse, start


def tma_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return True      # the interpreter emulates descriptors


def forward(
    q: Tensor, k: Tensor, v: Tensor, c: Tensor, sm_scale: float, log_eps: float | None,
    u_bound: Tensor | None, config: FwdConfig | None = None, bad: Tensor | None = None, seg=None,
) -> tuple[Tensor, Tensor]:
    """(o, lse): o (B, Hq, Tq, Dv) in q's layout, lse (B, Hq, Tq) fp32 natural log. Plan and kernel on
    device. bad (B, Hq, Dv) fp32, 0 or NaN: added to every output row of the head (see dispatch._poison)."""
    config = forward_config(q, v.shape[-1]) if config is None else config
    start = None
    if pruning_enabled(log_eps) or (seg is not None):     # segments: the plan also skips other documents
        start, _ = compute_plan(q, k, c, sm_scale, log_eps, u_bound, config.block_m, config.block_n, with_end=False,
                                seg=seg)
    return launch_forward(q, k, v, c, sm_scale, start, config, bad=bad, seg=seg)



def forward_recorded(
    q: Tensor, k: Tensor, v: Tensor, c: Tensor, sm_scale: float, log_eps: float | None,
    u_bound: Tensor | None, config: FwdConfig | None = None, bad: Tensor | None = None,
    certificate: str = "online", q_norm: Tensor | None = None, k_norm: Tensor | None = None,
    never_prune: Tensor | None = None, seg=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(o, lse, keep_from): as forward(), plus the kept set it computed, keep_from (B, Hq, Tq) int32 (the
    first kept key of each row; zeros without pruning). certificate "online" (the kernel decides while
    it runs; q_norm / k_norm optional row norms, never_prune (B, Hq) bool heads that must stay dense) or
    "paper" (the device plan of kernels/fox_triton/plan.py with u_bound)."""
    config = forward_config(q, v.shape[-1]) if config is None else config
    B, Hq, Tq, _ = q.shape
    if not pruning_enabled(log_eps) and seg is None:
        o, lse = launch_forward(q, k, v, c, sm_scale, None, config, bad=bad)
        return o, lse, torch.zeros((B, Hq, Tq), dtype=torch.int32, device=q.device)
    if certificate == "paper" or not pruning_enabled(log_eps):
        # the device plan; with segments (and dense) it still skips the key blocks of earlier documents
        start, _ = compute_plan(q, k, c, sm_scale, log_eps, u_bound, config.block_m, config.block_n, with_end=False,
                                seg=seg)
        o, lse = launch_forward(q, k, v, c, sm_scale, start, config, bad=bad, seg=seg)
    else:
        # with segments, masked keys only loosen the certificate's bound (they count as possible mass)
        stats = cert_stats(q, k, c, sm_scale, config.block_n, q_norm, k_norm, never_prune)
        o, lse, start = launch_certified(q, k, v, c, sm_scale, log_eps, stats, config, bad=bad, seg=seg)
    return o, lse, keep_from_rows(start, Tq, config.block_m, config.block_n)
