"""The torch.library custom ops that the compiler pass and the functional API call.

  acp::fox_attention_fwd(q, k, v, c, sm_scale, log_eps, u_bound, key_mask=None, doc_ids=None,
                         certificate="online", q_norm=None, k_norm=None) -> (o, lse, u, keep_from)
  acp::fox_attention_bwd(do, q, k, v, c, o, lse, sm_scale, log_eps, u_bound, key_mask=None, doc_ids=None,
                         keep_from=None) -> (dq, dk, dv, dc)

certificate: "online" (default: the tight per-row rule of DESIGN.md 1.1) or "paper" (the paper's 2U
threshold). q_norm (B, Hq, Tq) and k_norm (B, Hkv, Tk), optional, fp32: the row norms ||q_i|| and
||k_j|| that the online certificate reads (computed by the op when None; the compiled graph computes
them next to the producers of q and k); they must not be smaller than the true norms. keep_from
(B, Hq, Tq) int32: the first key each row kept (0: nothing skipped); autograd hands it to the
backward, which computes exactly that kept set with the forward's lse (kernels/dispatch.py). A
backward called with keep_from None recomputes the paper rule's plan.

Shapes: q, dq (B, Hq, Tq, D); k, dk (B, Hkv, Tk, D); v, dv (B, Hkv, Tk, Dv); o, do (B, Hq, Tq, Dv);
c, dc (B, Hq, Tk) fp32 (or both fp64); the value head dim Dv may differ from D (MLA-style heads);
lse (B, Hq, Tq) fp32 natural-log log-sum-exp. Every argument of both ops is checked
(acp_compile/checks.py), with an error that names it. Empty inputs (B, Hq or Tq = 0, or Tq = Tk = 0)
give empty outputs and zero gradients, as SDPA does. Outputs take the strides of the matching input
(torch.empty_like; o takes q's dimension order, kernels/layout.py), so a transposed (B, T, H, D) view
stays copy-free. sm_scale None means 1/sqrt(D) (D of q and k, never Dv), computed here so that a graph
does not pin the head dim; log_eps None or -inf means dense. u_bound, optional, broadcasts to (B, Hq) and replaces the computed bound U. u (B, Hq) fp32
is the bound the forward pruned with (u_bound, or U computed from q and k; zeros when pruning is
off; zeros under the online certificate). lse, u, keep_from, q_norm and k_norm carry no gradient. The ops are opaque to torch.compile: the real
implementation picks a Triton kernel or the blocked PyTorch path in kernels/dispatch.py.
Padded and packed batches (kernels/segments.py): key_mask (B, Tk) bool or integer, True/nonzero = the
key may be attended (Hugging Face's attention_mask), and doc_ids (B, Tk) integer document ids (packed
documents: a query sees the keys of its own run of equal ids); both combine with the causal mask. A
query row with no visible key (left padding before the first token) returns o = 0 and lse = -inf, and
gets zero gradients (eager's softmax over an all -inf row gives NaN: the pass must not rewrite a graph
whose result differs there unless those rows are never read). The eps bound holds per row: decays are
measured from each row's newest visible key, never from a masked diagonal.
u_bound values: >= 0, +inf meaning "never prune that head" (the only u_bound value the online
certificate reads; a finite one only changes the paper rule); NaN or negative is an error, raised
for CPU tensors and, for CUDA tensors (whose values are not read, to keep the op free of host syncs),
turned into NaN output rows for that head. NaN semantics of v: a NaN or infinity anywhere in v[b, hk]
makes every output row of the query heads that read it NaN (as eager attention does: 0 x NaN = NaN),
on every path and tile size; u is then NaN for those heads, and their dq, dk and dc are NaN in the
backward as in eager autograd (dv stays finite, as in eager).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from acp_compile import step_stats
from acp_compile.checks import (
    check_attention_inputs, check_backward_inputs, check_certificate, check_keep_from, check_norm_stats, check_scale,
    check_segment_inputs, check_u_bound_values, normalize_log_eps,
)
from acp_compile.kernels import dispatch
from acp_compile.kernels.certificate import row_norms  # noqa: F401  (the pass emits it: patterns/norm_stats.py)
from acp_compile.kernels.layout import empty_like_last
from acp_compile.kernels.threshold import default_scale

DEFAULT_LOG_EPS = -10.0
DEFAULT_CERTIFICATE = "online"


def _lse_like(q: Tensor) -> Tensor:
    B, Hq, Tq, _ = q.shape
    return q.new_empty((B, Hq, Tq), dtype=torch.float32)


def _u_like(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:2], dtype=torch.float32)


def _keep_from_like(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=torch.int32)


def _check(q, k, v, c, sm_scale, log_eps, u_bound, key_mask=None, doc_ids=None) -> float | None:
    """Validates the arguments; returns log_eps normalised (None: dense), the one form below the op."""
    check_attention_inputs(q, k, v, c, u_bound)
    check_segment_inputs(key_mask, doc_ids, q, k)
    check_scale(sm_scale)
    return normalize_log_eps(log_eps)


@torch.library.custom_op("acp::fox_attention_fwd", mutates_args=())
def fox_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, c: Tensor,
    sm_scale: Optional[float] = None, log_eps: Optional[float] = DEFAULT_LOG_EPS, u_bound: Optional[Tensor] = None,
    key_mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
    certificate: str = DEFAULT_CERTIFICATE, q_norm: Optional[Tensor] = None, k_norm: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    log_eps = _check(q, k, v, c, sm_scale, log_eps, u_bound, key_mask, doc_ids)
    check_certificate(certificate)
    check_norm_stats(q, k, q_norm, k_norm)
    check_u_bound_values(u_bound)
    out = dispatch.forward(q, k, v, c, sm_scale, log_eps, u_bound, key_mask, doc_ids, certificate, q_norm, k_norm)
    recorder = step_stats.active()
    if recorder is not None and q.numel() and k.shape[2]:
        recorder.add(q, k, c, default_scale(q.shape[-1]) if sm_scale is None else sm_scale, log_eps, out[3])
    return out


@fox_attention_fwd.register_fake
def _fox_attention_fwd_fake(q, k, v, c, sm_scale=None, log_eps=DEFAULT_LOG_EPS, u_bound=None, key_mask=None,
                            doc_ids=None, certificate=DEFAULT_CERTIFICATE, q_norm=None, k_norm=None):
    _check(q, k, v, c, sm_scale, log_eps, u_bound, key_mask, doc_ids)
    check_certificate(certificate)
    check_norm_stats(q, k, q_norm, k_norm)
    return empty_like_last(q, v.shape[-1]), _lse_like(q), _u_like(q), _keep_from_like(q)


@torch.library.custom_op("acp::fox_attention_bwd", mutates_args=())
def fox_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, c: Tensor, o: Tensor, lse: Tensor,
    sm_scale: Optional[float] = None, log_eps: Optional[float] = DEFAULT_LOG_EPS, u_bound: Optional[Tensor] = None,
    key_mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None, keep_from: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    log_eps = _check(q, k, v, c, sm_scale, log_eps, u_bound, key_mask, doc_ids)
    check_backward_inputs(do, q, o, lse, v)
    check_keep_from(q, keep_from)
    return dispatch.backward(do, q, k, v, c, o, lse, sm_scale, log_eps, u_bound, key_mask, doc_ids, keep_from)


@fox_attention_bwd.register_fake
def _fox_attention_bwd_fake(do, q, k, v, c, o, lse, sm_scale=None, log_eps=DEFAULT_LOG_EPS, u_bound=None,
                            key_mask=None, doc_ids=None, keep_from=None):
    _check(q, k, v, c, sm_scale, log_eps, u_bound, key_mask, doc_ids)
    check_backward_inputs(do, q, o, lse, v)
    check_keep_from(q, keep_from)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(c)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, c, sm_scale, log_eps, _u_bound, key_mask, doc_ids = inputs[:9]
    o, lse, u, keep_from = output
    ctx.save_for_backward(q, k, v, c, o, lse, u, key_mask, doc_ids, keep_from)
    ctx.sm_scale, ctx.log_eps = sm_scale, log_eps
    ctx.c_dtype = c.dtype
    ctx.mark_non_differentiable(lse, u, keep_from)


def _backward(ctx, do, _dlse, _du, _dkeep):
    q, k, v, c, o, lse, u, key_mask, doc_ids, keep_from = ctx.saved_tensors
    dq, dk, dv, dc = torch.ops.acp.fox_attention_bwd(do, q, k, v, c, o, lse, ctx.sm_scale, ctx.log_eps, u,
                                                     key_mask, doc_ids, keep_from)
    return dq, dk, dv, dc.to(ctx.c_dtype), None, None, None, None, None, None, None, None


fox_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
