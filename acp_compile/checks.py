"""Input validation for the FoX attention op: every bad input gets an error naming the argument."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, c: Tensor, u_bound: Tensor | None = None) -> None:
    """Shapes: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), c (B, Hq, Tk)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"fox_attention: {name} must have 4 dimensions (B, H, T, D), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fox_attention: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"fox_attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {t.device for t in (q, k, v, c)}
    if len(devices) != 1:
        raise ValueError(f"fox_attention: q, k, v and the gate must be on one device, got {sorted(map(str, devices))}")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"fox_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"fox_attention: k has batch {Bk} but q has batch {B}")
    if Dk != D:
        raise ValueError(f"fox_attention: k and v have head dim {Dk} but q has {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"fox_attention: the number of query heads ({Hq}) must be a multiple of the number of kv heads ({Hkv})"
        )
    if Tq == 0 or Tk == 0 or D == 0 or B == 0:
        raise ValueError(f"fox_attention: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}; every size must be >= 1")
    if Tq > Tk:
        raise ValueError(
            f"fox_attention: q has {Tq} positions but k only {Tk}; queries are the last Tq of Tk positions, so Tq <= Tk"
        )
    if c.dim() != 3 or tuple(c.shape) != (B, Hq, Tk):
        raise ValueError(
            f"fox_attention: the cumulative gate c must have shape (B, Hq, Tk) = {(B, Hq, Tk)}, got {tuple(c.shape)}"
        )
    if c.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"fox_attention: the cumulative gate c must be float32 (or float64), got {c.dtype}")
    if u_bound is not None:
        if u_bound.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fox_attention: u_bound must be a float tensor, got {u_bound.dtype}")
        try:
            torch.broadcast_shapes(tuple(u_bound.shape), (B, Hq))
        except RuntimeError:
            raise ValueError(
                f"fox_attention: u_bound must broadcast to (B, Hq) = {(B, Hq)}, got shape {tuple(u_bound.shape)}"
            ) from None
        if u_bound.device != q.device:
            raise ValueError(f"fox_attention: u_bound is on {u_bound.device} but q is on {q.device}")


def check_log_eps(log_eps: float | None) -> None:
    if log_eps is None:
        return
    if log_eps != log_eps or log_eps > 0:
        raise ValueError(f"fox_attention: log_eps must be <= 0 (log of eps <= 1), -inf or None (no pruning); got {log_eps}")


def check_scale(sm_scale: float | None) -> None:
    if sm_scale is not None and not (sm_scale == sm_scale and abs(sm_scale) != float("inf")):
        raise ValueError(f"fox_attention: sm_scale must be a finite float or None (1/sqrt(D)), got {sm_scale}")
