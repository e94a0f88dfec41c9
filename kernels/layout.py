"""Output allocation: o (B, Hq, Tq, Dv) in q's memory layout when Dv differs from q's head dim D.

With Dv == D this is torch.empty_like(q) (strides kept, so a transposed (B, T, H, D) view stays
copy-free); with Dv != D the dimensions are laid out in q's order (outermost = largest stride) with
dense strides, which keeps a (B, T, H, D)-ordered q giving a (B, T, H, Dv)-ordered o.
"""
from __future__ import annotations

import torch
from torch import Tensor


def empty_like_last(x: Tensor, last: int, dtype: torch.dtype | None = None) -> Tensor:
    """An empty tensor of x's shape with the last dim replaced by `last`, in x's dimension order."""
    if last == x.shape[-1]:
        return torch.empty_like(x, dtype=dtype)
    shape = (*x.shape[:-1], last)
    # Outermost first: sort by stride, largest first; ties keep the logical order (stable sort).
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    if order[-1] != x.dim() - 1 and x.stride(-1) == x.stride(order[-1]):
        order.remove(x.dim() - 1)
        order.append(x.dim() - 1)
    return torch.empty_permuted(shape, order, dtype=dtype or x.dtype, device=x.device)
