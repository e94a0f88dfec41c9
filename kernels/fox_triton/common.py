"""Constants and small jit helpers shared by the Triton kernels (forward, backward, plan).

Dialect of every kernel in this folder: strides s<tensor>_<axis> (sq_b, sq_h, sq_t, sq_d; sdo_t ...),
HEAD_DIM the head dim and D_PAD its power-of-two padding (configs.padded_head_dim), PRUNE the
compile-time switch that reads the ACP plan (False: dense, the plan is not read).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)     # log2(e); on the host: LOG2E.value
LN2 = tl.constexpr(0.6931471805599453)       # ln(2)


@triton.jit
def load_rows(ptrs, row_ok, offs_d, ROWS_EVEN: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Loads a (rows, D_PAD) tile, masking only what the specialisation cannot rule out."""
    if ROWS_EVEN and HEAD_DIM == D_PAD:
        x = tl.load(ptrs)
    elif ROWS_EVEN:
        x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    elif HEAD_DIM == D_PAD:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def store_rows(ptrs, x, row_ok, offs_d, ROWS_EVEN: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    if ROWS_EVEN and HEAD_DIM == D_PAD:
        tl.store(ptrs, x)
    elif ROWS_EVEN:
        tl.store(ptrs, x, mask=(offs_d < HEAD_DIM)[None, :])
    elif HEAD_DIM == D_PAD:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def launch_owns(is_exact, ok, EXACT_C: tl.constexpr):
    """(mine, store_ok) of a backward program: its launch (one-FMA or exact form, backward.py) owns it
    when the program's mode flag is_exact (0 or 1, from backward.exact_modes) matches EXACT_C;
    store_ok = ok & mine, per row or key of the block."""
    if EXACT_C:
        mine = is_exact != 0
    else:
        mine = is_exact == 0
    store_ok = (ok.to(tl.int32) * mine.to(tl.int32)) != 0
    return mine, store_ok
