"""The decode op against a paged cache: acp::fox_decode_paged, opaque to torch.compile (static shapes).

  o = torch.ops.acp.fox_decode_paged(q, k_pool, v_pool, c_pool, table, first, length, sm_scale, log_eps, u)

q (B, Hq, Tq, D), Tq <= 16; k_pool (n_pages, P, D), v_pool (n_pages, P, Dv), c_pool (n_pages, G, P) fp32
(G = Hq / Hkv); table (B, Hkv, L) int64 logical -> physical page; first (B, Hkv) int64, the first live
logical page; length () int64, the keys written (query token t at position length - Tq + t); u (B, Hq, Tq)
fp32 bounds scale |q_r . k_j| over the row's live keys. Output (B, Hq, Tq, Dv) in q's dtype.

Threshold: the per-key rule of the paper with N = L * P (the cache's capacity), delta_r = log_eps - log(N)
- 2 u_r: every key dropped by the decode then holds less than eps / N of its row's mass, and so does every
key the cache evicted (cache/kv_cache.py); the keys of a row number at most N, so their total stays
below eps whichever of the two dropped them (DESIGN.md, "The KV cache").

CUDA (and the interpreter switch): kernels/fox_triton/decode_paged.py. Elsewhere the general op
(acp::fox_attention_fwd, certificate "paper", u_bound = u) runs once per kv head and query token on the
gathered pages, with a key mask for the live keys the row sees: slow, static in shape, same guarantee.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

import acp_compile.ops  # noqa: F401  (registers torch.ops.acp.fox_attention_fwd)
from acp_compile.checks import normalize_log_eps
from acp_compile.generation import _triton_covers


def paged_threshold(log_eps: float, capacity: int, u: Tensor) -> Tensor:
    """delta (B, Hq, Tq) fp32 = log_eps - log(capacity) - 2u; -inf (dense) where u is not >= 0."""
    delta = (float(log_eps) - math.log(capacity)) - 2.0 * u.float()
    return torch.where(u >= 0, delta, float("-inf"))


@torch.library.custom_op("acp::fox_decode_paged", mutates_args=())
def fox_decode_paged(q: Tensor, k_pool: Tensor, v_pool: Tensor, c_pool: Tensor, table: Tensor, first: Tensor,
                     length: Tensor, sm_scale: float, log_eps: Optional[float], u: Tensor) -> Tensor:
    log_eps = normalize_log_eps(log_eps)
    if _triton_covers(q, k_pool, v_pool):
        from acp_compile.kernels.fox_triton.decode_paged import decode_paged
        delta = None if log_eps is None else paged_threshold(log_eps, table.shape[2] * k_pool.shape[1], u)
        o, _ = decode_paged(q, k_pool, v_pool, c_pool, table, first, length, sm_scale, delta)
        return o
    return _general_path(q, k_pool, v_pool, c_pool, table, first, length, sm_scale, log_eps, u)


@fox_decode_paged.register_fake
def _fox_decode_paged_fake(q, k_pool, v_pool, c_pool, table, first, length, sm_scale, log_eps, u):
    B, Hq, Tq, _ = q.shape
    return q.new_empty((B, Hq, Tq, v_pool.shape[2]))


def gather_pages(k_pool, v_pool, c_pool, table, first, length):
    """The cache as contiguous tensors of its capacity N = L * P (for the general path and tests):
    k (B, Hkv, N, D), v (B, Hkv, N, Dv), c (B, Hq, N) fp32, live (B, Hkv, N) bool. Slots that are not
    live (evicted, or at positions >= length) hold zeros in k and v, so nothing there is ever read."""
    B, Hkv, L = table.shape
    P, D, Dv = k_pool.shape[1], k_pool.shape[2], v_pool.shape[2]
    G, N = c_pool.shape[1], L * P
    idx = table.clamp(min=0)
    j = torch.arange(N, device=table.device)
    live = ((j // P)[None, None, :] >= first[..., None]) & (j < length)[None, None, :]
    k = torch.where(live[..., None], k_pool[idx].reshape(B, Hkv, N, D), 0)
    v = torch.where(live[..., None], v_pool[idx].reshape(B, Hkv, N, Dv), 0)
    c = c_pool[idx].permute(0, 1, 3, 2, 4).reshape(B, Hkv * G, N)
    return k, v, c, live


def _general_path(q, k_pool, v_pool, c_pool, table, first, length, scale, log_eps, u):
    B, Hq, Tq, _ = q.shape
    Hkv = table.shape[1]
    G = Hq // Hkv
    k, v, c, live = gather_pages(k_pool, v_pool, c_pool, table, first, length)
    N = k.shape[2]
    j = torch.arange(N, device=q.device)
    out = []
    for t in range(Tq):
        pos = (length - Tq + t).reshape(1, 1, 1)
        c_row = c.gather(-1, pos.expand(B, Hq, 1))                              # (B, Hq, 1): c at the row's position
        # The op puts its query at the last slot N - 1 and reads c there: a per-row shift, which softmax
        # ignores; c_row keeps it exact. Slots the row does not see get c_row too (decay 0: never pruned on).
        sees = live & (j <= pos.reshape(1, 1, 1))                              # (B, Hkv, N)
        c_t = torch.where(sees.repeat_interleave(G, dim=1), c, c_row)
        c_t = torch.cat([c_t[..., :-1], c_row], dim=-1)
        heads = []
        for hk in range(Hkv):
            hs = slice(hk * G, (hk + 1) * G)
            o, *_ = torch.ops.acp.fox_attention_fwd(
                q[:, hs, t:t + 1], k[:, hk:hk + 1], v[:, hk:hk + 1], c_t[:, hs].contiguous(), scale, log_eps,
                None if log_eps is None else u[:, hs, t].float().contiguous(), sees[:, hk], None, "paper")
            heads.append(o)
        out.append(torch.cat(heads, dim=1))
    return torch.cat(out, dim=2)
