"""The op's path for a few queries against many keys (a decoding step, a speculative block being verified):
the split-key decode kernels (kernels/fox_triton/decode.py), dense.

  covers(q, k, seg)                  Tq <= MAX_QUERIES, Tk >= MIN_KEYS, no padding or document masks
  forward(q, k, v, c, scale)         -> (o, lse, keep_from = 0)

Notation: q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), c (B, Hq, Tk) fp32.

Why: the general forward runs one program per (b, h, query block); at Tq = 1 that is B * Hq programs,
each walking the whole cache in series (3.38 ms at 128k keys, B 8, 16 heads of 128 on the H200, against
SDPA's 1.84). The decode kernels split the keys over many programs and read each kv head once for its
G query heads (1.94 ms, 1.06x SDPA; examples/results/session7_h200.md).

Why dense, whatever log_eps asks: computing nothing less is within every eps guarantee, and in a
stateless call pruning cannot pay. It needs a bound on ||k_j|| over the whole cache (a read of k, or the
caller's norms) and, for the op's NaN rule for v (acp_compile/ops.py), a pass over all of v, because a
skipped block is not read; measured on the H200 with the norms given, the pruned call took 2.15 ms
against 1.94 dense at 128k (MHA, W1 gates) and 0.64 against 0.56 with 4 kv heads. Decoding that skips
keys keeps those statistics as the cache grows: acp_compile.fox_decode with k_norm_max, and FoxKVCache.
Dense, the kernel reads every value of v into every row's product, so a NaN or infinity in v reaches
every row without a separate pass (an infinity is turned into NaN here, as the NaN rule says).
keep_from = 0 records that nothing was skipped: the backward is dense too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from acp_compile.kernels.layout import empty_like_last

MAX_QUERIES = 16          # Tq up to this many (a decode step, or a speculative block being verified): the
                          # one limit of the decode kernels, fox_decode and FoxKVCache.step
MIN_KEYS = 256            # below this the general forward is as fast (one or two key blocks per program)


def covers(q: Tensor, k: Tensor, seg) -> bool:
    return seg is None and q.shape[2] <= MAX_QUERIES and k.shape[2] >= MIN_KEYS


def forward(q: Tensor, k: Tensor, v: Tensor, c: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(o (B, Hq, Tq, Dv) with q's dimension order, lse (B, Hq, Tq) fp32, keep_from (B, Hq, Tq) int32 zeros)."""
    from acp_compile.kernels.fox_triton.decode import decode
    o, lse = decode(q, k, v, c.to(torch.float32), scale, out=empty_like_last(q, v.shape[-1]))
    o.masked_fill_(torch.isinf(o), float("nan"))       # o is a convex mix of v: inf only from an inf in v
    return o, lse, torch.zeros(q.shape[:3], dtype=torch.int32, device=q.device)
