"""Per-block reductions along the last axis, the one helper the plans, the certificate and the backward share.

    block_max(x, block), block_min(x, block)    (..., T) -> (..., ceil(T / block))
    block_spread(x, block)                      block_max - block_min

The last block is padded with the value that never wins (-inf / +inf for floats, -/+ 2^(bits - 2) for
integers, beyond any index), so a partial block reduces over its real entries only; NaN stays NaN.
Device ops, no host sync.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _blocks(x: Tensor, block: int, pad_max: bool) -> Tensor:
    T = x.shape[-1]
    nb = -(-T // block)
    if x.dtype.is_floating_point:
        pad = float("-inf") if pad_max else float("inf")
    else:
        # F.pad takes its value as a double: 2^(bits-2) is exact there (the limits themselves round out of range)
        big = 1 << (torch.iinfo(x.dtype).bits - 2)
        pad = -big if pad_max else big
    return torch.nn.functional.pad(x, (0, nb * block - T), value=pad).view(*x.shape[:-1], nb, block)


def block_max(x: Tensor, block: int) -> Tensor:
    return _blocks(x, block, pad_max=True).amax(dim=-1)


def block_min(x: Tensor, block: int) -> Tensor:
    return _blocks(x, block, pad_max=False).amin(dim=-1)


def block_spread(x: Tensor, block: int) -> Tensor:
    return block_max(x, block) - block_min(x, block)
