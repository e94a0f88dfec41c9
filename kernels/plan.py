"""The ACP plan in PyTorch: which (query block, key block) tiles may be skipped.

Notation (per batch element b and query head h; GQA maps h to kv head h // (Hq // Hkv)):
  U      bound on |scale * q_i . k_j|: scale * max_i ||q_i|| * max_j ||k_j||, or the caller's u_bound
  delta  log_eps - log(Tk) - 2U ; -inf when pruning is off (log_eps None or -inf) or U is not >= 0
  tile (m, n): query rows [m*BM, (m+1)*BM) of Tq, keys [n*BN, (n+1)*BN) of Tk
  tile_max(m, n) = max_{i in m} c[a_i] - min_{j in n} c[j]   (exact block extrema: safe for any c)
           a_i = p_i (the diagonal) without a key mask; with padding or packed documents the row's
           anchor, its newest visible key (kernels/segments.py: why the bound then still holds)
  n_hi(m) last key block holding a causal entry of query block m (it holds a diagonal entry)
  start[m] number of leading key blocks 0.. that are all skipped (tile_max < delta); the plan
           stops at the first kept tile, so kept(m, n) <=> start[m] <= n <= n_hi(m); with packed
           documents at least lo[p_first] // BN (the key blocks before the block's first document)
  end[n]   1 + the last query block m with kept(m, n), or 0 when no query block keeps it
           (exclusive bound for the dk/dv loop; for a non-monotone c the kept m's between the
           diagonal and end[n] need not be contiguous: test kept(m, n) per tile)

Every skipped entry has c_i - c_j < delta, so exp(s_ij) <= exp(U + delta); the kept diagonal
gives a denominator of at least exp(-U); the skipped mass of each row is at most
Tk * exp(2U + delta) = eps. Everything here runs on the tensors' device without a host sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from acp_compile.kernels.blocks import block_max, block_min
from acp_compile.kernels.recorded import causal_last_key_block, covering_indices
from acp_compile.kernels.segments import Segments, anchor_c, first_document_block
from acp_compile.kernels.threshold import pruning_enabled, threshold_delta


@dataclass(frozen=True)
class Plan:
    block_m: int
    block_n: int
    delta: Tensor    # (B, Hq) fp32
    start: Tensor    # (B, Hq, Mq) int32: first kept key block of each query block
    end: Tensor      # (B, Hq, Nk) int32: exclusive last query block keeping each key block
    n_hi: Tensor     # (Mq,) int32: last causal key block of each query block

    @property
    def num_query_blocks(self) -> int:
        return self.start.shape[-1]

    @property
    def num_key_blocks(self) -> int:
        return self.end.shape[-1]


def torch_qk_bound(q: Tensor, k: Tensor, sm_scale: float) -> Tensor:
    """Paper's U = scale * max_i ||q_i|| * max_j ||k_j|| per (batch, query head): (B, Hq) fp32."""
    Hq, Hkv = q.shape[1], k.shape[1]
    q_norm = torch.linalg.vector_norm(q.float(), dim=-1).amax(dim=-1)     # (B, Hq)
    k_norm = torch.linalg.vector_norm(k.float(), dim=-1).amax(dim=-1)     # (B, Hkv)
    B, Hkv = k_norm.shape
    k_norm = k_norm[:, :, None].expand(B, Hkv, Hq // Hkv).reshape(B, Hq)   # (B, Hq), no host sync
    return sm_scale * q_norm * k_norm


def nonfinite_flag(v: Tensor, n_q_heads: int, triton: bool = False) -> Tensor:
    """(B, Hq, D) fp32: NaN in column d of each query head whose kv head's v holds a NaN or an infinity
    in column d (at any position), else 0. One pass over v, no host sync (the Triton pass on covered
    inputs, torch otherwise)."""
    if triton:
        from acp_compile.kernels.fox_triton.plan import nonfinite_flag as device_nonfinite_flag
        return device_nonfinite_flag(v, n_q_heads)
    B, Hkv, _, D = v.shape
    bad = ~torch.isfinite(v).all(dim=2)                                  # (B, Hkv, D)
    flag = torch.where(bad, float("nan"), 0.0).to(device=v.device, dtype=torch.float32)
    return flag[:, :, None].expand(B, Hkv, n_q_heads // Hkv, D).reshape(B, n_q_heads, D)


def head_delta(q: Tensor, k: Tensor, sm_scale: float, log_eps: float | None, u_bound: Tensor | None) -> Tensor:
    """delta per (batch, query head), fp32 (B, Hq) (kernels/threshold.py); -inf when pruning is off.
    U is the caller's u_bound, or computed from q and k when it is None. A negative or NaN U (a wrong
    u_bound, or NaN in q or k) turns pruning off for that head, on the device."""
    B, Hq, Tk = q.shape[0], q.shape[1], k.shape[2]
    if not pruning_enabled(log_eps):
        return torch.full((B, Hq), float("-inf"), device=q.device, dtype=torch.float32)
    u = torch_qk_bound(q, k, sm_scale) if u_bound is None else u_bound.to(q.device, torch.float32).expand(B, Hq)
    return threshold_delta(log_eps, Tk, u)


def block_extrema(c: Tensor, Tq: int, block_m: int, block_n: int, seg: Segments | None = None) -> tuple[Tensor, Tensor]:
    """Max of c at the rows' anchors over each query block (B, Hq, Mq) and min of c over each key
    block (B, Hq, Nk)."""
    c = c.float()
    c_max_q = block_max(anchor_c(c, seg, Tq), block_m)
    c_min_k = block_min(c, block_n)
    return c_max_q, c_min_k


def tile_skip_mask(delta: Tensor, c: Tensor, Tq: int, block_m: int, block_n: int,
                   seg: Segments | None = None) -> Tensor:
    """(B, Hq, Mq, Nk) bool: tile whose largest decay lies below delta (before the prefix rule)."""
    c_max_q, c_min_k = block_extrema(c, Tq, block_m, block_n, seg)
    tile_max = c_max_q[..., :, None] - c_min_k[..., None, :]
    return tile_max < delta[..., None, None]                              # NaN compares False: kept


def make_plan(
    q: Tensor, k: Tensor, c: Tensor, sm_scale: float, log_eps: float | None, u_bound: Tensor | None,
    block_m: int, block_n: int, seg: Segments | None = None,
) -> Plan:
    """The plan for q (B, Hq, Tq, D), k (B, Hkv, Tk, D), c (B, Hq, Tk), segments (kernels/segments.py)."""
    Tq, Tk = q.shape[2], k.shape[2]
    delta = head_delta(q, k, sm_scale, log_eps, u_bound)
    n_hi = causal_last_key_block(Tq, Tk, block_m, block_n, q.device)       # (Mq,)
    skip = tile_skip_mask(delta, c, Tq, block_m, block_n, seg)             # (B, Hq, Mq, Nk)
    Nk = skip.shape[-1]
    n_idx = torch.arange(Nk, device=q.device)
    causal = n_idx[None, :] <= n_hi[:, None]                               # (Mq, Nk)
    # Leading run of skipped tiles; a tile at or past the diagonal block is never counted.
    start = torch.cumprod((skip & causal).to(torch.int32), dim=-1).sum(dim=-1, dtype=torch.int32)
    doc_start = first_document_block(seg, Tq, block_m, block_n)            # (B, Mq): other documents
    if doc_start is not None:
        start = torch.maximum(start, doc_start[:, None, :])
    kept = (n_idx >= start[..., None]) & causal                            # (B, Hq, Mq, Nk)
    m_idx = torch.arange(1, kept.shape[-2] + 1, device=q.device, dtype=torch.int32)
    end = (kept.to(torch.int32) * m_idx[:, None]).amax(dim=-2).to(torch.int32)   # (B, Hq, Nk)
    return Plan(block_m, block_n, delta, start.to(torch.int32), end, n_hi)


def kept_tiles(plan: Plan) -> Tensor:
    """(B, Hq, Mq, Nk) bool of the tiles that the plan computes."""
    n_idx = torch.arange(plan.num_key_blocks, device=plan.start.device)
    return (n_idx >= plan.start[..., None]) & (n_idx <= plan.n_hi[:, None])


def kept_entries(plan: Plan, Tq: int, Tk: int) -> Tensor:
    """(B, Hq, Tq, Tk) bool of the attention entries that the plan computes (tests and pictures only)."""
    tiles = kept_tiles(plan)
    rows = torch.arange(Tq, device=tiles.device) // plan.block_m
    cols = torch.arange(Tk, device=tiles.device) // plan.block_n
    causal = torch.arange(Tk, device=tiles.device)[None, :] <= torch.arange(Tq, device=tiles.device)[:, None] + (Tk - Tq)
    return tiles[..., rows, :][..., cols] & causal


def skipped_fraction(plan: Plan) -> Tensor:
    """Fraction of causal tiles skipped, per (batch, head): (B, Hq) fp32."""
    causal_tiles = (plan.n_hi.to(torch.float32) + 1).sum()
    skipped = plan.start.to(torch.float32).sum(dim=-1)
    return skipped / causal_tiles



def recorded_plan(keep_from: Tensor, Tk: int, block_m: int, block_n: int) -> Plan:
    """The plan of a (block_m, block_n) partition that covers the kept set a forward recorded
    (kernels/recorded.py); delta is NaN: this plan comes from no threshold."""
    start, end, n_hi = covering_indices(keep_from, Tk, block_m, block_n)
    delta = torch.full(keep_from.shape[:2], float("nan"), device=keep_from.device)
    return Plan(block_m, block_n, delta, start, end, n_hi)
