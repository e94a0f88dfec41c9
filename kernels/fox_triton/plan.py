"""The ACP plan on the device in Triton: per (batch, head) bound U, threshold delta, start and end.

Same semantics as kernels/plan.py's make_plan (read its header for the math); notation:
  q (B, Hq, Tq, D), k (B, Hkv, Tk, D), c (B, Hq, Tk) cumulative log forget gate, G = Hq // Hkv
  Mq = ceil(Tq / BM) query blocks, Nk = ceil(Tk / BN) key blocks; query i sits at p_i = Tk - Tq + i
  U        scale * max_i ||q_i|| * max_j ||k_j||   (or the caller's u_bound)
  delta    threshold_offset - 2U with threshold_offset = log_eps - log Tk (kernels/threshold.py; fp32,
           the same expression as the torch plan); -inf (no pruning for that head) when U is
           negative or NaN
  skip(m,n)  (max_{i in m} c[a_i]) - (min_{j in n} c[j]) < delta,  a_i = p_i, or with segments
             (padded / packed batches, kernels/segments.py) the row's anchor ANCHOR[b, i], its newest
             visible key (-1: no visible key, the row then keeps nothing on its own)
  start[m] = min(n_hi(m) + 1, first n with not skip(m, n)), and with segments at least
             LO[b, p_first(m)] // BN (key blocks of earlier documents)    (B, Hq, Mq) int32
  end[n]   = 1 + max{m : start[m] <= n <= n_hi(m)}, 0 if none      (B, Hq, Nk) int32

Launches (static grids, no host synchronisation, CUDA-graph safe):
  1. triton_qk_bound, only when U is computed from the data: _row_norm_partials, grid (chunks, Hq + Hkv, B),
     where each program takes ROWS rows of q or k and writes the largest row norm of its chunk (fp32),
     then two small torch reductions to U (B, Hq). The op calls it once per forward and hands U to
     the backward.
  2. _plan_kernel        grid (Hq, B): reads U, then writes start for every query block and, after
     a barrier, end for every key block (reading start back).
Pruning off (log_eps None or -inf): no launch at all; start = 0 and end = Mq (every tile kept); with
segments the plan kernel still runs, with delta = -inf, for the document starts.

The norms are summed in a different order than torch.linalg.vector_norm, so U (and delta) may differ
from the torch plan in the last bit; with the same u_bound the two plans are identical.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from acp_compile.kernels.fox_triton.configs import padded_head_dim
from acp_compile.kernels.threshold import pruning_enabled, threshold_offset

NORM_ROWS = 64          # rows of q or k per program of the norm pass
PLAN_CHUNK_M = 32       # query blocks per step of the plan program
PLAN_CHUNK_N = 64       # key blocks per step of the plan program


@triton.jit
def _store_chunk_max_norm(base, s_t, s_d, T, out, chunk, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr):
    d = tl.arange(0, D_PAD)
    r = tl.arange(0, ROWS)
    row0 = chunk * ROWS
    ptrs = base + row0.to(tl.int64) * s_t + r[:, None] * s_t + d[None, :] * s_d
    mask = ((row0 + r)[:, None] < T) & (d[None, :] < HEAD_DIM)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)          # (ROWS, D_PAD)
    norms = tl.sqrt(tl.sum(x * x, axis=1))                            # (ROWS,)
    tl.store(out, tl.max(norms, axis=0))                              # 0 for a chunk past T


@triton.jit
def _row_norm_partials(
    Q, K, QPART, KPART,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    Hq, Hkv, Tq, Tk, n_chunks,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr,
):
    chunk = tl.program_id(0)
    head = tl.program_id(1)          # 0 .. Hq-1: q heads; Hq .. Hq+Hkv-1: k heads
    b = tl.program_id(2).to(tl.int64)
    if head < Hq:
        _store_chunk_max_norm(Q + b * sq_b + head.to(tl.int64) * sq_h, sq_t, sq_d, Tq,
                              QPART + (b * Hq + head) * n_chunks + chunk, chunk, HEAD_DIM, D_PAD, ROWS)
    else:
        hk = head - Hq
        _store_chunk_max_norm(K + b * sk_b + hk.to(tl.int64) * sk_h, sk_t, sk_d, Tk,
                              KPART + (b * Hkv + hk) * n_chunks + chunk, chunk, HEAD_DIM, D_PAD, ROWS)


@triton.jit
def _plan_kernel(
    C, U, START, END, ANCHOR, LO,
    sc_b, sc_h, sc_t, su_b, su_h,
    Hq, Tq, Tk, Mq, Nk,
    threshold_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_END: tl.constexpr,
    CHUNK_M: tl.constexpr, CHUNK_N: tl.constexpr, HAS_SEG: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    bh = b.to(tl.int64) * Hq + h
    u = tl.load(U + b.to(tl.int64) * su_b + h * su_h).to(tl.float32)
    delta = threshold_offset - 2.0 * u                  # kernels/threshold.py: threshold_delta
    delta = tl.where(u >= 0, delta, float("-inf"))      # negative or NaN U: pruning off for this head

    c_base = C + b.to(tl.int64) * sc_b + h.to(tl.int64) * sc_h
    offset = Tk - Tq
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    # start[m] for every query block, CHUNK_M blocks at a time
    for m0 in range(0, Mq, CHUNK_M):
        ms = m0 + tl.arange(0, CHUNK_M)                                    # (CM,)
        qi = ms[:, None] * BLOCK_M + rm[None, :]                           # (CM, BM) query index
        if HAS_SEG:                                                        # c at each row's anchor
            a = tl.load(ANCHOR + b.to(tl.int64) * Tq + qi, mask=qi < Tq, other=-1)
            cq = tl.load(c_base + a * sc_t, mask=(qi < Tq) & (a >= 0), other=float("-inf")).to(tl.float32)
        else:
            cq = tl.load(c_base + (offset + qi) * sc_t, mask=qi < Tq, other=float("-inf")).to(tl.float32)
        c_max_q = tl.max(cq, axis=1)                                        # (CM,)
        last_row = tl.minimum((ms + 1) * BLOCK_M, Tq) - 1
        n_hi = (offset + last_row) // BLOCK_N                               # (CM,)
        first_kept = n_hi + 1
        for n0 in range(0, Nk, CHUNK_N):
            ns = n0 + tl.arange(0, CHUNK_N)                                 # (CN,)
            kj = ns[:, None] * BLOCK_N + rn[None, :]                        # (CN, BN) key index
            ck = tl.load(c_base + kj * sc_t, mask=kj < Tk, other=float("inf")).to(tl.float32)
            c_min_k = tl.min(ck, axis=1)                                    # (CN,)
            skip = (c_max_q[:, None] - c_min_k[None, :]) < delta            # (CM, CN)
            cand = tl.where(skip | (ns[None, :] >= Nk), 2147483647, ns[None, :])
            first_kept = tl.minimum(first_kept, tl.min(cand, axis=1))
        if HAS_SEG:                        # key blocks before the first row's document: no row sees them
            lo_first = tl.load(LO + b.to(tl.int64) * Tk + offset + ms * BLOCK_M, mask=ms < Mq, other=0)
            first_kept = tl.maximum(first_kept, lo_first // BLOCK_N)
        tl.store(START + bh * Mq + ms, first_kept.to(tl.int32), mask=ms < Mq)
    if WRITE_END:
        tl.debug_barrier()   # start written by all threads of this program before they read it back
        _write_end(START, END, bh, Tq, Tk, Mq, Nk, offset, BLOCK_M, BLOCK_N, CHUNK_M, CHUNK_N)


@triton.jit
def _write_end(START, END, bh, Tq, Tk, Mq, Nk, offset,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_M: tl.constexpr, CHUNK_N: tl.constexpr):
    """end[n] = 1 + last m with start[m] <= n <= n_hi(m), 0 if none."""
    for n0 in range(0, Nk, CHUNK_N):
        ns = n0 + tl.arange(0, CHUNK_N)
        last = tl.zeros((CHUNK_N,), tl.int32)
        for m0 in range(0, Mq, CHUNK_M):
            ms = m0 + tl.arange(0, CHUNK_M)
            st = tl.load(START + bh * Mq + ms, mask=ms < Mq, other=2147483647)
            last_row = tl.minimum((ms + 1) * BLOCK_M, Tq) - 1
            n_hi = (offset + last_row) // BLOCK_N
            kept = (st[:, None] <= ns[None, :]) & (ns[None, :] <= n_hi[:, None]) & (ms[:, None] < Mq)
            last = tl.maximum(last, tl.max(tl.where(kept, ms[:, None] + 1, 0), axis=0))
        tl.store(END + bh * Nk + ns, last, mask=ns < Nk)


@triton.jit
def _nonfinite_flag_kernel(
    V, FLAG, sv_b, sv_h, sv_t, sv_d, Hkv, T,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr,
):
    """FLAG[b, hk, d] = NaN when rows chunk*ROWS .. of v[b, hk, :, d] hold a NaN or an infinity (FLAG
    starts at 0; programs that find one all store the same NaN, so no atomics are needed)."""
    chunk = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, D_PAD)
    r = tl.arange(0, ROWS)
    row0 = chunk * ROWS
    ptrs = V + b * sv_b + hk.to(tl.int64) * sv_h + row0.to(tl.int64) * sv_t + r[:, None] * sv_t + d[None, :] * sv_d
    mask = ((row0 + r)[:, None] < T) & (d[None, :] < HEAD_DIM)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    bad = tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=0)          # (D_PAD,)
    tl.store(FLAG + (b * Hkv + hk) * HEAD_DIM + d, tl.full((D_PAD,), float("nan"), tl.float32),
             mask=(bad > 0) & (d < HEAD_DIM))


def nonfinite_flag(v: Tensor, n_q_heads: int) -> Tensor:
    """(B, Hq, D) fp32: NaN in column d for each query head whose kv head's v holds a non-finite value
    in column d, else 0. One pass over v (grid (chunks, Hkv, B)) after one fill; no host sync."""
    B, Hkv, T, D = v.shape
    n_chunks = num_blocks(T, NORM_ROWS)
    flag = torch.zeros((B, Hkv, D), dtype=torch.float32, device=v.device)
    _nonfinite_flag_kernel[(n_chunks, Hkv, B)](
        v, flag, *v.stride(), Hkv, T, HEAD_DIM=D, D_PAD=padded_head_dim(D), ROWS=NORM_ROWS, num_warps=4,
    )
    if n_q_heads == Hkv:
        return flag
    return flag[:, :, None].expand(B, Hkv, n_q_heads // Hkv, D).reshape(B, n_q_heads, D)


def num_blocks(t: int, block: int) -> int:
    return -(-t // block)


def triton_qk_bound(q: Tensor, k: Tensor, sm_scale: float) -> Tensor:
    """U = scale * max_i ||q_i|| * max_j ||k_j|| per (batch, query head), (B, Hq) fp32 on the device:
    the norm pass, then two small reductions."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    n_chunks = num_blocks(max(Tq, Tk), NORM_ROWS)
    q_part = torch.empty((B, Hq, n_chunks), dtype=torch.float32, device=q.device)
    k_part = torch.empty((B, Hkv, n_chunks), dtype=torch.float32, device=q.device)
    _row_norm_partials[(n_chunks, Hq + Hkv, B)](
        q, k, q_part, k_part, *q.stride(), *k.stride(), Hq, Hkv, Tq, Tk, n_chunks,
        HEAD_DIM=D, D_PAD=padded_head_dim(D), ROWS=NORM_ROWS, num_warps=4,
    )
    # (B, Hkv) -> (B, Hq) by expand + reshape: repeat_interleave would sync with the host.
    k_max = k_part.amax(dim=-1)[:, :, None].expand(B, Hkv, Hq // Hkv).reshape(B, Hq)
    return (float(sm_scale) * q_part.amax(dim=-1)) * k_max


def compute_plan(
    q: Tensor, k: Tensor, c: Tensor, sm_scale: float, log_eps: float | None, u_bound: Tensor | None,
    block_m: int, block_n: int, with_end: bool = True, seg=None,
) -> tuple[Tensor, Tensor | None]:
    """start (B, Hq, Mq) and end (B, Hq, Nk), int32 on q's device; see the module header.
    with_end=False (the forward needs only start) skips the end pass and returns end None.
    seg: kernels/segments.py's Segments of a padded or packed batch, or None."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    Mq, Nk = num_blocks(Tq, block_m), num_blocks(Tk, block_n)
    if not pruning_enabled(log_eps) and seg is None:
        start = torch.zeros((B, Hq, Mq), dtype=torch.int32, device=q.device)
        end = torch.full((B, Hq, Nk), Mq, dtype=torch.int32, device=q.device) if with_end else None
        return start, end
    start = torch.empty((B, Hq, Mq), dtype=torch.int32, device=q.device)
    end = torch.empty((B, Hq, Nk), dtype=torch.int32, device=q.device) if with_end else None
    if not pruning_enabled(log_eps):                   # segments only: U = -1 gives delta = -inf
        u, offset = torch.full((B, Hq), -1.0, dtype=torch.float32, device=q.device), 0.0
    else:
        if u_bound is None:
            u_bound = triton_qk_bound(q, k, sm_scale)
        u, offset = u_bound.to(device=q.device, dtype=torch.float32).expand(B, Hq), threshold_offset(log_eps, Tk)
    anchor, lo = (seg.anchor, seg.lo) if seg is not None else (start, start)
    _plan_kernel[(Hq, B)](
        c, u, start, end if with_end else start, anchor, lo,
        *c.stride(), *u.stride(),
        Hq, Tq, Tk, Mq, Nk, offset,
        BLOCK_M=block_m, BLOCK_N=block_n, WRITE_END=with_end,
        CHUNK_M=PLAN_CHUNK_M, CHUNK_N=PLAN_CHUNK_N, HAS_SEG=seg is not None, num_warps=4,
    )
    return start, end
