"""Triton kernel for dq in the FoX attention backward.

Notation (one batch element b, query head h, kv head hk = h // G):
  query row i sits at position p_i = i + q_shift, q_shift = Tk - Tq; lse2_i = lse_i * log2(e)
  (preprocess kernel); c_ref = c[p_first] of the program's query block; qk_scale = sm_scale * log2(e)
  one-FMA form:  r_i = (c[p_i] - c_ref) log2(e) - lse2_i,  s_ij = qk_scale q_i.k_j + r_i - (c[j] - c_ref) log2(e)
  exact form:    s_ij = (c[p_i] - c[j]) log2(e) + (qk_scale q_i.k_j - lse2_i)
  (exact when c spreads by more than C_SPAN_LIMIT over the block's rows; one launch per form, see backward.py)
  p_ij  = exp2(s_ij) ;  ds_ij = p_ij * (do_i . v_j - Delta_i) ;  dq_i = sm_scale * sum_j ds_ij k_j
  rs_i  = sum_j ds_ij, added to dc[p_i] (the row term of dc; the dk/dv kernel wrote the column term)

Grid (B * Hq, Mq): one program per (b, query head, query block m), heaviest query blocks first
(m runs from the last block down; the batch-head axis varies fastest); the exact launch instead walks
the same tiles in the same order with a few persistent programs (see fox_bwd_dq_kernel). Like the forward, it visits
the key blocks n = start[m] .. n_hi(m), start in units of BLOCK_N keys for blocks of BLOCK_M rows
(the launcher derives it from the dk/dv kernel's plan, see backward.coarsen_start). First the key blocks that every row of the block sees in full (no mask, never past Tk),
then those that straddle the diagonal (causal mask). start[m] <= n_hi(m) always, so the diagonal
is always visited. Rows past Tq load lse2 = +inf (p = 0) and are not stored; keys past Tk only occur in masked
tiles (their position exceeds every query's), so the causal mask removes them.
HAS_SEG (padded and packed batches, kernels/segments.py): KV (B, Tk) uint8 key_valid, LO (B, Tk) int32
first key of each position's document; every tile also masks entries with KV[j] = 0 or j < LO[p_i].
Shapes: q, k, dq (., D) with HEAD_DIM = D padded to D_PAD; v, do (., Dv) with HEAD_DIM_V = Dv padded to
DV_PAD (Dv may differ from D). Recorded kept set (RECORDED, with PRUNE; kernels/recorded.py): KEEP (B, Hq, Tq) int32 holds the first
kept key of each row as the forward recorded it; start comes from it for this kernel's partition, and
every entry j < KEEP[i] is masked (p = 0), so the kernel computes exactly the forward's kept set.
Only the key blocks below n_whole = ceil(max_i KEEP[i] / BLOCK_N) (the one or two the boundary crosses)
carry that mask; the full tiles from n_whole on are kept whole by every row and run without it.
Offsets: batch and head offsets are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

from acp_compile.kernels.fox_triton.common import LOG2E, launch_owns, load_rows, store_rows


@triton.jit
def _dq_tiles(
    dq, rs, q, do, r, lse2, delta, pos_q, K, V, C, c_ref,
    sk_t, sk_d, sv_t, sv_d, sc_t,
    n_lo, n_hi, Tk, qk_scale, keep_from,
    RECORDED: tl.constexpr, MASKED: tl.constexpr, KEYS_EVEN: tl.constexpr, EXACT_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, KVb, lo_q, HAS_SEG: tl.constexpr,
):
    """Accumulates the tiles (m, n) for n in [n_lo, n_hi) into dq (BLOCK_M, D_PAD) and the row sums of
    dS into rs (BLOCK_M,). KEYS_EVEN: no key of these tiles lies past Tk (always for unmasked tiles).
    EXACT_C: r holds c[p_i] and s gets (c[p_i] - c[j]) log2(e) per entry; else r holds the row term
    (c[p_i] - c_ref) log2(e) - lse2_i and s gets r_i - (c[j] - c_ref) log2(e)."""
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    for n in range(n_lo, n_hi):
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)                      # (BN,) key positions
        col_ok = offs_n < Tk
        k = load_rows(K + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, col_ok, offs_d,
                      KEYS_EVEN, HEAD_DIM, D_PAD)                          # (BN, D_PAD)
        v = load_rows(V + offs_n[:, None] * sv_t + offs_dv[None, :] * sv_d, col_ok, offs_dv,
                      KEYS_EVEN, HEAD_DIM_V, DV_PAD)                       # (BN, DV_PAD)
        if KEYS_EVEN:
            c_k = tl.load(C + offs_n * sc_t)
        else:
            c_k = tl.load(C + offs_n * sc_t, mask=col_ok, other=0.0)
        c_k = c_k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)        # (BM, BN)
        if EXACT_C:
            s = (r[:, None] - c_k[None, :]) * LOG2E + (qk * qk_scale - lse2[:, None])
        else:
            c2_k = (c_k - c_ref) * LOG2E
            s = qk * qk_scale + (r[:, None] - c2_k[None, :])
        if MASKED:
            s = tl.where(pos_q[:, None] >= offs_n[None, :], s, float("-inf"))
        if HAS_SEG:                                                          # padding, other documents
            kv_ok = tl.load(KVb + offs_n, mask=col_ok, other=0) != 0         # (BN,)
            s = tl.where(kv_ok[None, :] & (offs_n[None, :] >= lo_q[:, None]), s, float("-inf"))
        if RECORDED:                                            # keys the forward did not keep
            s = tl.where(offs_n[None, :] >= keep_from[:, None], s, float("-inf"))
        p = tl.math.exp2(s)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)       # (BM, BN)
        ds = p * (dp - delta[:, None])
        rs += tl.sum(ds, axis=1)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq, rs


@triton.jit
def _dq_program(
    bh, m_idx,
    Q, K, V, C, DO, LSE2, DELTA, START, KEEP, MODE, ANY, DQ, DC, KV, LO,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sc_b, sc_h, sc_t,
    sdo_b, sdo_h, sdo_t, sdo_d,
    sdq_b, sdq_h, sdq_t, sdq_d,
    sdc_b, sdc_h, sdc_t,
    Hq, Tq, Tk, Mq, sm_scale, qk_scale,
    GROUP: tl.constexpr, PRUNE: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    EXACT_C: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, HAS_SEG: tl.constexpr,
    RECORDED: tl.constexpr,
):
    """The work of one (batch * query head bh, query block) tile; m_idx 0 is the last (heaviest) block."""
    m = Mq - 1 - m_idx
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    bh64 = b * Hq + h
    q_shift = Tk - Tq
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)                            # (BM,) query rows
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < Tq
    if not EXACT_C:
        q = load_rows(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d,
                      row_ok, offs_d, EVEN_M, HEAD_DIM, D_PAD)            # (BM, D_PAD)
        do = load_rows(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_dv[None, :] * sdo_d,
                       row_ok, offs_dv, EVEN_M, HEAD_DIM_V, DV_PAD)       # (BM, DV_PAD)
    pos_q = offs_m + q_shift
    Cbh = C + b * sc_b + h * sc_h
    c_ref = tl.load(Cbh + (m * BLOCK_M + q_shift) * sc_t).to(tl.float32)   # c of the block's first row
    if EVEN_M:
        lse2 = tl.load(LSE2 + bh64 * Tq + offs_m)
        delta = tl.load(DELTA + bh64 * Tq + offs_m)
        c_q = tl.load(Cbh + pos_q * sc_t).to(tl.float32)
    else:
        lse2 = tl.load(LSE2 + bh64 * Tq + offs_m, mask=row_ok, other=float("inf"))   # rows past Tq: p = 0
        delta = tl.load(DELTA + bh64 * Tq + offs_m, mask=row_ok, other=0.0)
        c_q = tl.load(Cbh + pos_q * sc_t, mask=row_ok, other=c_ref).to(tl.float32)
    # This launch handles the programs of its mode only (MODE (B, Hq, Mq) int8 from backward.exact_modes:
    # exact when c spreads by more than configs.C_SPAN_LIMIT over the block's rows, or is NaN); the other
    # launch does the rest, so neither kernel carries a branch around its pipelined loops.
    mine, store_ok = launch_owns(tl.load(MODE + bh64 * Mq + m), row_ok, EXACT_C)
    if EXACT_C:
        # idle programs of the exact launch read no q, do (see the dk/dv kernel for the measurements)
        q = load_rows(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d,
                      store_ok, offs_d, False, HEAD_DIM, D_PAD)           # (BM, D_PAD)
        do = load_rows(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_dv[None, :] * sdo_d,
                       store_ok, offs_dv, False, HEAD_DIM_V, DV_PAD)

    # Last key block with a causal entry (that of the last valid row), and the key blocks every row sees in full.
    last_pos = tl.minimum((m + 1) * BLOCK_M, Tq) - 1 + q_shift
    n_end = last_pos // BLOCK_N + 1
    n_full = tl.minimum((m * BLOCK_M + q_shift + 1) // BLOCK_N, n_end)
    if PRUNE:
        n_start = tl.load(START + bh64 * Mq + m)
    else:
        n_start = 0
    n_start = tl.where(mine, n_start, n_end)                                # not mine: no tile
    if HAS_SEG:
        KVb = KV + b * Tk
        lo_q = tl.load(LO + b * Tk + pos_q, mask=row_ok, other=0)           # (BM,)
    else:
        KVb = KV
        lo_q = 0
    if RECORDED:
        keep_from = tl.load(KEEP + bh64 * Tq + offs_m, mask=row_ok, other=0)   # (BM,) int32
        # key blocks from n_whole on are kept whole by every row: no per-entry mask there
        n_whole = tl.minimum(tl.maximum((tl.max(keep_from, axis=0) + BLOCK_N - 1) // BLOCK_N, n_start), n_full)
    else:
        keep_from = tl.zeros((BLOCK_M,), tl.int32)
        n_whole = n_start
    Kb = K + b * sk_b + hk * sk_h
    Vb = V + b * sv_b + hk * sv_h
    dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    rs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if EXACT_C:
        r = c_q
    else:
        r = (c_q - c_ref) * LOG2E - lse2                       # (BM,) row term, log2 units
    if RECORDED:                                           # the one or two tiles the boundary crosses
        dq, rs = _dq_tiles(dq, rs, q, do, r, lse2, delta, pos_q, Kb, Vb, Cbh, c_ref, sk_t, sk_d,
                           sv_t, sv_d, sc_t, n_start, n_whole, Tk, qk_scale, keep_from, RECORDED=True, MASKED=False,
                           KEYS_EVEN=True, EXACT_C=EXACT_C, DOT_PRECISION=DOT_PRECISION, HEAD_DIM=HEAD_DIM,
                           BLOCK_N=BLOCK_N, D_PAD=D_PAD, HEAD_DIM_V=HEAD_DIM_V, DV_PAD=DV_PAD,
                           KVb=KVb, lo_q=lo_q, HAS_SEG=HAS_SEG)
    dq, rs = _dq_tiles(dq, rs, q, do, r, lse2, delta, pos_q, Kb, Vb, Cbh, c_ref, sk_t, sk_d,
                       sv_t, sv_d, sc_t, n_whole, n_full, Tk, qk_scale, keep_from, RECORDED=False, MASKED=False,
                       KEYS_EVEN=True, EXACT_C=EXACT_C, DOT_PRECISION=DOT_PRECISION, HEAD_DIM=HEAD_DIM,
                       BLOCK_N=BLOCK_N, D_PAD=D_PAD, HEAD_DIM_V=HEAD_DIM_V, DV_PAD=DV_PAD,
                       KVb=KVb, lo_q=lo_q, HAS_SEG=HAS_SEG)
    dq, rs = _dq_tiles(dq, rs, q, do, r, lse2, delta, pos_q, Kb, Vb, Cbh, c_ref, sk_t, sk_d,
                       sv_t, sv_d, sc_t, tl.maximum(n_start, n_full), n_end, Tk, qk_scale, keep_from,
                       RECORDED=RECORDED, MASKED=True,
                       KEYS_EVEN=EVEN_N, EXACT_C=EXACT_C, DOT_PRECISION=DOT_PRECISION, HEAD_DIM=HEAD_DIM,
                       BLOCK_N=BLOCK_N, D_PAD=D_PAD, HEAD_DIM_V=HEAD_DIM_V, DV_PAD=DV_PAD,
                       KVb=KVb, lo_q=lo_q, HAS_SEG=HAS_SEG)
    dq = dq * sm_scale
    store_rows(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :] * sdq_d,
               dq.to(DQ.dtype.element_ty), store_ok, offs_d, False, HEAD_DIM, D_PAD)
    # The row term of dc: dc[p_i] += sum_j dS_ij. The dk/dv kernel ran before on the same stream and
    # wrote the column terms; each position p_i belongs to this program alone (no atomics).
    dc_ptrs = DC + b * sdc_b + h * sdc_h + pos_q * sdc_t
    tl.store(dc_ptrs, tl.load(dc_ptrs, mask=store_ok, other=0.0) + rs, mask=store_ok)


@triton.jit
def fox_bwd_dq_kernel(
    Q, K, V, C, DO, LSE2, DELTA, START, KEEP, MODE, ANY, DQ, DC, KV, LO,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sc_b, sc_h, sc_t,
    sdo_b, sdo_h, sdo_t, sdo_d,
    sdq_b, sdq_h, sdq_t, sdq_d,
    sdc_b, sdc_h, sdc_t,
    Hq, Tq, Tk, Mq, sm_scale, qk_scale, BH,
    GROUP: tl.constexpr, PRUNE: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    EXACT_C: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, HAS_SEG: tl.constexpr,
    RECORDED: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """Grid (BH = B * Hq, Mq): one program per tile. PERSISTENT (the exact launch): a 1-D grid of a few
    programs that walk all BH * Mq tiles, batch-head fastest. That launch is idle for almost every tile
    (W1: all), and an idle tile of a per-tile grid still costs a CTA of this register-heavy kernel
    (0.08-0.1 ms per launch at W1 16k on the H200); walking costs a load of c per idle tile."""
    if PERSISTENT:
        # ANY (1,) int32: 1 when some program is exact, else the walk is empty (the usual case)
        for t in range(tl.program_id(0), tl.load(ANY) * (BH * Mq), tl.num_programs(0)):
            _dq_program(
                t % BH, t // BH,
                Q, K, V, C, DO, LSE2, DELTA, START, KEEP, MODE, ANY, DQ, DC, KV, LO, sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t,
                sk_d, sv_b, sv_h, sv_t, sv_d, sc_b, sc_h, sc_t, sdo_b, sdo_h, sdo_t, sdo_d, sdq_b, sdq_h,
                sdq_t, sdq_d, sdc_b, sdc_h, sdc_t, Hq, Tq, Tk, Mq, sm_scale, qk_scale, GROUP, PRUNE,
                DOT_PRECISION, HEAD_DIM, EVEN_M, EVEN_N, BLOCK_M, BLOCK_N, D_PAD, EXACT_C,
                HEAD_DIM_V, DV_PAD, HAS_SEG, RECORDED,
            )
    else:
        _dq_program(
            tl.program_id(0), tl.program_id(1),
            Q, K, V, C, DO, LSE2, DELTA, START, KEEP, MODE, ANY, DQ, DC, KV, LO, sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t,
            sk_d, sv_b, sv_h, sv_t, sv_d, sc_b, sc_h, sc_t, sdo_b, sdo_h, sdo_t, sdo_d, sdq_b, sdq_h,
            sdq_t, sdq_d, sdc_b, sdc_h, sdc_t, Hq, Tq, Tk, Mq, sm_scale, qk_scale, GROUP, PRUNE,
            DOT_PRECISION, HEAD_DIM, EVEN_M, EVEN_N, BLOCK_M, BLOCK_N, D_PAD, EXACT_C,
            HEAD_DIM_V, DV_PAD, HAS_SEG, RECORDED,
        )
