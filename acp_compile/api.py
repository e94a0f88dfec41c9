"""The functional API: FoX attention with Adaptive Computation Pruning, for new code."""
from __future__ import annotations

import torch
from torch import Tensor

import acp_compile.ops  # noqa: F401  (registers torch.ops.acp.*)
from acp_compile.ops import DEFAULT_LOG_EPS

LAYOUTS = ("bhtd", "bthd")


def fox_attention(
    q: Tensor, k: Tensor, v: Tensor, log_fgate: Tensor, *,
    sm_scale: float | None = None, log_eps: float | None = DEFAULT_LOG_EPS,
    u_bound: Tensor | None = None, layout: str = "bhtd",
) -> Tensor:
    """Causal FoX attention, o_i = sum_j softmax_j(scale q_i.k_j + c_i - c_j) v_j with c = cumsum(log_fgate).

    layout "bhtd": q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), log_fgate (B, Hq, Tk), output (B, Hq, Tq, D).
    layout "bthd": q (B, Tq, Hq, D), k and v (B, Tk, Hkv, D), log_fgate (B, Tk, Hq), output (B, Tq, Hq, D).
    Hq must be a multiple of Hkv (grouped-query attention); with Tq < Tk the queries are the last Tq
    positions. log_fgate is the per-token log forget gate (<= 0), summed in fp32. sm_scale defaults to
    1/sqrt(D). log_eps (default -10) bounds the attention mass that pruning drops in each row by
    exp(log_eps); None or -inf computes every tile. u_bound, broadcastable to (B, Hq), replaces the
    bound on |scale q.k| that is otherwise computed from the data (for example from QK-norm weights).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"fox_attention: layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(log_fgate, Tensor):
        raise TypeError(f"fox_attention: log_fgate must be a tensor, got {type(log_fgate).__name__}")
    if log_fgate.dim() != 3:
        expected = "(B, Hq, Tk)" if layout == "bhtd" else "(B, Tk, Hq)"
        raise ValueError(f"fox_attention: log_fgate must have shape {expected}, got {tuple(log_fgate.shape)}")
    if layout == "bthd":
        q, k, v = (t.transpose(1, 2) if t.dim() == 4 else t for t in (q, k, v))   # views, no copy
        log_fgate = log_fgate.transpose(1, 2)
    c = torch.cumsum(log_fgate.float(), dim=-1)                                       # (B, Hq, Tk)
    o, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, sm_scale, log_eps, u_bound)
    return o.transpose(1, 2) if layout == "bthd" else o
