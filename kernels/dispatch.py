"""Chooses the implementation for one call of the FoX attention op.

bound:    U for the threshold, computed once per forward (the Triton norm pass on covered inputs,
          torch otherwise) and returned with the output, so the backward reuses it.
forward:  the Triton forward (kernels/fox_triton/forward.py), or for a few queries against many keys
          the split-key decode kernels, dense (kernels/short_queries.py), when kernels/fox_triton/support.py
          says the call is covered: CUDA tensors of a covered dtype and head dim on compute
          capability >= 8.0, or CPU tensors when the interpreter switch ACP_TRITON_ON_CPU=1 together
          with TRITON_INTERPRET=1 is set; the blocked PyTorch path otherwise.
backward: the Triton backward (kernels/fox_triton/backward*.py) under the same coverage rule;
          the blocked path otherwise.
Every fallback is logged once per reason on the "acp_compile" logger, never raised.

certificate: "online" (default; DESIGN.md 1.1, kernels/certificate.py) decides per query block while
          the forward runs; "paper" skips tiles below the threshold delta of the paper's rule.
keep_from: (B, Hq, Tq) int32, the first kept key of each row, recorded by every forward (both
          certificates; 0 without pruning) and handed to the backward, which computes exactly that
          kept set (masking the entries j < keep_from[i] inside the tiles it visits) with the
          forward's lse: forward and backward agree on what was skipped whatever their tile sizes
          (the forward may even run in Triton and the backward in the blocked path). A backward
          called without keep_from recomputes the paper plan (older callers).
"""
from __future__ import annotations

import torch
from torch import Tensor

from acp_compile.kernels import blocked, blocked_certified, short_queries
from acp_compile.kernels.certificate import cert_stats, keep_from_rows
from acp_compile.kernels.fox_triton import support
from acp_compile.kernels.layout import empty_like_last
from acp_compile.kernels.plan import Plan, make_plan, nonfinite_flag, recorded_plan, torch_qk_bound
from acp_compile.kernels.segments import make_segments
from acp_compile.kernels.threshold import default_scale, pruning_enabled


def _scale(q: Tensor, sm_scale: float | None) -> float:
    return default_scale(q.shape[-1]) if sm_scale is None else sm_scale


def blocked_plan(q, k, c, sm_scale, log_eps, u_bound, seg=None):
    return make_plan(q, k, c, sm_scale, log_eps, u_bound, blocked.BLOCK_M, blocked.BLOCK_N, seg)


def forward_implementation(q, k, v, c) -> str:
    """'triton' or 'blocked': what forward() and backward() will run for these inputs (one coverage rule)."""
    return "triton" if support.supported(q, k, v, c) else "blocked"


def forward_tile_sizes(q, k, v, c) -> tuple[int, int]:
    """(block_m, block_n) of the forward for these inputs: the Triton launch table or the blocked path's."""
    if forward_implementation(q, k, v, c) == "triton":
        from acp_compile.kernels.fox_triton.configs import forward_config
        cfg = forward_config(q, v.shape[-1])
        return cfg.block_m, cfg.block_n
    return blocked.BLOCK_M, blocked.BLOCK_N


def forward_plan(q, k, c, sm_scale, log_eps, u_bound=None, v=None, key_mask=None, doc_ids=None) -> Plan:
    """The paper rule's plan for these inputs, with the forward's tile sizes, computed in torch (the report
    reads it when it has no recorded keep_from; under the online certificate the forward decides while it
    runs and records keep_from instead; the Triton forward computes the same start indices on the device, kernels/fox_triton/plan.py).
    An error here is raised, not hidden: a plan with another tile size than the kernel's would be wrong.
    v None: the tile sizes of a value head dim equal to D (the report, which does not see v)."""
    bm, bn = forward_tile_sizes(q, k, k if v is None else v, c)
    seg = make_segments(key_mask, doc_ids, q.shape[2], k.shape[2])
    return make_plan(q, k, c, _scale(q, sm_scale), log_eps, u_bound, bm, bn, seg)


def pruning_bound(q, k, scale, log_eps, u_bound, triton: bool):
    """u (B, Hq) fp32 on q's device: the caller's u_bound, U from the data, or zeros without pruning."""
    B, Hq = q.shape[:2]
    if not pruning_enabled(log_eps):
        return q.new_zeros((B, Hq), dtype=torch.float32)
    if u_bound is not None:
        # A copy, never u_bound itself: an op output must not alias its input.
        return u_bound.to(device=q.device, dtype=torch.float32).expand(B, Hq).clone(memory_format=torch.contiguous_format)
    if triton:
        from acp_compile.kernels.fox_triton.plan import triton_qk_bound
        return triton_qk_bound(q, k, scale)
    return torch_qk_bound(q, k, scale)


def _poison(q, v, u_bound, triton: bool, scan_v: bool = True):
    """bad (B, Hq, Dv) fp32, added to every output row: NaN where the output must be NaN on every path.
    scan_v False: the caller's kernel reads every value of v into every row's product itself (the dense
    short-query path), so the NaN of the first rule arises there without a pass over v.

    - v[b, hk, :, d] holds a NaN or an infinity at any position: eager attention gives a non-finite
      o[..., d] in every row (0 x NaN = NaN for the masked and the negligible entries alike), so every
      path gives NaN there, whatever the tile size and the pruning.
    - a u_bound that is NaN or negative (checked here without a host sync; the op raises for CPU
      tensors before it gets here): NaN rows for that head rather than a silently wrong answer.
    """
    if scan_v:
        bad = nonfinite_flag(v, q.shape[1], triton=triton)
    else:
        bad = torch.zeros((q.shape[0], q.shape[1], v.shape[-1]), device=q.device, dtype=torch.float32)
    if u_bound is not None:
        ub = u_bound.to(device=q.device, dtype=torch.float32).expand(q.shape[:2])
        bad = bad + torch.where(ub >= 0, 0.0, float("nan"))[:, :, None]
    return bad


def _dense_keep_from(q) -> Tensor:
    return torch.zeros(q.shape[:3], dtype=torch.int32, device=q.device)


def forward(q, k, v, c, sm_scale, log_eps, u_bound, key_mask=None, doc_ids=None, certificate="online",
            q_norm=None, k_norm=None):
    """(o, lse, u, keep_from). u: the paper's bound U the plan used ("paper"), zeros ("online", and on the
    dense short-query path); NaN for a head that `_poison` marks. keep_from (B, Hq, Tq) int32: the
    recorded kept set (module header); 0 for a poisoned head, so its backward prunes nothing (its
    gradients are NaN as in eager).
    Under "online", u_bound = +inf turns pruning off for that head; other u_bound values are not read
    by the certificate (it reads the norms q_norm (B, Hq, Tq) and k_norm (B, Hkv, Tk), computed here
    when None). key_mask / doc_ids (B, Tk): padded and packed batches (kernels/segments.py)."""
    if q.numel() == 0 or k.shape[2] == 0:                 # B, Hq or Tq = 0: empty outputs, as SDPA
        B, Hq, Tq, _ = q.shape
        return (empty_like_last(q, v.shape[-1]), q.new_zeros((B, Hq, Tq), dtype=torch.float32),
                q.new_zeros((B, Hq), dtype=torch.float32), _dense_keep_from(q))
    scale = _scale(q, sm_scale)
    reason = support.unsupported_reason(q, k, v, c)
    seg = make_segments(key_mask, doc_ids, q.shape[2], k.shape[2])
    short = reason is None and short_queries.covers(q, k, seg)      # dense whatever log_eps (its header)
    online = certificate == "online" and pruning_enabled(log_eps)
    if online or short:
        u = q.new_zeros(q.shape[:2], dtype=torch.float32)
    else:
        u = pruning_bound(q, k, scale, log_eps, u_bound, triton=reason is None)
    bad = _poison(q, v, u_bound, triton=reason is None, scan_v=not short)
    poisoned = torch.isnan(bad.sum(dim=-1))                              # (B, Hq)
    u = u + bad.sum(dim=-1)                       # NaN for a poisoned head
    if short:
        o, lse, keep_from = short_queries.forward(q, k, v, c, scale)
        o.add_(bad[:, :, None, :].to(o.dtype))
    elif reason is None:
        from acp_compile.kernels.fox_triton import forward as triton_forward
        o, lse, keep_from = triton_forward.forward_recorded(
            q, k, v, c, scale, log_eps, u, bad=bad, certificate=certificate, q_norm=q_norm, k_norm=k_norm,
            never_prune=_never_prune(q, u_bound) if online else None, seg=seg)
    else:
        support.log_fallback_once("forward", reason)
        if online:
            stats = cert_stats(q, k, c, scale, blocked.BLOCK_N, q_norm, k_norm, _never_prune(q, u_bound))
            o, lse, start = blocked_certified.forward(q, k, v, c, scale, log_eps, stats, blocked.BLOCK_M, seg)
            keep_from = keep_from_rows(start, q.shape[2], blocked.BLOCK_M, blocked.BLOCK_N)
        else:
            plan = blocked_plan(q, k, c, scale, log_eps, u, seg)
            o, lse = blocked.forward(q, k, v, c, scale, plan, seg)
            keep_from = keep_from_rows(plan.start, q.shape[2], plan.block_m, plan.block_n)
        o.add_(bad[:, :, None, :].to(o.dtype))
    keep_from = keep_from.masked_fill(poisoned[..., None], 0)
    return o, lse, u, keep_from


def _never_prune(q, u_bound) -> Tensor | None:
    """(B, Hq) bool: heads whose u_bound is +inf ("never prune that head"), or None without u_bound."""
    if u_bound is None:
        return None
    return torch.isinf(u_bound.to(device=q.device, dtype=torch.float32).expand(q.shape[:2]))


def backward(do, q, k, v, c, o, lse, sm_scale, log_eps, u_bound, key_mask=None, doc_ids=None, keep_from=None):
    if q.numel() == 0 or k.numel() == 0:                  # empty: zero gradients (no query reads a key)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(c)
    scale = _scale(q, sm_scale)
    reason = support.unsupported_reason(q, k, v, c)
    seg = make_segments(key_mask, doc_ids, q.shape[2], k.shape[2])
    if not pruning_enabled(log_eps):
        keep_from = None                          # dense: nothing was skipped, no masks to apply
    if reason is None:
        from acp_compile.kernels.fox_triton import backward as triton_backward
        return triton_backward.backward(do, q, k, v, c, o, lse, scale, log_eps, u_bound, seg=seg, keep_from=keep_from)
    support.log_fallback_once("backward", reason)
    if keep_from is not None:
        plan = recorded_plan(keep_from, k.shape[2], blocked.BLOCK_M, blocked.BLOCK_N)
        return blocked.backward(do, q, k, v, c, o, lse, scale, plan, seg, keep_from=keep_from)
    plan = blocked_plan(q, k, c, scale, log_eps, u_bound, seg)
    return blocked.backward(do, q, k, v, c, o, lse, scale, plan, seg)
