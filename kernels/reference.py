"""fp64 reference for FoX attention: the definition of correctness.

Notation (one batch element b, query head h):
  q: (B, Hq, Tq, D)   k: (B, Hkv, Tk, D)   v: (B, Hkv, Tk, Dv)   c: (B, Hq, Tk) cumulative log forget gate
  key_mask (B, Tk) bool (True = attend) and doc (B, Tk) int document ids, both optional
  queries are the last Tq positions: query i sits at position p_i = Tk - Tq + i
  s_ij = scale * q_i . k_j + c[p_i] - c[j]   for visible (i, j), -inf otherwise; visible: j <= p_i
         (causal), key_mask[j], and j in the same run of equal document ids as p_i
  o_i  = sum_j softmax_j(s_ij) v_j ;  lse_i = logsumexp_j s_ij (natural log)
  a row with no visible key gives o_i = 0 and lse_i = -inf (and zero gradients)

This module runs on any device in fp64 and never imports a kernel (the visibility rule is written
out here again, independently of kernels/segments.py). `keep` (optional) is a
(B, Hq, Tq, Tk) boolean of the entries that a pruned computation visits; the reference then
computes exactly the pruned attention, so a kernel can be checked against it tightly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def repeat_kv(x: Tensor, n_q_heads: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hq, T, D) by repeating each kv head Hq // Hkv times."""
    group = n_q_heads // x.shape[1]
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def logits(q: Tensor, k: Tensor, c: Tensor, sm_scale: float | None = None, key_mask: Tensor | None = None,
           doc: Tensor | None = None) -> Tensor:
    """fp64 logits s (B, Hq, Tq, Tk) with the causal (and key / document) mask applied as -inf."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q64, k64, c64 = q.double(), repeat_kv(k.double(), Hq), c.double()
    s = scale * (q64 @ k64.transpose(-1, -2))                       # (B, Hq, Tq, Tk)
    c_rows = c64[..., Tk - Tq:]                                     # (B, Hq, Tq)
    s = s + (c_rows[..., :, None] - c64[..., None, :])              # c_i - c_j first: exact for a hard reset
    s = s.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    if doc is not None:
        s = s.masked_fill(~same_run(doc, Tq)[:, None], float("-inf"))
    return s


def same_run(doc: Tensor, Tq: int) -> Tensor:
    """(B, Tq, Tk) bool: key j <= p_i lies in the same run of equal ids as p_i (no other id between)."""
    Tk = doc.shape[-1]
    changes = torch.zeros_like(doc, dtype=torch.long)
    changes[:, 1:] = (doc[:, 1:] != doc[:, :-1]).long()
    run = torch.cumsum(changes, dim=-1)                             # (B, Tk) run index
    return run[:, Tk - Tq:, None] == run[:, None, :]


def causal_mask(Tq: int, Tk: int, device=None) -> Tensor:
    """(Tq, Tk) boolean, True where key j is visible to query i (j <= Tk - Tq + i)."""
    rows = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    cols = torch.arange(Tk, device=device)[None, :]
    return cols <= rows


def fox_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, c: Tensor, sm_scale: float | None = None, keep: Tensor | None = None,
    key_mask: Tensor | None = None, doc: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns (o, lse) in fp64: o (B, Hq, Tq, Dv), lse (B, Hq, Tq)."""
    s = logits(q, k, c, sm_scale, key_mask, doc)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # rows with no visible key: p = 0 and lse = -inf, with finite gradients (logsumexp of an all -inf
    # row would back-propagate NaN)
    empty = (s == float("-inf")).all(dim=-1)                          # (B, Hq, Tq)
    lse_safe = torch.logsumexp(s.masked_fill(empty[..., None], 0.0), dim=-1)
    p = torch.exp(s - lse_safe[..., None])
    lse = lse_safe.masked_fill(empty, float("-inf"))
    o = p @ repeat_kv(v.double(), q.shape[1])
    return o, lse


def attention_probs(q: Tensor, k: Tensor, c: Tensor, sm_scale: float | None = None) -> Tensor:
    """Dense fp64 attention probabilities (B, Hq, Tq, Tk)."""
    return torch.softmax(logits(q, k, c, sm_scale), dim=-1)


def recorded_entries(keep_from: Tensor, Tk: int) -> Tensor:
    """(B, Hq, Tq, Tk) boolean of the entries a forward kept, from its recorded keep_from (B, Hq, Tq):
    kept(i, j) <=> keep_from[i] <= j <= p_i."""
    Tq = keep_from.shape[-1]
    cols = torch.arange(Tk, device=keep_from.device)
    return (cols >= keep_from[..., None]) & causal_mask(Tq, Tk, keep_from.device)


def row_dropped_mass(q: Tensor, k: Tensor, c: Tensor, keep: Tensor, sm_scale: float | None = None) -> Tensor:
    """Dense fp64 probability mass of the causal entries outside `keep` (B, Hq, Tq, Tk), per row (B, Hq, Tq)."""
    p = attention_probs(q, k, c, sm_scale)
    return (p * (causal_mask(q.shape[2], k.shape[2], q.device) & ~keep)).sum(-1)
