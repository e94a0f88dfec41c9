"""The online certificate's stop test inside the Triton forward (DESIGN.md 1.1, kernels/certificate.py).

Notation (one program = query block m of one (batch b, query head h); natural-log units):
  a_t (BM,)   t_i = a_i / a_hi in [0, 1] (0 when a_hi = 0; NaN when a_i is NaN: never stops)
  cq (BM,)    c[p_i];  lse_vis (BM,) log of the mass row i has visited so far
  CMIN_BH, PHI_BH  pointers to the (b, h) rows of the prefixes CMIN[n], PHI[n] (Nk,) fp32
  n           the boundary: key blocks n .. n_hi visited, keys [0, n * BN) not yet
  bound_i = log(n * BN) + c_i - CMIN[n-1] + t_i (PHI[n-1] + CMIN[n-1])   (log of the unvisited mass)
The block visits key block n - 1 unless n = 0 or bound_i <= log_eps + lse_vis_i for every valid row.
A NaN bound or NaN lse_vis compares False: the block keeps visiting (down to n = 0, dense).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cert_must_visit(n, a_t, cq, lse_vis, row_ok, CMIN_BH, PHI_BH, log_eps, BLOCK_N: tl.constexpr):
    """Scalar bool: the block must visit key block n - 1 (see the module header)."""
    idx = tl.maximum(n - 1, 0)
    cm = tl.load(CMIN_BH + idx)
    ph = tl.load(PHI_BH + idx)
    count = (tl.maximum(n, 1) * BLOCK_N).to(tl.float32)
    bound = tl.log(count) + cq + (a_t * (ph + cm) - cm)                  # (BM,)
    holds = bound <= log_eps + lse_vis
    fails = tl.where(row_ok, tl.where(holds, 0, 1), 0)
    return (n > 0) & (tl.max(fails, axis=0) > 0)
