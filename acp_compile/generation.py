"""Decoding: FoX attention of a few new tokens against a long KV cache, with ACP.

    o = acp_compile.fox_decode(q, k_cache, v_cache, c_cache, k_norm_max=kmax)

q (B, Hq, Tq, D) with Tq <= 16 (one new token, or a block of speculative tokens being verified); the
cache k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv) and c (B, Hq, Tk), the running cumulative log forget gate
(c_t = c_{t-1} + log f_t, fp32), already holding the new tokens at its last Tq positions. Output
(B, Hq, Tq, Dv) in q's dtype. Grouped-query attention reads each kv head once for its G query heads.

Threshold, per query row r (tighter than the training op's per-head bound, and needing no read of q
and k beyond this step's q): U_r = sm_scale * ||q_r|| * K, with K bounding ||k_j|| over the cache of
the row's kv head: `k_norm_max` (B, Hkv), which a cache keeps as a running maximum when it appends
keys (no per-step read of k); or, without it, computed here from k (one read of the cache: correct,
not fast). delta_r = log_eps - log(Tk) - 2 U_r; a key block whose largest decay is below delta_r for
every row of the kv group is skipped, so each row drops at most eps of its attention mass.
`u_bound` (a float or (B, Hq)) replaces U_r as in fox_attention; log_eps=None computes every key.

On CUDA (and under the Triton interpreter switch) the split-key kernels of kernels/fox_triton/decode.py
run; anything else goes to the general op (acp::fox_attention_fwd), with the same result up to eps.
NaN semantics: a NaN or infinity in a skipped key block is not seen (the general op's scan of all of v
would cost a read of the whole cache per step); NaN in q, c or the keys read spreads as in eager.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

import acp_compile.ops  # noqa: F401  (registers torch.ops.acp.*)
from acp_compile.checks import check_scale, normalize_log_eps
from acp_compile.kernels.short_queries import MAX_QUERIES as MAX_DECODE_QUERIES
from acp_compile.ops import DEFAULT_LOG_EPS


def fox_decode(q: Tensor, k: Tensor, v: Tensor, c: Tensor, *, sm_scale: float | None = None,
               log_eps: float | None = DEFAULT_LOG_EPS, u_bound: Tensor | float | None = None,
               k_norm_max: Tensor | None = None, splits: int | None = None) -> Tensor:
    _check(q, k, v, c, k_norm_max)
    check_scale(sm_scale)
    log_eps = normalize_log_eps(log_eps)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    if B == 0 or Hq == 0 or Tq == 0:
        return q.new_empty((B, Hq, Tq, v.shape[3]))
    delta = None
    if log_eps is not None:
        delta = log_eps - math.log(Tk) - 2 * _row_bound(q, k, scale, u_bound, k_norm_max)    # (B, Hq, Tq)
    if _triton_covers(q, k, v):
        from acp_compile.kernels.fox_triton.decode import decode
        o, _ = decode(q, k, v, c.to(torch.float32), scale, delta, splits)
        return o
    # the general op prunes with a per-head bound: hand it the largest row bound of each head
    ub = None
    if log_eps is not None:
        ub = ((log_eps - math.log(Tk) - delta) / 2).amax(dim=-1)                               # (B, Hq)
    o, *_ = torch.ops.acp.fox_attention_fwd(q, k, v, c.to(torch.float32), scale, log_eps, ub)
    return o


def _row_bound(q, k, scale, u_bound, k_norm_max) -> Tensor:
    """U_r (B, Hq, Tq) fp32: a bound on scale |q_r . k_j| over the row's keys."""
    B, Hq, Tq, _ = q.shape
    if u_bound is not None:
        ub = torch.as_tensor(u_bound, dtype=torch.float32, device=q.device)
        return ub.expand(B, Hq)[:, :, None].expand(B, Hq, Tq)
    if k_norm_max is None:
        k_norm_max = torch.linalg.vector_norm(k.float(), dim=-1).amax(dim=-1)                 # (B, Hkv)
    G = Hq // k.shape[1]
    kmax = k_norm_max.float().repeat_interleave(G, dim=1)                                      # (B, Hq)
    qn = torch.linalg.vector_norm(q.float(), dim=-1)                                           # (B, Hq, Tq)
    # rounding margin: fp32 norms of at most 256 terms are within 2^-12 relative
    return scale * qn * kmax[:, :, None] * (1 + 2 ** -10)


def _triton_covers(q, k, v) -> bool:
    from acp_compile.kernels.fox_triton import support
    if q.device.type != "cuda" and not support.interpreter_on_cpu():
        return False
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < support.MIN_CAPABILITY:
        return False
    dtypes = support.GPU_DTYPES if q.device.type == "cuda" else support.INTERPRETER_DTYPES
    return (q.dtype in dtypes and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] <= support.MAX_HEAD_DIM and v.shape[-1] <= support.MAX_HEAD_DIM)


def _check(q, k, v, c, k_norm_max) -> None:
    for name, t, dim in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("c", c, 3)):
        if not isinstance(t, Tensor) or t.dim() != dim:
            raise ValueError(f"fox_decode: {name} must be a {dim}-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Tq > MAX_DECODE_QUERIES:
        raise ValueError(f"fox_decode: q holds {Tq} new tokens; the decode path takes at most "
                         f"{MAX_DECODE_QUERIES} (use acp_compile.fox_attention for prefill)")
    if (Bk, Dk) != (B, D) or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"fox_decode: k {tuple(k.shape)} must be (B, Hkv, Tk, D) with q's B = {B} and D = {D} and "
                         f"Hq = {Hq} a multiple of Hkv")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"fox_decode: v {tuple(v.shape)} must match k {tuple(k.shape)} in (B, Hkv, Tk)")
    if tuple(c.shape) != (B, Hq, Tk):
        raise ValueError(f"fox_decode: c must be (B, Hq, Tk) = {(B, Hq, Tk)}, the cumulative log gate of the "
                         f"cache, got {tuple(c.shape)}")
    if Tq > Tk:
        raise ValueError(f"fox_decode: the cache (Tk = {Tk}) must already hold the {Tq} new tokens")
    if not (q.device == k.device == v.device == c.device):
        raise ValueError("fox_decode: q, k, v and c must be on one device")
    if k_norm_max is not None and (not isinstance(k_norm_max, Tensor) or tuple(k_norm_max.shape) != (B, Hkv)):
        raise ValueError(f"fox_decode: k_norm_max must be a (B, Hkv) = {(B, Hkv)} tensor bounding ||k_j|| per kv head")
