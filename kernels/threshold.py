"""The ACP threshold, shared by the torch plan (kernels/plan.py) and the Triton plan (fox_triton/plan.py).

  log_eps  natural log of the pruned mass each row may lose; None means dense (the op boundary,
           acp_compile/checks.py normalize_log_eps, turns -inf into None; pruning_enabled also
           accepts -inf for direct callers of the kernels)
  U        bound on |scale * q_i . k_j| per (batch, query head)
  delta    log_eps - log(Tk) - 2U per (batch, query head); -inf when U is not >= 0 (a negative or
           NaN bound turns pruning off for that head)

The Triton plan kernel receives threshold_offset(log_eps, Tk) = log_eps - log(Tk) and forms
delta = offset - 2U on the device per head (the same fp32 expression as threshold_delta below).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def default_scale(head_dim: int) -> float:
    """sm_scale when the caller gives none: 1/sqrt(D)."""
    return 1.0 / math.sqrt(head_dim)


def pruning_enabled(log_eps: float | None) -> bool:
    """The one decision whether a call prunes: a finite log_eps (None and -inf are dense)."""
    return log_eps is not None and log_eps != float("-inf")


def threshold_offset(log_eps: float, Tk: int) -> float:
    """log_eps - log(Tk): the part of delta that does not depend on U."""
    return float(log_eps) - math.log(Tk)


def threshold_delta(log_eps: float, Tk: int, u: Tensor) -> Tensor:
    """delta = log_eps - log(Tk) - 2U, fp32 like u; -inf where U is negative or NaN (the guarantee
    needs U >= 0, so that delta <= 0 and no diagonal tile is ever skipped)."""
    delta = threshold_offset(log_eps, Tk) - 2.0 * u
    return torch.where(u >= 0, delta, float("-inf"))
