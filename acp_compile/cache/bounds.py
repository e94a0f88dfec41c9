"""Bounds on future logits, which certified eviction needs (DESIGN.md, "The KV cache").

  U >= scale * |q . k| for every query the cache will ever serve and every key it will ever hold.

With QK RMSNorm, y = x / sqrt(mean(x^2) + eps) * w has ||x / sqrt(mean(x^2) + eps)|| <= sqrt(D), so
||y|| <= sqrt(D) * max|w| whatever x is: a static bound from the weights (rmsnorm_norm_bound). The output
rounded to a dtype grows by at most one rounding per entry, hence the (1 + 2 ulp) factor.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def rmsnorm_norm_bound(weight: Tensor | None, dim: int, dtype: torch.dtype = torch.float32) -> float:
    """A bound on ||RMSNorm(x)|| over all x (weight (D,) or None for an RMSNorm without weight), for an
    output stored in `dtype`."""
    wmax = 1.0 if weight is None else float(weight.detach().abs().max())
    rounding = 2.0 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return math.sqrt(dim) * wmax * (1.0 + rounding) * (1.0 + 2.0 ** -20)


def logit_bound(q_norm_bound: float, k_norm_bound: float, sm_scale: float) -> float:
    """U = scale * max||q|| * max||k|| (Cauchy-Schwarz), rounded up a little for the fp32 products."""
    return float(sm_scale) * float(q_norm_bound) * float(k_norm_bound) * (1.0 + 2.0 ** -20)
