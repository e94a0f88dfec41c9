"""Input validation for the FoX attention op: every bad input gets an error naming the argument."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, c: Tensor, u_bound: Tensor | None = None) -> None:
    """Shapes: q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv) (Dv may differ from D), c (B, Hq, Tk)."""
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
    _check_kv_shapes(q, k, v)
    Bk, Hkv, Tk, Dk = k.shape
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"fox_attention: the number of query heads ({Hq}) must be a multiple of the number of kv heads ({Hkv})"
        )
    if D == 0:
        raise ValueError(f"fox_attention: q and k have head dim 0 (q {tuple(q.shape)}); the head dim must be >= 1")
    if v.shape[3] == 0:
        raise ValueError(f"fox_attention: v has head dim 0 (v {tuple(v.shape)}); the value head dim Dv must be >= 1")
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


def _check_kv_shapes(q: Tensor, k: Tensor, v: Tensor, names: str = "(B, Hkv, Tk, D)") -> None:
    """k against q (batch and head dim D); v against k: every dim but the last (Dv may differ from D).
    names spells k's dims in the caller's layout, for the error."""
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"fox_attention: k has batch {k.shape[0]} but q has batch {q.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"fox_attention: k has head dim {k.shape[3]} but q has {q.shape[3]} (q and k share D)")
    if k.shape[:3] != v.shape[:3]:
        expected = "(" + ", ".join(str(x) for x in k.shape[:3]) + ", Dv)"
        raise ValueError(
            f"fox_attention: v must have shape {names[:-2]}Dv) = {expected} like k except the value head dim "
            f"Dv, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )


INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_segment_inputs(key_mask: Tensor | None, doc_ids: Tensor | None, q: Tensor, k: Tensor) -> None:
    """key_mask (B, Tk) bool or integer (nonzero = attend, as Hugging Face's attention_mask) and doc_ids
    (B, Tk) integer document ids, each optional, on q's device."""
    B, Tk = q.shape[0], k.shape[2]
    for name, t, what in (("key_mask", key_mask, "bool or integer (True/1 = attend)"),
                          ("doc_ids", doc_ids, "integer document ids")):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"fox_attention: {name} must be a (B, Tk) tensor or None, got {type(t).__name__}")
        if t.dim() != 2 or tuple(t.shape) != (B, Tk):
            raise ValueError(f"fox_attention: {name} must have shape (B, Tk) = {(B, Tk)}, got {tuple(t.shape)}")
        allowed = (torch.bool, *INT_DTYPES) if name == "key_mask" else INT_DTYPES
        if t.dtype not in allowed:
            raise TypeError(f"fox_attention: {name} must be {what}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"fox_attention: {name} is on {t.device} but q is on {q.device}")


U_BOUND_POLICY = (
    "u_bound bounds |sm_scale * q.k| per (batch, head) and must be >= 0 (+inf: never prune that head) and "
    "not NaN"
)


def check_u_bound_values(u_bound: Tensor | None) -> None:
    """One policy on every device: a u_bound value that is NaN or negative is an error; +inf is valid
    and means "never prune that head". Raised here for CPU tensors, where reading the values costs no
    sync. A CUDA tensor is not read (that would synchronise and break CUDA graphs); the op gives NaN
    for every output row of a head with such a bound instead (kernels/dispatch.py), so a bad bound
    never passes silently. A bound that is too small cannot be seen without reading q and k: it must
    hold, or the eps guarantee is void; fox_attention(..., check_u_bound=True) verifies it on the data."""
    if u_bound is None or u_bound.device.type != "cpu" or u_bound.numel() == 0:
        return
    u = u_bound.detach()
    if bool(torch.isnan(u).any()) or bool((u < 0).any()):
        raise ValueError(
            f"fox_attention: {U_BOUND_POLICY}; got min {u.min().item()}, max {u.max().item()}"
            + (" and NaN" if bool(torch.isnan(u).any()) else "")
        )


def check_u_bound_float(u_bound: float) -> None:
    if u_bound != u_bound or u_bound < 0:
        raise ValueError(f"fox_attention: {U_BOUND_POLICY}; got {u_bound}")


def check_backward_inputs(do: Tensor, q: Tensor, o: Tensor, lse: Tensor, v: Tensor | None = None) -> None:
    """fox_attention_bwd's own arguments: do and o (B, Hq, Tq, Dv) with q's dtype and device (Dv = v's
    last dim; q's head dim when v is not given), lse (B, Hq, Tq) fp32."""
    B, Hq, Tq, D = q.shape
    Dv = D if v is None else v.shape[-1]
    for name, t in (("do", do), ("o", o)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fox_attention_bwd: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (B, Hq, Tq, Dv):
            raise ValueError(
                f"fox_attention_bwd: {name} must have shape (B, Hq, Tq, Dv) = {(B, Hq, Tq, Dv)} (the output's), "
                f"got {tuple(t.shape)}"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"fox_attention_bwd: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"fox_attention_bwd: {name} is on {t.device} but q is on {q.device}")
    if not isinstance(lse, Tensor):
        raise TypeError(f"fox_attention_bwd: lse must be a torch.Tensor, got {type(lse).__name__}")
    if tuple(lse.shape) != (B, Hq, Tq):
        raise ValueError(
            f"fox_attention_bwd: lse must have shape (B, Hq, Tq) = {(B, Hq, Tq)} (the forward's second output), "
            f"got {tuple(lse.shape)}"
        )
    if lse.dtype != torch.float32:
        raise TypeError(f"fox_attention_bwd: lse must be float32 (the forward's second output), got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"fox_attention_bwd: lse is on {lse.device} but q is on {q.device}")


CERTIFICATES = ("online", "paper")


def check_certificate(certificate: str, who: str = "fox_attention: certificate") -> str:
    """'online' (the tight per-row rule of DESIGN.md 1.1) or 'paper' (the paper's 2U threshold)."""
    if not isinstance(certificate, str) or certificate not in CERTIFICATES:
        raise ValueError(f"{who} must be one of {CERTIFICATES} ('online': the per-row certificate of DESIGN.md "
                         f"1.1, 'paper': the paper's 2U threshold), got {certificate!r}")
    return certificate


def _check_stat(name: str, t: Tensor | None, shape: tuple, q: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"fox_attention: {name} must be a tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"fox_attention: {name} must have shape {shape}, got {tuple(t.shape)}; pass None to "
                         "let the op compute it")
    if t.dtype != torch.float32:
        raise TypeError(f"fox_attention: {name} must be float32 (row norms), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"fox_attention: {name} is on {t.device} but q is on {q.device}")


def check_norm_stats(q: Tensor, k: Tensor, q_norm: Tensor | None, k_norm: Tensor | None) -> None:
    """q_norm (B, Hq, Tq) and k_norm (B, Hkv, Tk) fp32 on q's device, or None."""
    _check_stat("q_norm", q_norm, tuple(q.shape[:3]), q)
    _check_stat("k_norm", k_norm, tuple(k.shape[:3]), q)


def check_keep_from(q: Tensor, keep_from: Tensor | None) -> None:
    """keep_from (B, Hq, Tq) int32 on q's device (the forward's fourth output), or None."""
    if keep_from is None:
        return
    if not isinstance(keep_from, Tensor) or keep_from.dtype != torch.int32:
        raise TypeError("fox_attention_bwd: keep_from must be the forward's fourth output, an int32 tensor, "
                        f"got {getattr(keep_from, 'dtype', type(keep_from).__name__)}")
    if tuple(keep_from.shape) != tuple(q.shape[:3]) or keep_from.device != q.device:
        raise ValueError(f"fox_attention_bwd: keep_from must have shape (B, Hq, Tq) = {tuple(q.shape[:3])} on "
                         f"{q.device}, got {tuple(keep_from.shape)} on {keep_from.device}")


def normalize_log_eps(log_eps: float | None, who: str = "fox_attention: log_eps") -> float | None:
    """The one parser of log_eps: validates it and returns a float <= 0, or None for "dense" (None and
    -inf both mean dense; below this point only None does). `who` names the argument in errors."""
    if log_eps is None:
        return None
    if isinstance(log_eps, bool) or not isinstance(log_eps, (int, float)):
        raise TypeError(f"{who} must be a float <= 0, -inf or None (no pruning); got {log_eps!r}")
    if log_eps != log_eps or log_eps > 0:
        raise ValueError(f"{who} must be <= 0 (log of eps <= 1), -inf or None (no pruning); got {log_eps}")
    return None if log_eps == float("-inf") else float(log_eps)


def check_scale(sm_scale: float | None) -> None:
    if sm_scale is None:
        return
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"fox_attention: sm_scale must be a float or None (1/sqrt(D)), got {sm_scale!r}")
    if not (sm_scale == sm_scale and abs(sm_scale) != float("inf")):
        raise ValueError(f"fox_attention: sm_scale must be a finite float > 0 or None (1/sqrt(D)), got {sm_scale}")
    if sm_scale <= 0:
        raise ValueError(
            f"fox_attention: sm_scale must be > 0 (it scales q.k before the softmax; None = 1/sqrt(D)), got {sm_scale}"
        )


LAYOUTS = ("bhtd", "bthd")


def check_api_inputs(q: Tensor, k: Tensor, v: Tensor, log_fgate: Tensor, layout: str) -> None:
    """Checks of the functional API that depend on the layout; the op checks the rest. q, k and v are
    checked against each other before log_fgate, so that a mismatch is blamed on the right argument."""
    if layout not in LAYOUTS:
        raise ValueError(f"fox_attention: layout must be one of {LAYOUTS}, got {layout!r}")
    names = "(B, H, T, D)" if layout == "bhtd" else "(B, T, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fox_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"fox_attention: {name} must have 4 dimensions {names} for layout={layout!r}, got shape {tuple(t.shape)}"
            )
    if not isinstance(log_fgate, Tensor):
        raise TypeError(f"fox_attention: log_fgate must be a tensor, got {type(log_fgate).__name__}")
    t_axis, h_axis = (2, 1) if layout == "bhtd" else (1, 2)
    _check_kv_shapes(q, k, v, "(B, Hkv, Tk, D)" if layout == "bhtd" else "(B, Tk, Hkv, D)")
    B, Hq, Tk = q.shape[0], q.shape[h_axis], k.shape[t_axis]
    if layout == "bhtd":
        expected, spelled = (B, Hq, Tk), "(B, Hq, Tk)"
    else:
        expected, spelled = (B, Tk, Hq), "(B, Tk, Hq)"
    got = tuple(log_fgate.shape)
    if got != expected:
        raise ValueError(
            f"fox_attention: log_fgate must have shape {spelled} = {expected} for layout={layout!r}, got {got}"
        )
    if log_fgate.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fox_attention: log_fgate must be a float tensor, got {log_fgate.dtype}")
