"""FoxKVCache: a paged, static-shape KV cache for FoX decoding, with certified eviction.

    cache = FoxKVCache(batch=B, n_heads=Hq, n_kv_heads=Hkv, head_dim=D, max_length=N, u_bound=U, ...)
    o = cache.prefill(q, k, v, log_f)       # the prompt: (B, Hq, T0, D), (B, Hkv, T0, D), ..., (B, Hq, T0)
    o = cache.step(q, k, v, log_f)          # 1 to 16 new tokens: append, attend, evict

State (registered buffers, so that torch.compile treats them as static module state and CUDA graphs
(mode="reduce-overhead") replay in place; no Python-side counter changes between steps):
  k_pool (n_pages, P, D), v_pool (n_pages, P, Dv)  pages of P keys and values, shared by all (b, kv head)
  c_pool (n_pages, G, P) fp32                       c_j = sum_{l <= j} log f_l of each key, per query head
                                                    of the page's kv head (G = Hq / Hkv)
  table (B, Hkv, L + 1) int64                       logical page lp (keys lp*P .. lp*P + P - 1) -> physical
                                                    page; column L is a write sink for masked scatters
  first (B, Hkv) int64                              first live logical page (older ones were evicted)
  length () int64                                   positions written (every batch row advances together)
  c_last (B, Hq) fp32                               c at position length - 1
  k_norm_max (B, Hkv) fp32                          running max ||k_j|| (the decode's per-row bound)
  free_stack (n_pages + 1,), free_top ()            free physical pages: free_stack[:free_top] (last: sink)
  gate_ok (B, Hkv) bool                             every log f appended so far was finite and <= 0
  evicted (B, Hkv) bool                             some page of this kv head was freed
  overflow () bool                                  the pool or max_length ran out: outputs are NaN
L = ceil(max_length / P), and the capacity N = L * P is the N of every threshold (paged_decode.py).

Eviction (DESIGN.md, "The KV cache", has the proof): after each step, a page of kv head (b, hk) is freed when
for every query head h of the group, c_last[h] - c[h, page's newest key] < delta_e[h] = log_eps - log(N) -
2 U[h], with U a bound on scale |q . k| for all future queries and all keys (u_bound). Valid gates make c
non-increasing, so the condition stays true for every later query, and each freed key holds less than
eps / N of any later row's mass. Pages go in order (oldest first). No bound, log_eps None, or a gate that is
not finite and <= 0: no eviction (logged; an error when evict=True was asked). A bad gate after a page was
freed voids the guarantee for that kv head: its outputs become NaN from then on, never silently wrong.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from acp_compile.api import fox_attention
from acp_compile.cache.paged_decode import fox_decode_paged  # noqa: F401  (registers torch.ops.acp.fox_decode_paged)
from acp_compile.checks import normalize_log_eps
from acp_compile.kernels.short_queries import MAX_QUERIES as MAX_STEP_TOKENS
from acp_compile.ops import DEFAULT_LOG_EPS

logger = logging.getLogger("acp_compile")

DEFAULT_PAGE_SIZE = 64
# Margin of the eviction test (nats). The test compares fl(c_last - c_j), computed in fp32 on the stored c,
# with delta_e; fl(d) is within |d| 2^-24 of d, under 1e-4 nats for the |d| < 1000 nats where the test can
# go either way, so with this margin the inequality holds in exact arithmetic on the stored c.
EVICT_MARGIN = 2.0 ** -6


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class FoxKVCache(nn.Module):
    def __init__(self, *, batch: int, n_heads: int, n_kv_heads: int, head_dim: int, max_length: int,
                 value_dim: int | None = None, dtype: torch.dtype = torch.float32, device=None,
                 page_size: int = DEFAULT_PAGE_SIZE, pool_pages: int | None = None,
                 log_eps: float | None = DEFAULT_LOG_EPS, sm_scale: float | None = None,
                 u_bound: float | Tensor | None = None, evict: bool | str = "auto", sync_checks: bool = True):
        """u_bound: U >= sm_scale |q . k| for every future query and every key, a float or one per query
        head (Hq,); with QK RMSNorm take bounds.logit_bound(bounds.rmsnorm_norm_bound(w_q, D), ...).
        evict: "auto" (evict when the bound and the gates allow it, else log why not), True (the same, but
        an error instead of the log), False. pool_pages: physical pages (default B * Hkv * L: never runs
        out; with eviction a smaller pool serves, see pages_in_use / peak_pages). sync_checks: in eager
        mode, read the overflow and gate flags after each append and raise or log at once (a host sync);
        without it, and always under torch.compile, the flags act on the device only (NaN outputs)."""
        super().__init__()
        if evict not in (True, False, "auto"):
            raise ValueError(f"FoxKVCache: evict must be True, False or 'auto', got {evict!r}")
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"FoxKVCache: n_heads = {n_heads} must be a positive multiple of n_kv_heads = {n_kv_heads}")
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"FoxKVCache: page_size must be a power of two >= 16, got {page_size}")
        if max_length <= 0 or batch <= 0:
            raise ValueError(f"FoxKVCache: batch and max_length must be positive, got {batch}, {max_length}")
        self.B, self.Hq, self.Hkv, self.G = batch, n_heads, n_kv_heads, n_heads // n_kv_heads
        self.D, self.Dv, self.P = head_dim, value_dim or head_dim, page_size
        self.L = -(-max_length // page_size)
        self.capacity = self.L * page_size                          # N of every threshold
        self.n_pages = pool_pages if pool_pages is not None else batch * n_kv_heads * self.L
        if self.n_pages <= 0:
            raise ValueError(f"FoxKVCache: pool_pages must be positive, got {pool_pages}")
        self.log_eps = normalize_log_eps(log_eps)
        self.sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
        self.sync_checks = sync_checks
        self.evict_requested = evict
        self.evicting, reason = self._eviction_allowed(evict, u_bound)
        if not self.evicting and evict == "auto" and reason:
            logger.info("FoxKVCache: no eviction: %s", reason)
        self._gate_reported = False
        f32 = dict(device=device, dtype=torch.float32)
        i64 = dict(device=device, dtype=torch.int64)
        B, Hkv, L = batch, n_kv_heads, self.L
        self.register_buffer("k_pool", torch.zeros(self.n_pages, page_size, head_dim, device=device, dtype=dtype))
        self.register_buffer("v_pool", torch.zeros(self.n_pages, page_size, self.Dv, device=device, dtype=dtype))
        self.register_buffer("c_pool", torch.zeros(self.n_pages, self.G, page_size, **f32))
        self.register_buffer("table", torch.zeros(B, Hkv, L + 1, **i64))
        self.register_buffer("first", torch.zeros(B, Hkv, **i64))
        self.register_buffer("length", torch.zeros((), **i64))
        self.register_buffer("c_last", torch.zeros(B, n_heads, **f32))
        self.register_buffer("k_norm_max", torch.zeros(B, Hkv, **f32))
        self.register_buffer("free_stack", torch.cat([torch.arange(self.n_pages, **i64), torch.zeros(1, **i64)]))
        self.register_buffer("free_top", torch.tensor(self.n_pages, **i64))
        self.register_buffer("peak_pages", torch.zeros((), **i64))
        self.register_buffer("gate_ok", torch.ones(B, Hkv, device=device, dtype=torch.bool))
        self.register_buffer("evicted", torch.zeros(B, Hkv, device=device, dtype=torch.bool))
        self.register_buffer("overflow", torch.zeros((), device=device, dtype=torch.bool))
        delta_e = torch.full((n_heads,), float("-inf"), **f32)
        if self.evicting:
            u = torch.as_tensor(u_bound, **f32).expand(n_heads)
            delta_e = self.log_eps - math.log(self.capacity) - 2.0 * u - EVICT_MARGIN
        self.register_buffer("delta_evict", delta_e.clone())        # (Hq,) nats; -inf: never evict

    # ---------------------------------------------------------------- setup checks
    def _eviction_allowed(self, evict, u_bound) -> tuple[bool, str]:
        if evict is False:
            return False, ""
        why = None
        if self.log_eps is None:
            why = "log_eps is None (dense): nothing may be dropped"
        elif u_bound is None:
            why = ("no bound on future logits; pass u_bound >= sm_scale |q.k| for all future queries and keys "
                   "(with QK RMSNorm: acp_compile.cache.logit_bound(rmsnorm_norm_bound(w_q, D), "
                   "rmsnorm_norm_bound(w_k, D), sm_scale))")
        else:
            u = torch.as_tensor(u_bound, dtype=torch.float32)
            if u.dim() > 1 or (u.dim() == 1 and u.numel() != self.Hq):
                raise ValueError(f"FoxKVCache: u_bound must be a float or have one value per query head ({self.Hq}), "
                                 f"got shape {tuple(u.shape)}")
            if not bool(torch.isfinite(u).all()) or bool((u < 0).any()):
                why = f"u_bound must be finite and >= 0 to certify eviction, got {u.tolist()}"
        if why is None:
            return True, ""
        if evict is True:
            raise ValueError(f"FoxKVCache(evict=True): {why}")
        return False, why

    def _check_step_inputs(self, q, k, v, log_f, max_t: int | None) -> int:
        B, Hq, Hkv = self.B, self.Hq, self.Hkv
        if q is not None and (q.dim() != 4 or tuple(q.shape[:2]) != (B, Hq) or q.shape[3] != self.D):
            raise ValueError(f"FoxKVCache: q must be (B, Hq, T, D) = ({B}, {Hq}, T, {self.D}), got {tuple(q.shape)}")
        T = k.shape[2] if k.dim() == 4 else -1
        if tuple(k.shape) != (B, Hkv, T, self.D) or T < 1:
            raise ValueError(f"FoxKVCache: k must be (B, Hkv, T, D) = ({B}, {Hkv}, T, {self.D}), got {tuple(k.shape)}")
        if tuple(v.shape) != (B, Hkv, T, self.Dv):
            raise ValueError(f"FoxKVCache: v must be (B, Hkv, T, Dv) = ({B}, {Hkv}, {T}, {self.Dv}), got {tuple(v.shape)}")
        if tuple(log_f.shape) != (B, Hq, T):
            raise ValueError(f"FoxKVCache: log_f must be (B, Hq, T) = ({B}, {Hq}, {T}), the log forget gate, "
                             f"got {tuple(log_f.shape)}")
        if q is not None and q.shape[2] != T:
            raise ValueError(f"FoxKVCache: q holds {q.shape[2]} tokens but k holds {T}")
        if max_t is not None and T > max_t:
            raise ValueError(f"FoxKVCache.step takes at most {max_t} new tokens, got {T} (use prefill for a prompt)")
        if k.dtype != self.k_pool.dtype or v.dtype != self.v_pool.dtype:
            raise ValueError(f"FoxKVCache: k and v must be {self.k_pool.dtype} (the cache's dtype), got {k.dtype}, {v.dtype}")
        return T

    # ---------------------------------------------------------------- state updates
    def append(self, k: Tensor, v: Tensor, log_f: Tensor) -> Tensor:
        """Writes T new tokens at positions length .. length + T - 1; returns their c (B, Hq, T) fp32."""
        T = self._check_step_inputs(None, k, v, log_f, None)
        B, Hkv, P, L, G = self.B, self.Hkv, self.P, self.L, self.G
        dev = k.device
        n = self.length
        # 1. pages: logical pages ceil(n/P) .. ceil((n+T)/P) - 1 are new, at most A = ceil(T/P) of them
        A = -(-T // P)
        have = torch.div(n + P - 1, P, rounding_mode="floor")
        need_to = torch.div(n + T + P - 1, P, rounding_mode="floor")
        new_lp = have + torch.arange(A, device=dev)                                # (A,)
        need = new_lp < need_to                                                    # (A,) a prefix
        per_head = need.sum()
        bh = torch.arange(B * Hkv, device=dev).view(B, Hkv, 1)
        rank = bh * per_head + torch.arange(A, device=dev).view(1, 1, A)           # (B, Hkv, A) distinct pops
        src = self.free_top - 1 - rank
        short = need & (src < 0)
        ids = self.free_stack[src.clamp(0, self.n_pages - 1)]
        tgt = torch.where(need & (new_lp < L), new_lp, L).expand(B, Hkv, A)
        self.table.scatter_(2, tgt, ids)
        self.free_top.sub_(B * Hkv * per_head)
        self.overflow.logical_or_(short.any() | (n + T > self.capacity))
        self.free_top.clamp_(min=0)
        self.peak_pages.copy_(torch.maximum(self.peak_pages, self.n_pages - self.free_top))
        # 2. tokens
        pos = n + torch.arange(T, device=dev)                                      # (T,)
        off = (pos % P).expand(B, Hkv, T)
        phys = self.table[:, :, (pos // P).clamp(max=L - 1)]                       # (B, Hkv, T)
        self.k_pool.index_put_((phys, off), k)
        self.v_pool.index_put_((phys, off), v)
        c = self.c_last[..., None] + torch.cumsum(log_f.float(), dim=-1)           # (B, Hq, T)
        g = torch.arange(G, device=dev).view(1, 1, G, 1).expand(B, Hkv, G, T)
        self.c_pool.index_put_((phys[:, :, None, :].expand(B, Hkv, G, T), g, off[:, :, None, :].expand(B, Hkv, G, T)),
                               c.reshape(B, Hkv, G, T))
        self.c_last.copy_(c[..., -1])
        self.k_norm_max.copy_(torch.maximum(self.k_norm_max, torch.linalg.vector_norm(k.float(), dim=-1).amax(-1)))
        bad = ~(torch.isfinite(log_f) & (log_f <= 0))                              # NaN, +inf, -inf, > 0
        self.gate_ok.logical_and_(~bad.reshape(B, Hkv, G * T).any(-1))
        self.length.add_(T)
        if self.sync_checks and not _is_compiling():
            self._eager_checks()
        return c

    def evict(self) -> None:
        """Frees the pages that no later query can need (module header)."""
        if not self.evicting:
            return
        B, Hkv, P, L, G = self.B, self.Hkv, self.P, self.L, self.G
        dev = self.table.device
        lp = torch.arange(L, device=dev).view(1, 1, L)
        newest = torch.div(self.length - 1, P, rounding_mode="floor")             # the newest page stays
        table = self.table[:, :, :L]
        c_end = self.c_pool[:, :, P - 1][table]                                     # (B, Hkv, L, G) c of each page's last key
        decay = self.c_last.view(B, Hkv, 1, G) - c_end
        below = (decay < self.delta_evict.view(1, Hkv, 1, G)).all(-1)              # NaN decay: False
        gone = lp < self.first[..., None]
        ok = (self.gate_ok & ~self.overflow)[..., None]
        cand = gone | (below & (lp < newest) & ok)
        new_first = torch.maximum(cand.long().cumprod(-1).sum(-1), self.first)     # (B, Hkv) prefix only
        freed = ~gone & (lp < new_first[..., None])                                # (B, Hkv, L)
        flat = freed.flatten()
        dst = torch.where(flat, self.free_top + torch.cumsum(flat.long(), 0) - 1, self.n_pages)
        self.free_stack.scatter_(0, dst, table.flatten())
        self.free_top.add_(flat.sum())
        self.evicted.logical_or_(new_first > self.first)
        self.first.copy_(new_first)

    # ---------------------------------------------------------------- attention
    def attend(self, q: Tensor) -> Tensor:
        """q (B, Hq, Tq, D), Tq <= 16, for the last Tq positions written -> o (B, Hq, Tq, Dv)."""
        B, Hq, Tq, _ = q.shape
        if Tq > MAX_STEP_TOKENS:
            raise ValueError(f"FoxKVCache.attend takes at most {MAX_STEP_TOKENS} query tokens, got {Tq}")
        if self.sync_checks and not _is_compiling() and int(self.length) < Tq:
            raise ValueError(f"FoxKVCache.attend: the cache holds {int(self.length)} positions, fewer than the "
                             f"{Tq} queries; append their keys first (or use step())")
        kmax = self.k_norm_max.repeat_interleave(self.G, dim=1)                    # (B, Hq)
        u = self.sm_scale * torch.linalg.vector_norm(q.float(), dim=-1) * kmax[..., None] * (1 + 2 ** -10)
        o = torch.ops.acp.fox_decode_paged(q, self.k_pool, self.v_pool, self.c_pool, self.table[:, :, :self.L],
                                           self.first, self.length, self.sm_scale, self.log_eps, u)
        return o + self._poison(q.dtype)[:, :, None, None]

    def _poison(self, dtype) -> Tensor:
        """(B, Hq): NaN where the result is not certified (a bad gate after an eviction, or an overflow)."""
        bad = (self.evicted & ~self.gate_ok) | self.overflow
        return torch.where(bad, float("nan"), 0.0).repeat_interleave(self.G, dim=1).to(dtype)

    def step(self, q: Tensor, k: Tensor, v: Tensor, log_f: Tensor) -> Tensor:
        """1 to 16 new tokens: append them, attend from their queries, evict what no later query needs."""
        self._check_step_inputs(q, k, v, log_f, MAX_STEP_TOKENS)
        self.append(k, v, log_f)
        o = self.attend(q)
        self.evict()
        return o

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, log_f: Tensor, **attention_options) -> Tensor:
        """The prompt, on an empty cache: causal FoX attention of the T0 tokens among themselves (the general
        op, acp_compile.fox_attention), then append and evict."""
        self._check_step_inputs(q, k, v, log_f, None)
        if not _is_compiling() and int(self.length) != 0:
            raise ValueError("FoxKVCache.prefill needs an empty cache (call reset() first); use step() for new tokens")
        self.append(k, v, log_f)
        o = fox_attention(q, k, v, log_f, sm_scale=self.sm_scale, log_eps=self.log_eps, **attention_options)
        self.evict()
        return o

    @torch.no_grad()
    def reset(self) -> None:
        """Empties the cache (keeps the buffers: a compiled step stays valid)."""
        self.table.zero_()
        self.first.zero_()
        self.length.zero_()
        self.c_last.zero_()
        self.k_norm_max.zero_()
        self.free_stack[:-1].copy_(torch.arange(self.n_pages, device=self.free_stack.device))
        self.free_top.fill_(self.n_pages)
        self.peak_pages.zero_()
        self.gate_ok.fill_(True)
        self.evicted.zero_()
        self.overflow.zero_()
        self._gate_reported = False

    # ---------------------------------------------------------------- reporting
    def page_bytes(self) -> int:
        e = self.k_pool.element_size()
        return self.P * (self.D + self.Dv) * e + self.G * self.P * 4

    def pages_in_use(self) -> Tensor:
        return self.n_pages - self.free_top

    def memory(self) -> dict:
        """Bytes (host ints; one sync): the pool reserved, the pages in use now, the peak in use."""
        return {"reserved": self.n_pages * self.page_bytes(), "in_use": int(self.pages_in_use()) * self.page_bytes(),
                "peak": int(self.peak_pages) * self.page_bytes(), "length": int(self.length)}

    def _eager_checks(self) -> None:
        if bool(self.overflow):
            need = int(self.length)
            raise RuntimeError(
                f"FoxKVCache overflow: {need} positions written (max_length capacity {self.capacity}), "
                f"{int(self.peak_pages)} of {self.n_pages} pages in use; build the cache with a larger max_length "
                f"or pool_pages (outputs from now on are NaN)")
        if self.evicting and not self._gate_reported and not bool(self.gate_ok.all()):
            self._gate_reported = True
            msg = ("a log forget gate was not finite and <= 0, so c may grow and an evicted key could matter "
                   "again: eviction stops for the affected kv heads")
            if bool((self.evicted & ~self.gate_ok).any()):
                msg += "; pages of those heads were already evicted, so their outputs are NaN from now on"
            if self.evict_requested is True:
                raise ValueError(f"FoxKVCache(evict=True): {msg}. Pass gates log f = logsigmoid(...) <= 0, or "
                                 f"evict=False")
            logger.warning("FoxKVCache: %s", msg)
