"""Input validation for the FoX attention op: every bad input gets an error naming the argument."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, c: Tensor, u_bound: Tensor | None = None) -> None:
    """Shapes: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), c (B, Hq, Tk)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("c", c)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fox_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
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
    if Tq == 0 or Tk == 0:
        raise ValueError(
            f"fox_attention: empty sequence: q has {Tq} positions and k has {Tk}; both need at least 1 "
            "(skip the call for an empty sequence)"
        )
    if D == 0 or B == 0:
        raise ValueError(f"fox_attention: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}; batch and head dim must be >= 1")
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
        if not isinstance(u_bound, Tensor):
            raise TypeError(f"fox_attention: u_bound must be a tensor broadcastable to (B, Hq) or None, got {type(u_bound).__name__}")
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


def check_u_bound_values(u_bound: Tensor | None) -> None:
    """u_bound must be finite and >= 0. Checked on CPU tensors only: reading a CUDA value would
    synchronise; on any device the plan turns pruning off for a head whose bound is negative or NaN."""
    if u_bound is None or u_bound.device.type != "cpu" or u_bound.numel() == 0:
        return
    u = u_bound.detach()
    if not bool(torch.isfinite(u).all()) or bool((u < 0).any()):
        raise ValueError(
            "fox_attention: u_bound bounds |sm_scale * q.k| and must be finite and >= 0 everywhere; "
            f"got min {u.min().item()}, max {u.max().item()}"
        )


def check_log_eps(log_eps: float | None) -> None:
    if log_eps is None:
        return
    if isinstance(log_eps, bool) or not isinstance(log_eps, (int, float)):
        raise TypeError(f"fox_attention: log_eps must be a float <= 0, -inf or None (no pruning); got {log_eps!r}")
    if log_eps != log_eps or log_eps > 0:
        raise ValueError(f"fox_attention: log_eps must be <= 0 (log of eps <= 1), -inf or None (no pruning); got {log_eps}")


def check_scale(sm_scale: float | None) -> None:
    if sm_scale is None:
        return
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"fox_attention: sm_scale must be a float or None (1/sqrt(D)), got {sm_scale!r}")
    if not (sm_scale == sm_scale and abs(sm_scale) != float("inf")):
        raise ValueError(f"fox_attention: sm_scale must be a finite float or None (1/sqrt(D)), got {sm_scale}")


LAYOUTS = ("bhtd", "bthd")


def check_api_inputs(q: Tensor, k: Tensor, log_fgate: Tensor, layout: str) -> None:
    """Checks of the functional API that depend on the layout; the op checks the rest."""
    if layout not in LAYOUTS:
        raise ValueError(f"fox_attention: layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(log_fgate, Tensor):
        raise TypeError(f"fox_attention: log_fgate must be a tensor, got {type(log_fgate).__name__}")
    names = "(B, H, T, D)" if layout == "bhtd" else "(B, T, H, D)"
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fox_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"fox_attention: {name} must have 4 dimensions {names} for layout={layout!r}, got shape {tuple(t.shape)}"
            )
    if layout == "bhtd":
        (B, Hq, _, _), Tk = q.shape, k.shape[2]
        expected, got = (B, Hq, Tk), tuple(log_fgate.shape)
        spelled = "(B, Hq, Tk)"
    else:
        (B, _, Hq, _), Tk = q.shape, k.shape[1]
        expected, got = (B, Tk, Hq), tuple(log_fgate.shape)
        spelled = "(B, Tk, Hq)"
    if got != expected:
        raise ValueError(
            f"fox_attention: log_fgate must have shape {spelled} = {expected} for layout={layout!r}, got {got}"
        )
    if log_fgate.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fox_attention: log_fgate must be a float tensor, got {log_fgate.dtype}")
