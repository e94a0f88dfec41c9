"""A kept set recorded by a forward, and the tile indices that cover it in another tile partition.

Notation: keep_from (B, Hq, Tq) int32, the first kept key of each row (the forward's fourth output):
kept(i, j) <=> keep_from[i] <= j <= p_i, p_i = Tk - Tq + i. A partition (block_m, block_n) has
Mq = ceil(Tq / block_m) query blocks and Nk = ceil(Tk / block_n) key blocks; n_hi(m) is the key block
of the last position of query block m.
  start[m] = min(n_hi(m), min_{i in m} keep_from[i] // block_n)       every tile holding a kept entry
  end[n]   = 1 + max{m : start[m] <= n}, 0 if none                      exclusive query bound of key block n
             (= #{m : smin[m] <= n}, smin the suffix minimum of start: a sorted search, no scatter)
When some m' keeps tile (m', n), the largest m with start[m] <= n is >= m' and keeps it too (n_hi grows
with m), so end[n] is 1 + the last query block keeping n; when none does, end[n] is at most the first
query block that reaches n, so a loop over [m_lo(n), end[n]) is empty. Query blocks below end[n] need
not all keep n (c not monotone): the kernels test start[m] <= n per tile, and mask the entries
j < keep_from[i] inside the tiles they visit, so they compute exactly the recorded set (a superset of
tiles, never of entries), whatever the forward's partition was. Device ops only, no host sync.
"""
from __future__ import annotations

import torch
from torch import Tensor

from acp_compile.kernels.blocks import block_max, block_min


def causal_last_key_block(Tq: int, Tk: int, block_m: int, block_n: int, device=None) -> Tensor:
    """n_hi (Mq,) int32: the key block of the last position of each query block."""
    Mq = -(-Tq // block_m)
    last_row = torch.clamp((torch.arange(Mq, device=device) + 1) * block_m, max=Tq) - 1
    return ((Tk - Tq + last_row) // block_n).to(torch.int32)


def covering_indices(keep_from: Tensor, Tk: int, block_m: int, block_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(start (B, Hq, Mq), end (B, Hq, Nk), n_hi (Mq,)), int32 contiguous; see the module header."""
    B, Hq, Tq = keep_from.shape
    Nk = -(-Tk // block_n)
    start = block_min(keep_from.to(torch.int64), block_m) // block_n                  # (B, Hq, Mq)
    n_hi = causal_last_key_block(Tq, Tk, block_m, block_n, keep_from.device)
    start = torch.minimum(start, n_hi.to(torch.int64))                    # the diagonal is always kept
    # end[n] = 1 + max{m : start[m] <= n}: with the suffix minimum smin[m] = min_{m' >= m} start[m']
    # (non-decreasing in m) that is the number of m with smin[m] <= n, a sorted search. (A scatter-max
    # into end[] cost 95 us at W1 16k on the H200: every query block of a head hits a few slots.)
    smin = torch.flip(torch.cummin(torch.flip(start, dims=(-1,)), dim=-1).values, dims=(-1,)).contiguous()
    ns = torch.arange(Nk, device=keep_from.device, dtype=torch.int64).expand(B, Hq, Nk).contiguous()
    end = torch.searchsorted(smin, ns, right=True)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous(), n_hi


def whole_from(keep_from: Tensor, block_m: int, block_n: int) -> Tensor:
    """whole (B, Hq, Mq) int32 contiguous: the first key block that every row of query block m keeps
    whole, ceil(max_{i in m} keep_from[i] / block_n). Tiles (m, n) with n >= whole[m] hold no entry
    j < keep_from[i], so the kernels skip the per-entry mask there (rows past Tq do not count)."""
    return ((block_max(keep_from.to(torch.int64), block_m) + block_n - 1) // block_n).to(torch.int32).contiguous()


def recorded_aligned(keep_from: Tensor, block_m: int, block_n: int) -> Tensor:
    """(1,) int32 on the device, 1 when keep_from holds one value per block_m rows and that value is a
    multiple of block_n: then the covering tiles of this partition are exactly the recorded set (a tile
    is kept whole or not at all) and no entry needs a mask. True for the Triton forward's own sets when
    the partition nests in its tiles (its keep_from is start * its block_n over block_m rows)."""
    kf = keep_from.to(torch.int64)
    hi, lo = block_max(kf, block_m), block_min(kf, block_m)
    ok = (hi == lo) & (hi % block_n == 0)
    return ok.all().to(torch.int32).reshape(1)
