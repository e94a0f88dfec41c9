"""The functional API: FoX attention with Adaptive Computation Pruning, for new code."""
from __future__ import annotations

import math

import torch
from torch import Tensor

import acp_compile.ops  # noqa: F401  (registers torch.ops.acp.*)
from acp_compile.checks import (  # noqa: F401  (LAYOUTS re-exported)
    LAYOUTS, U_BOUND_POLICY, check_api_inputs, check_certificate, check_scale, check_u_bound_float, normalize_log_eps,
)
from acp_compile.ops import DEFAULT_CERTIFICATE, DEFAULT_LOG_EPS

# Elements of q k^T formed at once by max_abs_logit (fp32: 256 MiB).
_CHECK_CHUNK_ELEMENTS = 1 << 26


def fox_attention(
    q: Tensor, k: Tensor, v: Tensor, log_fgate: Tensor, *,
    sm_scale: float | None = None, log_eps: float | None = DEFAULT_LOG_EPS,
    u_bound: Tensor | float | None = None, layout: str = "bhtd", check_u_bound: bool = False,
    key_padding_mask: Tensor | None = None, document_ids: Tensor | None = None, cu_seqlens: Tensor | None = None,
    certificate: str = DEFAULT_CERTIFICATE,
) -> Tensor:
    """Causal FoX attention, o_i = sum_j softmax_j(scale q_i.k_j + c_i - c_j) v_j with c = cumsum(log_fgate).

    layout "bhtd": q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), log_fgate (B, Hq, Tk), output (B, Hq, Tq, D).
    layout "bthd": q (B, Tq, Hq, D), k and v (B, Tk, Hkv, D), log_fgate (B, Tk, Hq), output (B, Tq, Hq, D).
    Hq must be a multiple of Hkv (grouped-query attention); with Tq < Tk the queries are the last Tq
    positions. log_fgate is the per-token log forget gate (<= 0), summed in fp32 (fp64 for fp64 input)
    into c; gradients flow to q, k, v and log_fgate (the gate's gradient is the reverse cumulative sum
    of dc, in fp32, or fp64 for an fp64 gate). sm_scale (> 0) defaults to 1/sqrt(D). log_eps (default
    -10) bounds the attention mass that pruning drops in each row by exp(log_eps); None or -inf computes
    every tile. Empty inputs (B, H or Tq = 0) give an empty output, as SDPA.

    certificate decides which tiles may be skipped within that bound: "online" (default; DESIGN.md 1.1)
    visits key blocks newest first and stops a query block once the mass of everything older is
    provably below eps times the mass it has seen, from per-row ||q_i||, per-key-block max ||k_j|| and
    extrema of c; "paper" skips a tile when its largest decay is below log_eps - log(Tk) - 2U (Lin et al.).

    u_bound, a float or a tensor broadcastable to (B, Hq), replaces the bound on |sm_scale q_i.k_j| that
    the paper certificate otherwise computes from the data (for example from QK-norm weights); the online
    certificate reads only its +inf ("never prune that head") and NaN/negative (error) values. It must hold for every
    causal pair, or the eps guarantee is void; +inf means "never prune that head"; NaN or a negative
    value is an error (raised for floats and CPU tensors; on CUDA, where reading it would synchronise,
    those heads give NaN). check_u_bound=True verifies the bound on this call's data: it computes
    sm_scale * max |q_i.k_j| over the causal pairs (a dense pass, with one host sync: for debugging and
    tests, not training) and raises ValueError naming the heads where u_bound is below it.

    Padded and packed batches (combined with the causal mask; any layout):
      key_padding_mask (B, Tk) bool or integer, True/1 = attend (Hugging Face's attention_mask): left
        padding (batched generation) and right padding alike. A query row with no visible key (a
        left-padded position before the first token) returns 0 and gets zero gradients (eager's softmax
        over an all -inf row gives NaN there; mask or drop those rows).
      document_ids (B, Tk) integer: packed documents; a query sees only keys of its own run of equal ids.
      cu_seqlens (N + 1,) integer, flash-attn/fla varlen style with B = 1: document n holds positions
        cu_seqlens[n] .. cu_seqlens[n+1] - 1, cu_seqlens[0] = 0, cu_seqlens[N] = Tk (converted to
        document_ids; give one of the two). The gate needs no restart per document: c_i - c_j within a
        document is the same for a global cumulative sum.
      The eps bound holds per row: decays are measured from the row's newest visible key.

    NaN semantics: NaN in q, k or log_fgate spreads as in the eager formula (a NaN bound turns pruning
    off for that head). A NaN or infinity anywhere in v[b, hk], even at a position no query sees, makes
    every output row of the heads reading it NaN, as in eager attention (0 x NaN = NaN), on every device
    and tile size; their q, k and gate gradients are NaN too, as in eager autograd.
    """
    check_api_inputs(q, k, v, log_fgate, layout)
    log_eps = normalize_log_eps(log_eps)   # a wrong type must not reach the op's schema check
    check_scale(sm_scale)
    check_certificate(certificate)
    if not (u_bound is None or isinstance(u_bound, (Tensor, int, float))) or isinstance(u_bound, bool):
        raise TypeError(f"fox_attention: u_bound must be None, a float or a tensor broadcastable to (B, Hq); got {u_bound!r}")
    if not isinstance(check_u_bound, bool):
        raise TypeError(f"fox_attention: check_u_bound must be True or False, got {check_u_bound!r}")
    if layout == "bthd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                                # views
        log_fgate = log_fgate.transpose(1, 2)
    if isinstance(u_bound, (int, float)):          # bool was refused above
        check_u_bound_float(float(u_bound))
        u_bound = torch.tensor(float(u_bound), device=q.device)
    if check_u_bound and u_bound is not None:
        verify_u_bound(q, k, u_bound, sm_scale)
    if cu_seqlens is not None:
        if document_ids is not None:
            raise ValueError("fox_attention: give document_ids or cu_seqlens, not both")
        document_ids = cu_seqlens_to_document_ids(cu_seqlens, q.shape[0], k.shape[2])
    c_dtype = torch.float64 if log_fgate.dtype == torch.float64 else torch.float32
    c = torch.cumsum(log_fgate, dim=-1, dtype=c_dtype)                                # (B, Hq, Tk)
    o, _, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, sm_scale, log_eps, u_bound, key_padding_mask,
                                                 document_ids, certificate)
    return o.transpose(1, 2) if layout == "bthd" else o


def cu_seqlens_to_document_ids(cu_seqlens: Tensor, batch: int, Tk: int) -> Tensor:
    """(1, Tk) int32 document ids from cu_seqlens (N + 1,): position t is in document n when
    cu_seqlens[n] <= t < cu_seqlens[n + 1]. B must be 1 (varlen packs every document into one row).
    The values are checked on CPU tensors in eager (cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] ==
    Tk); on CUDA and while torch.compile traces they are not read (no host sync, no graph break)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("fox_attention: cu_seqlens must be a 1-d integer tensor (N + 1,) of document offsets, "
                         f"got {cu_seqlens if not isinstance(cu_seqlens, Tensor) else tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"fox_attention: cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"fox_attention: cu_seqlens packs documents into one row, so the batch must be 1; got B = {batch}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        cs = cu_seqlens.tolist()
        if cs[0] != 0 or cs[-1] != Tk or any(a > b for a, b in zip(cs, cs[1:])):
            raise ValueError(f"fox_attention: cu_seqlens must start at 0, never decrease and end at Tk = {Tk}; got {cs}")
    pos = torch.arange(Tk, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True).to(torch.int32)[None]


@torch.no_grad()
def max_abs_logit(q: Tensor, k: Tensor, sm_scale: float | None = None) -> Tensor:
    """sm_scale * max |q_i . k_j| over the causal pairs (j <= Tk - Tq + i), per (batch, query head):
    (B, Hq) fp32 (fp64 for fp64 inputs), in chunks of query rows so that no (Tq, Tk) matrix of the
    whole call is held. q (B, Hq, Tq, D), k (B, Hkv, Tk, D)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = Hq // max(Hkv, 1)
    kk = k.to(dt)[:, :, None].expand(B, Hkv, g, Tk, D).reshape(B, Hq, Tk, D)
    out = torch.zeros((B, Hq), dtype=dt, device=q.device)
    rows = max(1, _CHECK_CHUNK_ELEMENTS // max(1, B * Hq * Tk))
    cols = torch.arange(Tk, device=q.device)
    for r0 in range(0, Tq, rows):
        r1 = min(Tq, r0 + rows)
        s = (q[:, :, r0:r1].to(dt) @ kk.transpose(-1, -2)).abs_()                     # (B, Hq, R, Tk)
        visible = cols[None, :] <= (torch.arange(r0, r1, device=q.device) + (Tk - Tq))[:, None]
        s.masked_fill_(~visible, 0.0)
        out = torch.maximum(out, s.amax(dim=(-1, -2)))
    return out * scale


def verify_u_bound(q: Tensor, k: Tensor, u_bound: Tensor, sm_scale: float | None = None) -> None:
    """Raises ValueError unless u_bound >= sm_scale * max |q_i . k_j| (causal pairs) for every
    (batch, head). q, k in the (B, H, T, D) layout. One host sync."""
    need = max_abs_logit(q, k, sm_scale)
    ub = u_bound.detach().to(device=need.device, dtype=need.dtype).expand(need.shape)
    if bool(torch.isnan(ub).any()) or bool((ub < 0).any()):
        raise ValueError(f"fox_attention: {U_BOUND_POLICY}; got min {ub.min().item()}, max {ub.max().item()}")
    # The bound must hold up to the rounding of the check itself (fp32 products of D terms).
    slack = 1e-5 * need.abs() + 1e-6
    short = ub + slack < need
    if bool(short.any()):
        b, h = (int(x) for x in short.nonzero()[0])
        raise ValueError(
            f"fox_attention: u_bound does not hold: at batch {b}, head {h} it is {ub[b, h].item():.6g} but "
            f"sm_scale * max|q.k| over the causal pairs is {need[b, h].item():.6g} "
            f"({int(short.sum())} of {short.numel()} (batch, head) pairs fall short). Raise the bound "
            "(e.g. sm_scale * D * max|w_q| * max|w_k| with QK RMSNorm) or pass u_bound=None to compute it from the data."
        )
