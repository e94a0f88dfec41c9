"""Triton kernel for dk, dv and the key-side gradient of c in the FoX attention backward.

Notation (one batch element b, kv head hk, query head h = hk * G + g for g < G = Hq // Hkv):
  queries are the last Tq of Tk positions: query row i sits at position p_i = i + q_shift,
  q_shift = Tk - Tq.  Base-2 arithmetic: qk_scale = sm_scale * log2(e), lse2_i = lse_i * log2(e)
  (preprocess kernel), c_ref = c of the program's first key
  one-FMA form:  sT_ji = qk_scale k_j.q_i + ((c[p_i] - c_ref) log2(e) - lse2_i) - (c[j] - c_ref) log2(e)
  exact form:    sT_ji = (c[p_i] - c[j]) log2(e) + (qk_scale k_j.q_i - lse2_i)
  (exact when c spreads by more than C_SPAN_LIMIT over the key block in any head of the group; one
  launch per form, a program of the other mode computes and stores nothing; see backward.py)
  pT_ji   = exp2(sT_ji) = P_ij, the softmax probability of the forward (0 where masked or skipped)
  dpT_ji  = v_j . do_i ;  dsT_ji = pT_ji * (dpT_ji - Delta_i),  Delta_i = rowsum(do_i * o_i)
  dv_j   += sum_i pT_ji do_i         dk_j += sm_scale * sum_i dsT_ji q_i      (summed over g)
  dc_j    = -sum_i dsT_ji            (one value per query head h)
Gradient of c: s_ij depends on c through c[p_i] - c[j], so dc_t = sum_j dS_tj - sum_i dS_it. This
kernel writes the column sums; the dq kernel, which holds whole rows, adds the row sums afterwards
(they vanish for the exact O but not for O rounded to bf16, see backward.py).

Grid (B * Hkv, Nk): one program per (b, kv head, key block n); the batch-head axis varies fastest
so that all the heavy programs (small n: the most query blocks) start first (the exact launch walks
the same tiles in the same order with a few persistent programs, see fox_bwd_dkdv_kernel). A program holds k, v
of its BLOCK_N keys and loops over the G query heads of its kv head (no atomics, no repeated
k/v), and for each head over the query blocks m = m_lo .. end[n] - 1: m_lo is the first query
block with a causal entry in key block n, end[n] comes from the ACP plan of this kernel's
(BLOCK_M, BLOCK_N) partition. kept(m, n) <=> start[m] <= n is checked per tile (for a non-monotone
c the kept query blocks below end[n] need not be contiguous); a tile that is not kept gets lse2 = +inf
so it adds exactly 0 (branch-free, which keeps the loop software-pipelined). Tiles that straddle
the diagonal use the causal mask; the rest run unmasked. Keys that no query block keeps get
dk = dv = dc = 0 (written). Rows past Tq load lse2 = +inf and are masked, so their probabilities are exactly 0.
Shapes: q, dk, k (., D) with HEAD_DIM = D padded to D_PAD; v, dv, do (., Dv) with HEAD_DIM_V = Dv padded
to DV_PAD (Dv may differ from D).
HAS_SEG (padded and packed batches, kernels/segments.py): KV (B, Tk) uint8 key_valid, LO (B, Tk) int32
first key of each position's document; every tile also masks entries with KV[j] = 0 or j < LO[p_i]
(a row with no visible key has lse2 = +inf from the preprocess kernel, so its p is 0).
Compile-time specialisation: head dims (HEAD_DIM, HEAD_DIM_V, padded to D_PAD, DV_PAD; masks on d only when not a power of two),
Tq % BLOCK_M == 0 and Tk % BLOCK_N == 0 (no row masks), GQA group, pruning on or off (PRUNE), dot precision.
Recorded kept set (RECORDED, with PRUNE; kernels/recorded.py): KEEP (B, Hq, Tq) int32 holds the first
kept key of each row as the forward recorded it; start and end come from it for this kernel's partition,
and every entry j < KEEP[i] is masked (p = 0), so the kernel computes exactly the forward's kept set.
WHOLE (B, Hq, Mq) int32: the first key block that every row of query block m keeps whole; only the
tiles below it (those the boundary crosses, one or two per query block) load KEEP and mask per entry.
Offsets: batch and head offsets are int64, so B * H * T * D above 2**31 works.
"""
from __future__ import annotations

import triton
import triton.language as tl

from acp_compile.kernels.fox_triton.common import LOG2E, launch_owns, load_rows, store_rows


@triton.jit
def _dkdv_tiles(
    dk, dv, dc, k, v, c_k, c_ref, offs_n, n,
    Q, DO, C, LSE2, DELTA, START, KEEP, WHOLE,
    sq_t, sq_d, sdo_t, sdo_d, sc_t,
    m_lo, m_hi, Tq, q_shift, qk_scale,
    PRUNE: tl.constexpr, RECORDED: tl.constexpr, MASKED: tl.constexpr, EVEN_M: tl.constexpr, EXACT_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, kv_ok, LO, HAS_SEG: tl.constexpr,
):
    """Accumulates the tiles (m, n) for m in [m_lo, m_hi) into dk (BLOCK_N, D_PAD), dv (BLOCK_N, DV_PAD)
    and dc (BLOCK_N,).
    EXACT_C: c_k holds c[j] and sT gets (c[p_i] - c[j]) log2(e) per entry; else c_k holds
    (c[j] - c_ref) log2(e) and the row term (c[p_i] - c_ref) log2(e) - lse2_i is formed per tile."""
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    for m in range(m_lo, m_hi):
        offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)                       # (BM,) query rows
        row_ok = offs_m < Tq
        q = load_rows(Q + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d, row_ok, offs_d,
                      EVEN_M, HEAD_DIM, D_PAD)                              # (BM, D_PAD)
        do = load_rows(DO + offs_m[:, None] * sdo_t + offs_dv[None, :] * sdo_d, row_ok, offs_dv,
                       EVEN_M, HEAD_DIM_V, DV_PAD)                          # (BM, DV_PAD)
        if EVEN_M:
            lse2 = tl.load(LSE2 + offs_m)
            delta = tl.load(DELTA + offs_m)
            c_q = tl.load(C + (offs_m + q_shift) * sc_t).to(tl.float32)
        else:
            lse2 = tl.load(LSE2 + offs_m, mask=row_ok, other=float("inf"))     # rows past Tq: p = 0
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
            c_q = tl.load(C + (offs_m + q_shift) * sc_t, mask=row_ok, other=0.0).to(tl.float32)
        if PRUNE:
            lse2 = tl.where(tl.load(START + m) <= n, lse2, float("inf"))     # tile not kept: adds 0
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)         # (BN, BM)
        if EXACT_C:
            sT = (c_q[None, :] - c_k[:, None]) * LOG2E + (qkT * qk_scale - lse2[None, :])
        else:
            r = (c_q - c_ref) * LOG2E - lse2                    # (BM,) row term
            sT = qkT * qk_scale + (r[None, :] - c_k[:, None])
        if not EVEN_M:
            # rows past Tq: lse2 = +inf alone could meet a +inf from c (a reset of -1e38) and give NaN
            sT = tl.where(row_ok[None, :], sT, float("-inf"))
        if MASKED:
            causal = (offs_m + q_shift)[None, :] >= offs_n[:, None]
            sT = tl.where(causal, sT, float("-inf"))
        if HAS_SEG:                                                          # padding, other documents
            lo_q = tl.load(LO + offs_m + q_shift, mask=row_ok, other=0)       # (BM,)
            sT = tl.where(kv_ok[:, None] & (offs_n[:, None] >= lo_q[None, :]), sT, float("-inf"))
        if RECORDED:                                            # keys the forward did not keep
            if tl.load(WHOLE + m) > n:                          # only a tile the boundary crosses
                keep_from = tl.load(KEEP + offs_m, mask=row_ok, other=0)       # (BM,) int32
                sT = tl.where(offs_n[:, None] >= keep_from[None, :], sT, float("-inf"))
        pT = tl.math.exp2(sT)                                                # (BN, BM)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)        # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
        dc -= tl.sum(dsT, axis=1)
    return dk, dv, dc


@triton.jit
def _dkdv_program(
    bhk, n,
    Q, K, V, C, DO, LSE2, DELTA, START, END, KEEP, WHOLE, MODE, ACTIVE, DK, DV, DC, KV, LO,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sc_b, sc_h, sc_t,
    sdo_b, sdo_h, sdo_t, sdo_d,
    sdk_b, sdk_h, sdk_t, sdk_d,
    sdv_b, sdv_h, sdv_t, sdv_d,
    sdc_b, sdc_h, sdc_t,
    Hq, Hkv, Tq, Tk, Mq, Nk, sm_scale, qk_scale,
    GROUP: tl.constexpr, PRUNE: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    EXACT_C: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, HAS_SEG: tl.constexpr,
    RECORDED: tl.constexpr,
):
    """The work of one (batch * kv head bhk, key block n) tile."""
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)                            # (BN,) key positions
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    col_ok = offs_n < Tk
    if not EXACT_C:
        k = load_rows(K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d,
                      col_ok, offs_d, EVEN_N, HEAD_DIM, D_PAD)             # (BN, D_PAD)
        v = load_rows(V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_t + offs_dv[None, :] * sv_d,
                      col_ok, offs_dv, EVEN_N, HEAD_DIM_V, DV_PAD)       # (BN, DV_PAD)
    dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, DV_PAD), dtype=tl.float32)
    if HAS_SEG:
        kv_ok = tl.load(KV + b * Tk + offs_n, mask=col_ok, other=0) != 0     # (BN,) key not padding
        lo_b = LO + b * Tk
    else:
        kv_ok = col_ok
        lo_b = LO

    q_shift = Tk - Tq
    # First query block with a causal entry in key block n, and first whose rows all see the whole block.
    m_lo = tl.maximum(n * BLOCK_N - q_shift, 0) // BLOCK_M
    m_full = (tl.maximum((n + 1) * BLOCK_N - 1 - q_shift, 0) + BLOCK_M - 1) // BLOCK_M
    m_full = tl.maximum(m_full, m_lo)

    # This launch handles the programs of its mode only (MODE (B, Hkv, Nk) int8 from backward.exact_modes:
    # exact when c spreads by more than configs.C_SPAN_LIMIT over this key block in any head of the
    # group, or is NaN); the other launch does the rest, so neither kernel carries a branch around its
    # pipelined loops.
    mine, store_ok = launch_owns(tl.load(MODE + bhk * Nk + n), col_ok, EXACT_C)
    if EXACT_C:
        # The exact launch is idle for almost every program (W1: all); masking its k, v loads by the
        # mode keeps its idle programs from reading them (0.18 ms at W1 16k unmasked). The one-FMA
        # launch keeps the EVEN_N-specialised loads above: masking those by the mode as well measured
        # slower on the H200 (8.69 against 8.01 ms, W1 16k ACP fwd+bwd).
        k = load_rows(K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d,
                      store_ok, offs_d, False, HEAD_DIM, D_PAD)            # (BN, D_PAD)
        v = load_rows(V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_t + offs_dv[None, :] * sv_d,
                      store_ok, offs_dv, False, HEAD_DIM_V, DV_PAD)

    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        Cbh = C + b * sc_b + h * sc_h
        c_ref = tl.load(Cbh + n * BLOCK_N * sc_t).to(tl.float32)     # c of the block's first key
        if EVEN_N:
            c_k = tl.load(Cbh + offs_n * sc_t).to(tl.float32)
        else:
            c_k = tl.load(Cbh + offs_n * sc_t, mask=col_ok, other=c_ref).to(tl.float32)
        if PRUNE:
            m_end = tl.load(END + bh * Nk + n)
        else:
            m_end = Mq
        m_end = tl.where(mine, m_end, m_lo)                                  # not mine: no tile
        m_mid = tl.minimum(m_full, m_end)
        dc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        Qbh = Q + b * sq_b + h * sq_h
        DObh = DO + b * sdo_b + h * sdo_h
        if not EXACT_C:
            c_k = (c_k - c_ref) * LOG2E                         # (BN,) log2 units
        dk, dv, dc = _dkdv_tiles(
            dk, dv, dc, k, v, c_k, c_ref, offs_n, n, Qbh, DObh, Cbh, LSE2 + bh * Tq, DELTA + bh * Tq,
            START + bh * Mq, KEEP + bh * Tq, WHOLE + bh * Mq, sq_t, sq_d, sdo_t, sdo_d, sc_t, m_lo, m_mid, Tq, q_shift,
            qk_scale, PRUNE=PRUNE, RECORDED=RECORDED, MASKED=True, EVEN_M=EVEN_M, EXACT_C=EXACT_C, DOT_PRECISION=DOT_PRECISION,
            HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, D_PAD=D_PAD, HEAD_DIM_V=HEAD_DIM_V, DV_PAD=DV_PAD,
            kv_ok=kv_ok, LO=lo_b, HAS_SEG=HAS_SEG,
        )
        dk, dv, dc = _dkdv_tiles(
            dk, dv, dc, k, v, c_k, c_ref, offs_n, n, Qbh, DObh, Cbh, LSE2 + bh * Tq, DELTA + bh * Tq,
            START + bh * Mq, KEEP + bh * Tq, WHOLE + bh * Mq, sq_t, sq_d, sdo_t, sdo_d, sc_t, m_mid, m_end, Tq, q_shift,
            qk_scale, PRUNE=PRUNE, RECORDED=RECORDED, MASKED=False, EVEN_M=EVEN_M, EXACT_C=EXACT_C, DOT_PRECISION=DOT_PRECISION,
            HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, D_PAD=D_PAD, HEAD_DIM_V=HEAD_DIM_V, DV_PAD=DV_PAD,
            kv_ok=kv_ok, LO=lo_b, HAS_SEG=HAS_SEG,
        )
        tl.store(DC + b * sdc_b + h * sdc_h + offs_n * sdc_t, dc, mask=store_ok)

    dk = dk * sm_scale
    # A scalar branch on the program's mode, then stores specialised on EVEN_N: stores masked by a
    # per-key mode vector made this kernel spill (176 bytes of stack for sm_90; kernel_registers.py).
    if mine:
        store_rows(DK + b * sdk_b + hk * sdk_h + offs_n[:, None] * sdk_t + offs_d[None, :] * sdk_d,
                   dk.to(DK.dtype.element_ty), col_ok, offs_d, EVEN_N, HEAD_DIM, D_PAD)
        store_rows(DV + b * sdv_b + hk * sdv_h + offs_n[:, None] * sdv_t + offs_dv[None, :] * sdv_d,
                   dv.to(DV.dtype.element_ty), col_ok, offs_dv, EVEN_N, HEAD_DIM_V, DV_PAD)


@triton.jit
def fox_bwd_dkdv_kernel(
    Q, K, V, C, DO, LSE2, DELTA, START, END, KEEP, WHOLE, MODE, ACTIVE, DK, DV, DC, KV, LO,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sc_b, sc_h, sc_t,
    sdo_b, sdo_h, sdo_t, sdo_d,
    sdk_b, sdk_h, sdk_t, sdk_d,
    sdv_b, sdv_h, sdv_t, sdv_d,
    sdc_b, sdc_h, sdc_t,
    Hq, Hkv, Tq, Tk, Mq, Nk, sm_scale, qk_scale, BHK,
    GROUP: tl.constexpr, PRUNE: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    EXACT_C: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, HAS_SEG: tl.constexpr,
    RECORDED: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """Grid (BHK = B * Hkv, Nk): one program per tile. PERSISTENT (the exact launch): a 1-D grid of a few
    programs that walk all BHK * Nk tiles, batch-head fastest (see backward_dq.fox_bwd_dq_kernel)."""
    # ACTIVE (1,) int32: 0 when this launch has nothing to do (its programs return at once): the exact
    # launch when no program is exact, and one of the two one-FMA launches of a recorded kept set
    # (backward.py: with or without the per-entry mask, chosen on the device by recorded_aligned)
    if PERSISTENT:
        for t in range(tl.program_id(0), tl.load(ACTIVE) * (BHK * Nk), tl.num_programs(0)):
            _dkdv_program(
                t % BHK, t // BHK,
                Q, K, V, C, DO, LSE2, DELTA, START, END, KEEP, WHOLE, MODE, ACTIVE, DK, DV, DC, KV, LO, sq_b, sq_h, sq_t, sq_d, sk_b,
                sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sc_b, sc_h, sc_t, sdo_b, sdo_h, sdo_t, sdo_d, sdk_b,
                sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d, sdc_b, sdc_h, sdc_t, Hq, Hkv, Tq, Tk, Mq, Nk,
                sm_scale, qk_scale, GROUP, PRUNE, DOT_PRECISION, HEAD_DIM, EVEN_M, EVEN_N, BLOCK_M, BLOCK_N,
                D_PAD, EXACT_C, HEAD_DIM_V, DV_PAD, HAS_SEG, RECORDED,
            )
    elif tl.load(ACTIVE) != 0:
        _dkdv_program(
            tl.program_id(0), tl.program_id(1),
            Q, K, V, C, DO, LSE2, DELTA, START, END, KEEP, WHOLE, MODE, ACTIVE, DK, DV, DC, KV, LO, sq_b, sq_h, sq_t, sq_d, sk_b,
            sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sc_b, sc_h, sc_t, sdo_b, sdo_h, sdo_t, sdo_d, sdk_b,
            sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d, sdc_b, sdc_h, sdc_t, Hq, Hkv, Tq, Tk, Mq, Nk,
            sm_scale, qk_scale, GROUP, PRUNE, DOT_PRECISION, HEAD_DIM, EVEN_M, EVEN_N, BLOCK_M, BLOCK_N,
            D_PAD, EXACT_C, HEAD_DIM_V, DV_PAD, HAS_SEG, RECORDED,
        )
