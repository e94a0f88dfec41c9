"""The functional API: FoX attention with Adaptive Computation Pruning, for new code."""
from __future__ import annotations

import torch
from torch import Tensor

import acp_compile.ops  # noqa: F401  (registers torch.ops.acp.*)
from acp_compile.checks import LAYOUTS, check_api_inputs, check_log_eps, check_scale  # noqa: F401  (LAYOUTS re-exported)
from acp_compile.ops import DEFAULT_LOG_EPS


def fox_attention(
    q: Tensor, k: Tensor, v: Tensor, log_fgate: Tensor, *,
    sm_scale: float | None = None, log_eps: float | None = DEFAULT_LOG_EPS,
    u_bound: Tensor | float | None = None, layout: str = "bhtd",
) -> Tensor:
    """Causal FoX attention, o_i = sum_j softmax_j(scale q_i.k_j + c_i - c_j) v_j with c = cumsum(log_fgate).

    layout "bhtd": q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), log_fgate (B, Hq, Tk), output (B, Hq, Tq, D).
    layout "bthd": q (B, Tq, Hq, D), k and v (B, Tk, Hkv, D), log_fgate (B, Tk, Hq), output (B, Tq, Hq, D).
    Hq must be a multiple of Hkv (grouped-query attention); with Tq < Tk the queries are the last Tq
    positions. log_fgate is the per-token log forget gate (<= 0), summed in fp32 (fp64 for fp64 input)
    into c; gradients flow to q, k, v and log_fgate. sm_scale defaults to
    1/sqrt(D). log_eps (default -10) bounds the attention mass that pruning drops in each row by
    exp(log_eps); None or -inf computes every tile. u_bound, broadcastable to (B, Hq), replaces the
    bound on |scale q.k| that is otherwise computed from the data (for example from QK-norm weights);
    it must hold, or the eps guarantee is lost. Output: like q, in q's dtype.
    NaN in q, k or log_fgate spreads as in the eager formula (a NaN bound turns pruning off for that
    head); a NaN in v is read only where a tile is computed, so a skipped tile does not spread it.
    """
    check_api_inputs(q, k, log_fgate, layout)
    check_log_eps(log_eps)
    check_scale(sm_scale)
    if not (u_bound is None or isinstance(u_bound, (Tensor, int, float))) or isinstance(u_bound, bool):
        raise TypeError(f"fox_attention: u_bound must be None, a float or a tensor broadcastable to (B, Hq); got {u_bound!r}")
    if layout == "bthd":
        q, k, v = (t.transpose(1, 2) if isinstance(t, Tensor) and t.dim() == 4 else t for t in (q, k, v))  # views
        log_fgate = log_fgate.transpose(1, 2)
    if isinstance(u_bound, (int, float)):          # bool was refused above
        u_bound = torch.tensor(float(u_bound), device=q.device)
    c_dtype = torch.float64 if log_fgate.dtype == torch.float64 else torch.float32
    c = torch.cumsum(log_fgate, dim=-1, dtype=c_dtype)                                # (B, Hq, Tk)
    o, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, sm_scale, log_eps, u_bound)
    return o.transpose(1, 2) if layout == "bthd" else o
