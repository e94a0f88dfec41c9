"""FoX attention backward with ACP on Triton: Delta preprocess, dk/dv/dc kernel, dq kernel.

  backward(do, q, k, v, c, o, lse, sm_scale, log_eps, u_bound) -> (dq, dk, dv, dc)

Shapes: q, dq (B, Hq, Tq, D); do, o (B, Hq, Tq, Dv); k, dk (B, Hkv, Tk, D); v, dv (B, Hkv, Tk, Dv)
(the value head dim Dv may differ from D); c, dc (B, Hq, Tk) (dc in c's
dtype, accumulated in fp32); lse (B, Hq, Tq) fp32 natural log, as written by the forward. Outputs are
`empty_like` the matching input (strides kept); any input strides work. Queries are the last Tq of the
Tk positions.

Steps (five launches plus the plan; nothing synchronises with the host, no atomics, so the
gradients are bitwise reproducible from run to run):
  1. Delta_i = rowsum(do_i * o_i) and lse2_i = lse_i log2(e), fp32 (B, Hq, Tq)   (preprocess kernel below)
  2. dk, dv and the column term of dc, dc_j = -sum_i dS_ij: one program per (b, kv head, key block)
                                                                   (backward_dkdv.py)
  3. dq and the row term of dc, dc[p_i] += sum_j dS_ij: one program per (b, query head, query block),
     after step 2 on the same stream                               (backward_dq.py)
  Steps 2 and 3 each launch twice: the one-FMA form for programs whose fixed block of c spreads by at
  most C_SPAN_LIMIT (configs.py), the exact per-entry c_i - c_j for the rest; a program of the other
  mode computes nothing and stores nothing.
The row term is zero for the exact O, not for O rounded to bf16 (Delta is then off by e_i); dropping
it let the error of d log f (the reverse cumulative sum of dc) grow with T. With both terms formed from
the same Delta the e_i cancel in the suffix sums except for rows that attend across the position.
Which entries: the op hands the backward the kept set its forward recorded, keep_from (B, Hq, Tq)
int32 (the first kept key of each row, either certificate). Each kernel then gets start/end for its
own partition from kernels/recorded.py (every tile holding a kept entry, a few device ops, no host
sync) and masks the entries j < keep_from[i] inside the tiles the boundary crosses (RECORDED; the
tiles every row keeps whole, from recorded.whole_from on, skip that mask), so both kernels compute
exactly the forward's kept set with the forward's lse, whatever the partitions: forward and backward
agree on every skipped entry, and the gradient is the exact gradient of the forward's pruned attention.
Without keep_from (a direct call) the paper plan is computed per partition, as described next; the
ACP plan then comes from kernels/fox_triton/plan.py (on the device, no host sync).

Tile partition and the eps bound (keep_from None): each kernel has its own (BLOCK_M, BLOCK_N), which may differ
from the forward's. The dk/dv kernel uses the ACP plan of exactly its partition; when the dq tiles
nest in it (BackwardConfig.shares_plan, true for every shipped configuration) the dq kernel's
start indices are derived from that plan by coarsen_start (three tiny device ops instead of a
second plan launch; it keeps the union of the plan tiles a dq block overlaps, a superset of what
the plan keeps), else the plan of its own partition is computed. Every plan is safe on its own:
an entry that a plan skips has c_i - c_j < delta, hence P_ij <= exp(2U + delta) = eps / Tk, so
a backward tile set that differs from the forward's changes each P_ij it drops or adds by at
most eps / Tk per entry and each row's mass by at most eps. The gradients therefore differ from
the exact gradient of the forward's pruned attention by the same eps-level amount that separates
that attention from dense attention. With equal partitions the backward visits exactly the
forward's tiles and is the exact gradient of the pruned attention (what the tight tests check).

Dtypes: fp16/bf16 use tensor-core dots with fp32 accumulation. fp32 inputs run their dots in
TF32 like the forward (support.py documents it); ACP_TRITON_FP32_DOT=ieee or tf32x3 picks a more
exact precision. Head dims D and Dv 1..256 each (padded to powers of two >= 16). What the kernels cover, and
the switch that runs them on CPU tensors under the interpreter, is decided in support.py.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from acp_compile.kernels import observe
from acp_compile.kernels.blocks import block_spread
from acp_compile.kernels.fox_triton.backward_dkdv import fox_bwd_dkdv_kernel
from acp_compile.kernels.fox_triton.backward_dq import fox_bwd_dq_kernel
from acp_compile.kernels.fox_triton.common import LOG2E
from acp_compile.kernels.fox_triton.configs import c_span_limit, padded_head_dim
from acp_compile.kernels.recorded import covering_indices, recorded_aligned, whole_from
from acp_compile.kernels.threshold import pruning_enabled

MAX_HEAD_DIM = 256
logger = logging.getLogger("acp_compile")


@dataclass(frozen=True)
class BackwardConfig:
    """Tile sizes, warps and pipeline stages of the two main kernels (defaults: the H200 D = 128 row)."""
    kv_block_m: int = 64     # dk/dv kernel: query rows streamed per step
    kv_block_n: int = 128    # dk/dv kernel: keys held by one program
    q_block_m: int = 128     # dq kernel: query rows held by one program
    q_block_n: int = 32      # dq kernel: keys streamed per step
    kv_warps: int = 8
    kv_stages: int = 3
    q_warps: int = 4
    q_stages: int = 3
    pre_block_m: int = 64    # Delta preprocess rows per program

    @property
    def shares_plan(self) -> bool:
        """dq tiles are unions of whole dk/dv tiles along the query axis and pieces of one along the
        key axis, so the dq start indices can be derived from the dk/dv plan (coarsen_start)."""
        return self.q_block_m % self.kv_block_m == 0 and self.kv_block_n % self.q_block_n == 0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Measured on an H200 (torch 2.11, triton 3.6) by examples/benchmarks/tune_backward.py on W1-like
# inputs (bf16, B * T = 32768, T = 4k and 16k): the best sum of dense and ACP times per kernel.
HOPPER_D64 = BackwardConfig(32, 128, 128, 64, 4, 3, 4, 3)
# dq of the D = 128 row re-swept after the dc row term (examples/benchmarks/sweep_dq.py, W1 16k,
# 2026-12-02): 128 x 32 with 4 warps spilled (255 registers, 66 spills) and took 6.43 ms dense;
# 128 x 64 with 8 warps takes 5.59 ms (228 registers, no spill).
HOPPER_D128 = BackwardConfig(64, 128, 128, 64, 8, 3, 8, 3)
# Not tuned (correct on the H200; no Ampere GPU was available): small tiles that fit 164 KiB of
# shared memory on Ampere and the 256-wide head dim / 4-byte elements on Hopper.
SMALL_TILES = BackwardConfig(32, 64, 64, 32, 4, 2, 4, 2)
AMPERE_D64 = BackwardConfig(32, 128, 128, 32, 4, 2, 4, 2)
INTERPRETER = BackwardConfig(32, 32, 32, 32, 4, 1, 4, 1, 32)
# Used when a configuration does not compile for the device (Triton's OutOfResources).
FALLBACK = BackwardConfig(16, 32, 32, 16, 4, 1, 4, 1, 32)


def parse_backward_override(text: str) -> BackwardConfig:
    """"64,128,128,32,8,3,4,3" -> BackwardConfig in field order (kv_block_m, kv_block_n, q_block_m,
    q_block_n, kv_warps, kv_stages, q_warps, q_stages[, pre_block_m])."""
    try:
        fields = [int(x) for x in text.split(",")]
    except ValueError:
        fields = []
    if len(fields) not in (8, 9):
        raise ValueError(f"ACP_BWD_CONFIG={text!r}: expected 8 or 9 comma-separated integers in the order of "
                         "BackwardConfig's fields (kv_block_m, kv_block_n, q_block_m, q_block_n, kv_warps, "
                         "kv_stages, q_warps, q_stages[, pre_block_m])")
    return BackwardConfig(*fields)


def default_config(q: torch.Tensor, dv: int | None = None) -> BackwardConfig:
    """Tile sizes by device, head dim (the larger of D and dv; dv None: D) and element size. Every entry
    satisfies shares_plan. The environment variable ACP_BWD_CONFIG (parse_backward_override) replaces
    the table for 16-bit CUDA inputs: the benchmarks' tuning hook, as ACP_FWD_CONFIG for the forward."""
    D = max(q.shape[-1], q.shape[-1] if dv is None else dv)
    if _interpreting() or q.device.type != "cuda":
        return INTERPRETER
    override = os.environ.get("ACP_BWD_CONFIG")
    if override and q.element_size() == 2:
        return parse_backward_override(override)
    if q.element_size() >= 4 or D > 128:
        return SMALL_TILES
    major, _ = torch.cuda.get_device_capability(q.device)
    if major >= 9:
        return HOPPER_D64 if D <= 64 else HOPPER_D128
    return AMPERE_D64 if D <= 64 else SMALL_TILES


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return os.environ.get("ACP_TRITON_FP32_DOT", "tf32")
    return "tf32"   # ignored for 16-bit inputs


@triton.jit
def fox_bwd_preprocess_kernel(
    O, DO, LSE, DELTA, LSE2,
    so_b, so_h, so_t, so_d,
    sdo_b, sdo_h, sdo_t, sdo_d,
    sl_b, sl_h, sl_t,
    Hq, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """Delta_i = sum_d o_id do_id (d < Dv = HEAD_DIM here) and lse2_i = lse_i log2(e) (+inf where lse is
    -inf: no visible key): (B, Hq, Tq) fp32 contiguous.
    Grid (ceil(Tq / BLOCK_M), B * Hq)."""
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < Tq
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :] * so_d,
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :] * sdo_d,
                 mask=ok, other=0.0).to(tl.float32)
    lse = tl.load(LSE + b * sl_b + h * sl_h + offs_m * sl_t, mask=row_ok, other=0.0)
    out = bh.to(tl.int64) * Tq + offs_m
    tl.store(DELTA + out, tl.sum(o * do, axis=1), mask=row_ok)
    # lse = -inf: a row with no visible key (padded batches); lse2 = +inf makes its p exactly 0
    tl.store(LSE2 + out, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=row_ok)


def _persistent_grid(tiles: int, device: torch.device) -> tuple[int]:
    """The exact launches walk their tiles with a few programs (kernels' PERSISTENT): two per SM on a
    GPU, three under the interpreter (so its tests cover programs that walk several tiles)."""
    if device.type != "cuda":
        return (max(1, min(tiles, 3)),)
    return (max(1, min(tiles, 2 * _sm_count(device.index))),)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).multi_processor_count


@dataclass(frozen=True)
class ExactModes:
    """Which programs of each kernel take the exact form (int8 0/1), and whether any does ((1,) int32)."""
    kv: torch.Tensor        # (B, Hkv, Nk): dk/dv programs, key blocks of kv_block_n
    kv_any: torch.Tensor
    q: torch.Tensor         # (B, Hq, Mq): dq programs, query blocks of q_block_m
    q_any: torch.Tensor


def exact_modes(c: torch.Tensor, Tq: int, Hkv: int, cfg: BackwardConfig) -> ExactModes:
    """A program is exact when c spreads by more than configs.C_SPAN_LIMIT over its fixed block (dk/dv:
    the key block, in any query head of the kv group; dq: the block's query rows), or the spread is
    NaN. Computed once per backward with a few device ops on c (no host sync); the two launches of
    each kernel read the same flags, so each program is owned by exactly one of them, and the exact
    launch walks nothing when no flag is set (the usual case: 0.1-0.17 ms per launch saved at W1 16k)."""
    B, Hq, Tk = c.shape
    limit = c_span_limit()
    cf = c.to(torch.float32)
    kv_spread = block_spread(cf, cfg.kv_block_n)                                   # (B, Hq, Nk)
    kv_spread = kv_spread.view(B, Hkv, Hq // Hkv, -1).amax(dim=2)                   # (B, Hkv, Nk)
    q_spread = block_spread(cf[..., Tk - Tq:], cfg.q_block_m)                      # (B, Hq, Mq)
    kv = (~(kv_spread <= limit)).to(torch.int8).contiguous()                        # NaN: exact
    q = (~(q_spread <= limit)).to(torch.int8).contiguous()
    return ExactModes(kv, kv.amax().to(torch.int32).reshape(1), q, q.amax().to(torch.int32).reshape(1))


def plan_indices(q, k, c, sm_scale, log_eps, u_bound, block_m, block_n, seg=None):
    """(start (B, Hq, Mq), end (B, Hq, Nk)) int32 contiguous: the device plan for this partition."""
    from acp_compile.kernels.fox_triton.plan import compute_plan
    start, end = compute_plan(q, k, c, sm_scale, log_eps, u_bound, block_m, block_n, seg=seg)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def preprocess(do, o, lse, block_m: int = 64):
    """(delta, lse2): both (B, Hq, Tq) fp32 contiguous; o, do (B, Hq, Tq, Dv)."""
    B, Hq, Tq, D = o.shape
    delta = torch.empty((B, Hq, Tq), device=o.device, dtype=torch.float32)
    lse2 = torch.empty((B, Hq, Tq), device=o.device, dtype=torch.float32)
    fox_bwd_preprocess_kernel[(triton.cdiv(Tq, block_m), B * Hq)](
        o, do, lse, delta, lse2, *o.stride(), *do.stride(), *lse.stride(), Hq, Tq,
        HEAD_DIM=D, BLOCK_M=block_m, D_PAD=padded_head_dim(D),
    )
    return delta, lse2


def launch_dkdv(q, k, v, c, do, row, delta, start, end, dk, dv, dc, sm_scale: float, cfg: BackwardConfig,
                exact: bool = False, seg=None, keep_from=None, whole=None, modes=None, mask_entries: bool = True,
                active=None):
    """dk (B, Hkv, Tk, D), dv (B, Hkv, Tk, Dv) and dc (B, Hq, Tk) fp32, written in place. start/end None: dense.
    keep_from (B, Hq, Tq) int32 contiguous: the forward's recorded kept set, masked per entry (with start/end
    from kernels/recorded.py for this partition); whole: recorded.whole_from for this partition (computed
    here when not given); modes: exact_modes(...) of this call (computed here when not given).
    mask_entries False: the kernel takes the covering tiles as the kept set (right when recorded_aligned).
    active (1,) int32: the launch runs only where it is nonzero (default: the exact launch when some
    program is exact, the one-FMA launch always).
    Returns Triton's launch handle (its n_regs / n_spills are read by the tuning script)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bm, bn = cfg.kv_block_m, cfg.kv_block_n
    Mq, Nk = triton.cdiv(Tq, bm), triton.cdiv(Tk, bn)
    prune = start is not None
    kv_arg, lo_arg = (seg.key_valid.view(torch.uint8), seg.lo) if seg is not None else (delta, delta)
    grid = _persistent_grid(B * Hkv * Nk, q.device) if exact else (B * Hkv, Nk)
    recorded = prune and keep_from is not None and mask_entries
    if recorded and whole is None:
        whole = whole_from(keep_from, bm, bn)
    modes = exact_modes(c, Tq, Hkv, cfg) if modes is None else modes
    if active is None:
        active = modes.kv_any if exact else torch.ones(1, dtype=torch.int32, device=q.device)
    return fox_bwd_dkdv_kernel[grid](
        q, k, v, c, do, row, delta, start if prune else delta, end if prune else delta,
        keep_from if keep_from is not None else delta, whole if recorded else delta, modes.kv, active,
        dk, dv, dc, kv_arg, lo_arg,
        *q.stride(), *k.stride(), *v.stride(), *c.stride(), *do.stride(), *dk.stride(), *dv.stride(), *dc.stride(),
        Hq, Hkv, Tq, Tk, Mq, Nk, sm_scale, sm_scale * LOG2E.value, B * Hkv,
        GROUP=Hq // Hkv, PRUNE=prune, DOT_PRECISION=_dot_precision(q.dtype), HEAD_DIM=D,
        EVEN_M=(Tq % bm == 0), EVEN_N=(Tk % bn == 0), BLOCK_M=bm, BLOCK_N=bn, D_PAD=padded_head_dim(D),
        HEAD_DIM_V=v.shape[3], DV_PAD=padded_head_dim(v.shape[3]), EXACT_C=exact,
        HAS_SEG=seg is not None, RECORDED=recorded, PERSISTENT=exact,
        num_warps=cfg.kv_warps, num_stages=cfg.kv_stages,
    )


def coarsen_start(start: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """start (B, H, M) of a plan with (bm, bn) tiles -> start (B, H, ceil(M / rows)) for tiles of
    (rows * bm, bn / cols): the smallest start of the `rows` plan blocks inside each new block, in
    units of bn / cols keys. It keeps every entry any of those plan blocks keeps (a superset, so it
    stays inside the eps bound), with three small device ops and no host sync."""
    if rows == 1 and cols == 1:
        return start
    B, H, M = start.shape
    pad = (-M) % rows
    if pad:
        start = torch.nn.functional.pad(start, (0, pad), value=2 ** 30)
    return (start.view(B, H, -1, rows).amin(dim=-1) * cols).contiguous()


def launch_dq(q, k, v, c, do, row, delta, start, dq, dc, sm_scale: float, cfg: BackwardConfig, exact: bool = False,
              seg=None, keep_from=None, modes=None):
    """dq (B, Hq, Tq, D) written and the row term added to dc (B, Hq, Tk), in place; run after
    launch_dkdv. start (B, Hq, ceil(Tq / q_block_m)) in q_block_n units, or None: dense. keep_from and
    modes as for launch_dkdv."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bm, bn = cfg.q_block_m, cfg.q_block_n
    Mq = triton.cdiv(Tq, bm)
    prune = start is not None
    kv_arg, lo_arg = (seg.key_valid.view(torch.uint8), seg.lo) if seg is not None else (delta, delta)
    grid = _persistent_grid(B * Hq * Mq, q.device) if exact else (B * Hq, Mq)
    modes = exact_modes(c, Tq, Hkv, cfg) if modes is None else modes
    return fox_bwd_dq_kernel[grid](
        q, k, v, c, do, row, delta, start if prune else delta, keep_from if keep_from is not None else delta,
        modes.q, modes.q_any, dq, dc, kv_arg, lo_arg,
        *q.stride(), *k.stride(), *v.stride(), *c.stride(), *do.stride(), *dq.stride(), *dc.stride(),
        Hq, Tq, Tk, Mq, sm_scale, sm_scale * LOG2E.value, B * Hq,
        GROUP=Hq // Hkv, PRUNE=prune, DOT_PRECISION=_dot_precision(q.dtype), HEAD_DIM=D,
        EVEN_M=(Tq % bm == 0), EVEN_N=(Tk % bn == 0), BLOCK_M=bm, BLOCK_N=bn, D_PAD=padded_head_dim(D),
        HEAD_DIM_V=v.shape[3], DV_PAD=padded_head_dim(v.shape[3]), EXACT_C=exact,
        HAS_SEG=seg is not None, RECORDED=prune and keep_from is not None, PERSISTENT=exact,
        num_warps=cfg.q_warps, num_stages=cfg.q_stages,
    )


def backward(do, q, k, v, c, o, lse, sm_scale: float, log_eps=None, u_bound=None, config: BackwardConfig | None = None,
             keep_from=None, seg=None):
    """Gradients (dq, dk, dv, dc) of FoX attention with ACP; see the module docstring. keep_from (B, Hq,
    Tq) int32: the kept set the forward recorded (computed exactly); None: the paper plan of each
    kernel's partition. seg: padded and packed batches (kernels/segments.py), masked inside the tiles."""
    D = q.shape[-1]
    if max(D, v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"fox_attention Triton backward: head dim {D} or value head dim {v.shape[-1]} > "
                         f"{MAX_HEAD_DIM}; use the blocked path")
    sm_scale = float(1.0 / math.sqrt(D) if sm_scale is None else sm_scale)
    cfg = config or default_config(q, v.shape[-1])
    try:
        return _backward(do, q, k, v, c, o, lse, sm_scale, log_eps, u_bound, cfg, seg, keep_from)
    except OutOfResources as e:
        if cfg == FALLBACK:
            raise
        logger.info("acp_compile: backward tiles %s do not fit this GPU (%s); using %s", cfg, e, FALLBACK)
        return _backward(do, q, k, v, c, o, lse, sm_scale, log_eps, u_bound, FALLBACK, seg, keep_from)


def _backward(do, q, k, v, c, o, lse, sm_scale: float, log_eps, u_bound, cfg: BackwardConfig, seg=None,
              keep_from=None):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dc = torch.empty_like(c, dtype=torch.float32)
    delta, row = preprocess(do, o, lse, cfg.pre_block_m)
    kv_start = kv_end = q_start = whole = None
    if keep_from is not None:                   # the forward's recorded set, in each kernel's partition
        Tk = k.shape[2]
        keep_from = keep_from.to(torch.int32).contiguous()
        kv_start, kv_end, _ = covering_indices(keep_from, Tk, cfg.kv_block_m, cfg.kv_block_n)
        q_start, _, _ = covering_indices(keep_from, Tk, cfg.q_block_m, cfg.q_block_n)
        whole = whole_from(keep_from, cfg.kv_block_m, cfg.kv_block_n)
    elif pruning_enabled(log_eps) or seg is not None:     # segments: skip other documents' tiles even dense
        kv_start, kv_end = plan_indices(q, k, c, sm_scale, log_eps, u_bound, cfg.kv_block_m, cfg.kv_block_n, seg)
        if cfg.shares_plan:
            q_start = coarsen_start(kv_start, cfg.q_block_m // cfg.kv_block_m, cfg.kv_block_n // cfg.q_block_n)
        else:
            q_start, _ = plan_indices(q, k, c, sm_scale, log_eps, u_bound, cfg.q_block_m, cfg.q_block_n, seg)
    # Each kernel runs twice: the one-FMA launch for blocks whose c spreads by at most C_SPAN_LIMIT, the
    # exact launch for the rest (hard resets, steep decays); a program of the other mode stores nothing.
    # A negative limit puts every program in the exact launch (NaN spreads included), so the one-FMA
    # launch would be idle and is not made.
    forms = (True,) if c_span_limit() < 0 else (False, True)
    modes = exact_modes(c, q.shape[2], k.shape[1], cfg)
    observe.emit("backward_exact_modes", kv=modes.kv, q=modes.q)
    for exact in forms:
        args = (q, k, v, c, do, row, delta, kv_start, kv_end, dk, dv, dc, sm_scale, cfg, exact, seg, keep_from, whole,
                modes)
        if exact or keep_from is None:
            launch_dkdv(*args)
        else:
            # The per-entry mask of a recorded set costs the dk/dv kernel registers (it spills) even where no
            # tile needs it; when the set is aligned to this partition (the Triton forward's own sets on
            # the H200 rows) the launch without it runs, else the one with it: chosen on the device.
            aligned = recorded_aligned(keep_from, cfg.kv_block_m, cfg.kv_block_n)
            launch_dkdv(*args, mask_entries=False, active=aligned)
            launch_dkdv(*args, mask_entries=True, active=1 - aligned)
    for exact in forms:                                   # after dk/dv: dq adds the row term to dc
        launch_dq(q, k, v, c, do, row, delta, q_start, dq, dc, sm_scale, cfg, exact, seg, keep_from, modes)
    return dq, dk, dv, dc if c.dtype == torch.float32 else dc.to(c.dtype)
