"""Triton kernel for dk, dv and the key-side gradient of c in the FoX attention backward.

Notation (one batch element b, kv head hk, query head h = hk * G + g for g < G = Hq // Hkv):
  queries are the last Tq of Tk positions: query row i sits at position p_i = i + q_shift,
  q_shift = Tk - Tq.  c2 = c * log2(e), lse2 = lse * log2(e)  (exp2 arithmetic)
  sT_ji   = qk_scale * k_j . q_i + (c2[p_i] - lse2_i) - c2[j]      qk_scale = sm_scale * log2(e)
  pT_ji   = exp2(sT_ji)  = P_ij, the softmax probability of the forward (zero where masked)
  dpT_ji  = v_j . do_i ;  dsT_ji = pT_ji * (dpT_ji - Delta_i),  Delta_i = rowsum(do_i * o_i)
  dv_j   += sum_i pT_ji do_i         dk_j += sm_scale * sum_i dsT_ji q_i      (summed over g)
  dc_j    = -sum_i dsT_ji            (per query head h: the row term sum_j dS_ij is 0, see below)
Gradient of c: s_ij depends on c through c[p_i] - c[j], so dc_t = sum_j dS_tj - sum_i dS_it.
The first sum is zero for every row (softmax ignores a per-row shift: sum_j P_ij dP_ij = Delta_i),
so only the column sum is computed; tests check this against autograd through the reference.

Grid: one program per (key block n, b * Hkv + hk). It holds k, v of its BLOCK_N keys and loops
over the G query heads of its kv head (no atomics, no repeated k/v), and for each head over the
query blocks m = m_lo .. end[n] - 1, where m_lo is the first query block with a causal entry in
key block n and end[n] comes from the ACP plan of this kernel's (BLOCK_M, BLOCK_N) partition.
A tile is visited only when kept(m, n) <=> start[m] <= n (for a non-monotone c the kept query
blocks below end[n] need not be contiguous). Tiles that straddle the diagonal use the causal
mask; the rest run unmasked. Keys that no query block keeps get dk = dv = dc = 0 (written).
Rows past Tq load lse = +inf so that their probabilities are exactly 0.
Offsets: batch and head offsets are int64, so B * H * T * D above 2**31 works.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dkdv_tiles(
    dk, dv, dc, k, v, c2_k, offs_n, n,
    Q, DO, LSE, DELTA, C, START,
    stride_qt, stride_qd, stride_dot, stride_dod, stride_lt, stride_ct,
    m_lo, m_hi, Tq, q_shift, qk_scale, D,
    ACP: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Accumulates the tiles (m, n) for m in [m_lo, m_hi) into dk, dv (BLOCK_N, BLOCK_D), dc (BLOCK_N,)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for m in range(m_lo, m_hi):
        kept = True
        if ACP:
            kept = tl.load(START + m) <= n
        if kept:
            offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)                   # (BM,) query rows
            row_ok = offs_m < Tq
            tile_ok = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=tile_ok, other=0.0)
            do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=tile_ok, other=0.0)
            lse = tl.load(LSE + offs_m * stride_lt, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
            c_q = tl.load(C + (offs_m + q_shift) * stride_ct, mask=row_ok, other=0.0).to(tl.float32)
            row_bias = (c_q - lse) * 1.4426950408889634                     # (BM,) log2 units
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)    # (BN, BM)
            sT = qkT * qk_scale + row_bias[None, :] - c2_k[:, None]
            if MASKED:
                causal = (offs_m + q_shift)[None, :] >= offs_n[:, None]
                sT = tl.where(causal, sT, float("-inf"))
            pT = tl.math.exp2(sT)                                           # (BN, BM)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)   # (BN, BM)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
            dc -= tl.sum(dsT, axis=1)
    return dk, dv, dc


@triton.jit
def fox_bwd_dkdv_kernel(
    Q, K, V, C, DO, LSE, DELTA, START, END, DK, DV, DC,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_cb, stride_ch, stride_ct,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_lb, stride_lh, stride_lt,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_dcb, stride_dch, stride_dct,
    Hq, Hkv, Tq, Tk, D, Mq, Nk, sm_scale, qk_scale,
    GROUP: tl.constexpr, ACP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)                            # (BN,) key positions
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < Tk
    kv_ok = col_ok[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=kv_ok, other=0.0)                                      # (BN, BD)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=kv_ok, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    q_shift = Tk - Tq
    # First query block with a causal entry in key block n, and first whose rows all see the whole block.
    m_lo = tl.maximum(n * BLOCK_N - q_shift, 0) // BLOCK_M
    m_full = (tl.maximum((n + 1) * BLOCK_N - 1 - q_shift, 0) + BLOCK_M - 1) // BLOCK_M
    m_full = tl.maximum(m_full, m_lo)

    for g in range(GROUP):
        h = hk * GROUP + g
        Cbh = C + b * stride_cb + h * stride_ch
        c2_k = tl.load(Cbh + offs_n * stride_ct, mask=col_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        if ACP:
            m_end = tl.load(END + (b * Hq + h) * Nk + n)
        else:
            m_end = Mq
        m_mid = tl.minimum(m_full, m_end)
        dc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        Qbh = Q + b * stride_qb + h * stride_qh
        DObh = DO + b * stride_dob + h * stride_doh
        LSEbh = LSE + b * stride_lb + h * stride_lh
        DELTAbh = DELTA + (b * Hq + h) * Tq
        STARTbh = START + (b * Hq + h) * Mq
        dk, dv, dc = _dkdv_tiles(
            dk, dv, dc, k, v, c2_k, offs_n, n, Qbh, DObh, LSEbh, DELTAbh, Cbh, STARTbh,
            stride_qt, stride_qd, stride_dot, stride_dod, stride_lt, stride_ct,
            m_lo, m_mid, Tq, q_shift, qk_scale, D,
            ACP=ACP, MASKED=True, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
        )
        dk, dv, dc = _dkdv_tiles(
            dk, dv, dc, k, v, c2_k, offs_n, n, Qbh, DObh, LSEbh, DELTAbh, Cbh, STARTbh,
            stride_qt, stride_qd, stride_dot, stride_dod, stride_lt, stride_ct,
            m_mid, m_end, Tq, q_shift, qk_scale, D,
            ACP=ACP, MASKED=False, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
        )
        tl.store(DC + b * stride_dcb + h * stride_dch + offs_n * stride_dct, dc, mask=col_ok)

    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_ok)
