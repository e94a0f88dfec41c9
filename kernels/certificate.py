"""The online certificate (DESIGN.md section 1.1): when a query block may stop visiting older key blocks.

Notation (one batch element b, query head h, kv head h // g; query i sits at key position p_i):
  a_i      scale * ||q_i||, fp32, rounded up by NORM_SLACK           (B, Hq, Tq)
  a_hi     max_i a_i over the head                                     (B, Hq)
  K_n      max ||k_j|| over key block n (keys [n*BN, (n+1)*BN))        (B, Hkv, Nk) -> per query head
  C_n      min c_j over key block n                                    (B, Hq, Nk)
  CMIN[n]  min_{b <= n} C_b                                            (B, Hq, Nk) prefix over blocks
  PHI[n]   max_{b <= n} (a_hi K_b - C_b)                               (B, Hq, Nk) prefix over blocks
  After visiting keys [n*BN, p_i] newest first, row i knows its visited mass
  V_i = sum_{visited j} exp(s_ij) = exp(lse_vis_i). Every unvisited key j < n*BN has
      s_ij <= a_i ||k_j|| + c_i - c_j <= c_i + max_{b < n} (a_i K_b - C_b) = c_i + f_n(a_i)
  and f_n is convex in a (a maximum of lines), so on [0, a_hi]
      f_n(a_i) <= (1 - t_i) f_n(0) + t_i f_n(a_hi) = -CMIN[n-1] + t_i (PHI[n-1] + CMIN[n-1]),  t_i = a_i / a_hi.
  log_bound_i(n) = log(n*BN) + c_i + that: the log of an upper bound on the mass of all keys [0, n*BN).
  The block stops at boundary n when log_bound_i(n) <= log_eps + lse_vis_i for every row i; then the
  dropped mass of row i is at most eps * V_i <= eps * Z_i (Z_i the full denominator).
NaN anywhere (q, k, c) makes a comparison False: the block does not stop (it computes densely). An
infinite norm or c = -inf gives inf - inf = NaN in the bound: no stop either.

Norms may be passed in (the op's q_norm (B, Hq, Tq) and k_norm (B, Hkv, Tk), fp32): they must be at
least the true norms, or the guarantee is void; the compiled graph computes them next to q and k.
Per-key norms (not per-block maxima) are taken so that the statistics do not depend on a kernel's
tile size: the block maxima are 1/D of a read of k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from acp_compile.kernels.blocks import block_max, block_min

# Norms are rounded up by this factor: fp32 rounding of a sum of D squares never makes a norm smaller
# than the exact one by more than about D * 2^-24 relative (D <= 256: 2^-16); 2^-12 leaves a margin.
NORM_SLACK = 1.0 + 2.0 ** -12


def row_norms(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, H, T) fp32 norms, rounded up by NORM_SLACK (see above)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=-1, dtype=acc).to(torch.float32) * NORM_SLACK


@dataclass(frozen=True)
class CertStats:
    """What the certificate reads; every tensor fp32 (fp64 when c is fp64)."""
    a: Tensor        # (B, Hq, Tq)  scale * ||q_i||
    a_hi: Tensor     # (B, Hq)      max_i a_i
    cmin: Tensor     # (B, Hq, Nk)  CMIN prefix
    phi: Tensor      # (B, Hq, Nk)  PHI prefix
    block_n: int


def cert_stats(q: Tensor, k: Tensor, c: Tensor, sm_scale: float, block_n: int,
               q_norm: Tensor | None = None, k_norm: Tensor | None = None,
               never_prune: Tensor | None = None) -> CertStats:
    """The certificate's statistics for q (B, Hq, Tq, D), k (B, Hkv, Tk, D), c (B, Hq, Tk); no host sync.
    never_prune (B, Hq) bool, optional: those heads get a = NaN, so no block of theirs ever stops."""
    B, Hq = q.shape[:2]
    Hkv = k.shape[1]
    dt = torch.float64 if c.dtype == torch.float64 else torch.float32
    qn = row_norms(q) if q_norm is None else q_norm.to(device=q.device, dtype=torch.float32)
    kn = row_norms(k) if k_norm is None else k_norm.to(device=q.device, dtype=torch.float32)
    a = (qn * float(sm_scale)).to(dt)                                        # (B, Hq, Tq)
    if never_prune is not None:
        a = a + torch.where(never_prune, float("nan"), 0.0).to(device=a.device, dtype=dt)[..., None]
    a_hi = a.amax(dim=-1) if a.shape[-1] else a.new_zeros((B, Hq))          # (B, Hq)
    k_blk = block_max(kn.to(dt), block_n)          # (B, Hkv, Nk)
    Nk = k_blk.shape[-1]
    k_blk = k_blk[:, :, None].expand(B, Hkv, Hq // Hkv, Nk).reshape(B, Hq, Nk)
    c_blk = block_min(c.to(dt), block_n)            # (B, Hq, Nk)
    cmin = torch.cummin(c_blk, dim=-1).values
    phi = torch.cummax(a_hi[..., None] * k_blk - c_blk, dim=-1).values
    return CertStats(a, a_hi, cmin, phi, block_n)


def log_unvisited_bound(n: int, a: Tensor, c_rows: Tensor, a_hi: Tensor, cmin: Tensor, phi: Tensor,
                        block_n: int) -> Tensor:
    """log of an upper bound on the mass sum_{j < n*BN} exp(s_ij), per row: a, c_rows (G, R) (the rows'
    a_i and c[p_i]), a_hi (G,), cmin / phi (G, Nk) prefixes. -inf for n = 0 (nothing left)."""
    if n <= 0:
        return torch.full_like(c_rows, float("-inf"))
    cm, ph = cmin[:, n - 1, None], phi[:, n - 1, None]                       # (G, 1)
    hi = a_hi[:, None]
    t = torch.where(hi > 0, a / hi, torch.zeros_like(a)).clamp(max=1.0)     # NaN stays NaN
    return math.log(n * block_n) + c_rows + (-cm + t * (ph + cm))


def stops(log_bound: Tensor, lse_visited: Tensor, log_eps: float, live: Tensor | None = None) -> Tensor:
    """(G,) bool: every row's unvisited bound is within eps of its visited mass (NaN: False). live
    (G, R) bool, optional: only those rows count (a row with no visible key at all outputs 0 and
    drops nothing)."""
    holds = log_bound <= log_eps + lse_visited
    if live is not None:
        holds = holds | ~live
    return holds.all(dim=-1)


def keep_from_rows(start: Tensor, Tq: int, block_m: int, block_n: int) -> Tensor:
    """start (B, H, Mq) key blocks -> keep_from (B, H, Tq) int32: the first kept key of each row."""
    rows = torch.arange(Tq, device=start.device) // block_m
    return (start[..., rows] * block_n).to(torch.int32)
