"""Key masks and document ids for the padded- and packed-batch tests (CPU, interpreter and GPU).

  key_mask (B, Tk) bool, True = attend; doc (B, Tk) int64 document ids (runs of equal ids)
Kinds: "left" (batched generation: each row starts with a different amount of padding), "right"
(padding after each row's tokens, so a padded query row sees the valid keys but not its diagonal),
"holes" (scattered masked keys), "docs" (packed documents of random lengths), "docs_left" (packed
documents and left padding at once), "none".
"""
from __future__ import annotations

import torch


def segment_inputs(kind: str, B: int, Tk: int, seed: int = 0, device="cpu"):
    """(key_mask or None, doc or None) for one of the kinds above."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(Tk)
    key_mask = doc = None
    if kind in ("left", "docs_left"):
        pads = torch.randint(0, max(1, Tk // 2), (B,), generator=g)
        pads[0] = min(Tk - 1, Tk // 3 + 1)                     # at least one row with real padding
        key_mask = pos[None, :] >= pads[:, None]
    elif kind == "right":
        lengths = torch.randint(max(1, Tk // 3), Tk + 1, (B,), generator=g)
        lengths[0] = max(1, (2 * Tk) // 3)
        key_mask = pos[None, :] < lengths[:, None]
    elif kind == "holes":
        key_mask = torch.rand(B, Tk, generator=g) > 0.3
    if kind in ("docs", "docs_left"):
        starts = (torch.rand(B, Tk, generator=g) < 6.0 / max(Tk, 1)).long()
        starts[:, 0] = 0
        doc = torch.cumsum(starts, dim=-1) + 3                  # ids need not start at 0
    if kind not in ("left", "right", "holes", "docs", "docs_left", "none"):
        raise ValueError(f"unknown kind {kind!r}")
    return (None if key_mask is None else key_mask.to(device)), (None if doc is None else doc.to(device))


def cu_seqlens_of(lengths: list[int], device="cpu") -> torch.Tensor:
    """cu_seqlens (N + 1,) int32 of documents with these lengths."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)
