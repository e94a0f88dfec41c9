"""Padded and packed batches: which keys each query row may see, beyond the causal mask.

Notation (per batch element b; queries are the last Tq of Tk positions, query i at p_i = Tk - Tq + i):
  key_mask  (B, Tk) bool   True = the key may be attended (Hugging Face's attention_mask: 1 = token)
  doc       (B, Tk) int    document id of each token (packed documents)
  lo[t]     (B, Tk) int32  first position of the run of equal document ids that holds t (0 without doc)
  visible(i, j)  =  j <= p_i  and  key_mask[j]  and  j >= lo[p_i]
                 (j >= lo[p_i] with j <= p_i is "same run of document ids as p_i": attention stays
                 inside a packed document; an id that comes back after another one starts a new run)
  anchor[i] (B, Tq) int32  newest visible key of row i: max{j : visible(i, j)}, or -1 when the row has
                           no visible key (a left-padded row, or a row whose document has only padding)

Rows without a visible key return o = 0 and lse = -inf and get zero gradients (the op's semantics;
eager softmax over an all -inf row gives NaN there, a finite fill a uniform average).

The eps bound (kernels/plan.py) needs one kept key of large weight per row: with padding the diagonal
may be masked, so the plan measures decays from the anchor instead of the diagonal: an entry (i, j)
is skipped only when c[anchor_i] - c[j] < delta; since the anchor's own tile has a decay of 0 >= delta
it is always kept, the row's denominator is at least exp(s_{i,anchor_i}) and every skipped entry has
P_ij <= exp(2U + delta) = eps / Tk, so the row's skipped mass stays below eps. Key tiles wholly before
lo of a query block's first row (another document) are skipped as well (start[m] >= lo[p_first] // BN;
lo never decreases along the row, so no row of the block sees them).
Everything here is torch on the tensors' device, no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segments:
    key_valid: Tensor   # (B, Tk) bool, all True without a key mask
    lo: Tensor          # (B, Tk) int32, zeros without document ids
    anchor: Tensor      # (B, Tq) int32, -1 for a row with no visible key


def document_starts(doc: Tensor) -> Tensor:
    """lo (B, Tk) int32: the first position of the run of equal ids that holds each position."""
    B, Tk = doc.shape
    pos = torch.arange(Tk, device=doc.device)
    new_run = torch.ones_like(doc, dtype=torch.bool)
    new_run[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return torch.cummax(torch.where(new_run, pos, 0), dim=-1).values.to(torch.int32)


def make_segments(key_mask: Tensor | None, doc: Tensor | None, Tq: int, Tk: int) -> Segments | None:
    """The per-token arrays of the kernels, or None when there is neither a key mask nor document ids."""
    if key_mask is None and doc is None:
        return None
    ref = key_mask if key_mask is not None else doc
    B, device = ref.shape[0], ref.device
    pos = torch.arange(Tk, device=device)
    valid = (torch.ones((B, Tk), dtype=torch.bool, device=device) if key_mask is None
             else (key_mask != 0))
    lo = torch.zeros((B, Tk), dtype=torch.int32, device=device) if doc is None else document_starts(doc)
    last_valid = torch.cummax(torch.where(valid, pos, -1), dim=-1).values       # (B, Tk)
    rows = pos[Tk - Tq:]                                                        # (Tq,) p_i
    newest = last_valid[:, rows]                                                # (B, Tq)
    anchor = torch.where(newest >= lo[:, rows], newest, -1).to(torch.int32)
    return Segments(valid.contiguous(), lo.contiguous(), anchor.contiguous())


def visible_mask(seg: Segments | None, Tq: int, Tk: int, device=None) -> Tensor:
    """(B or 1, Tq, Tk) bool: visible(i, j) as in the header (causal included)."""
    rows = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    cols = torch.arange(Tk, device=device)[None, :]
    causal = (cols <= rows)[None]
    if seg is None:
        return causal
    lo_rows = seg.lo[:, Tk - Tq:]                                               # (B, Tq)
    return causal & seg.key_valid[:, None, :] & (cols[None] >= lo_rows[:, :, None])


def anchor_c(c: Tensor, seg: Segments | None, Tq: int) -> Tensor:
    """c at each row's anchor (B, Hq, Tq) in c's dtype: c[p_i] without segments, -inf for a row with no
    visible key (it then never keeps a tile on its own)."""
    if seg is None:
        return c[..., c.shape[-1] - Tq:]
    idx = seg.anchor.clamp_min(0).long()[:, None, :].expand(c.shape[0], c.shape[1], Tq)
    out = torch.gather(c, -1, idx)
    return out.masked_fill((seg.anchor < 0)[:, None, :], float("-inf"))


def first_document_block(seg: Segments | None, Tq: int, block_m: int, block_n: int) -> Tensor | None:
    """(B, Mq) int32: lo of each query block's first row // block_n, the first key block that any row of
    the block may see (lo never decreases along a row); None without segments."""
    if seg is None:
        return None
    Tk = seg.lo.shape[-1]
    first_rows = torch.arange(0, Tq, block_m, device=seg.lo.device) + (Tk - Tq)
    return torch.div(seg.lo[:, first_rows], block_n, rounding_mode="floor").to(torch.int32)
