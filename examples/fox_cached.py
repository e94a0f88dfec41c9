"""Decoding the example FoX model (fox_model.FoxLM) with acp_compile's paged KV cache, one FoxKVCache per layer.

    dec = CachedFoxLM(model, batch=B, max_length=N)            # evict="auto": certified eviction on
    logits = dec.prefill(prompt)                               # (B, T0) -> (B, T0, vocab)
    step = torch.compile(dec, fullgraph=True)                  # static shapes: one graph for every step
    logits = step(token)                                       # (B, 1) -> (B, 1, vocab)

The weights are the model's own; the attention of each layer is the model's (q, k per-head RMSNorm, forget
gate log f = logsigmoid(x W_f + b_f), output norm and gate) with the cache in place of the concatenated
(k, v, c). Eviction needs a bound on future logits: with QK RMSNorm it is static,
U = scale * (sqrt(D) max|w_q|) * (sqrt(D) max|w_k|), read from the norm weights when the decoder is built
(rebuild it if the weights change).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acp_compile.cache import FoxKVCache, logit_bound, rmsnorm_norm_bound


def layer_logit_bound(attn, dtype: torch.dtype) -> float:
    """U of one ForgettingAttention layer, from its q and k RMSNorm weights."""
    D = attn.head_dim
    return logit_bound(rmsnorm_norm_bound(attn.q_norm.weight, D, dtype),
                       rmsnorm_norm_bound(attn.k_norm.weight, D, dtype), 1.0 / math.sqrt(D))


class CachedFoxLM(nn.Module):
    def __init__(self, model, batch: int, max_length: int, *, evict: bool | str = "auto", log_eps: float | None = -10.0,
                 page_size: int = 64, pool_pages: int | None = None, dtype: torch.dtype | None = None,
                 sync_checks: bool = True):
        super().__init__()
        self.model = model
        cfg = model.cfg
        weight = model.embed.weight
        dtype = dtype or weight.dtype
        self.caches = nn.ModuleList(
            FoxKVCache(batch=batch, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, head_dim=cfg.head_dim,
                       max_length=max_length, dtype=dtype, device=weight.device, page_size=page_size,
                       pool_pages=pool_pages, log_eps=log_eps,
                       u_bound=layer_logit_bound(block.attn, dtype) if evict else None, evict=evict,
                       sync_checks=sync_checks)
            for block in model.blocks)

    @staticmethod
    def _project(attn, x: Tensor):
        """x (B, T, d_model) -> q, k (B, H, T, D) after the QK norm, v (B, H, T, D), log f (B, H, T) fp32."""
        q = attn.q_norm(attn.split_heads(attn.q_proj(x)))
        k = attn.k_norm(attn.split_heads(attn.k_proj(x)))
        v = attn.split_heads(attn.v_proj(x))
        log_f = F.logsigmoid(attn.fgate_proj(x).float()).transpose(1, 2)
        return q, k, v, log_f

    @staticmethod
    def _output(attn, x: Tensor, o: Tensor) -> Tensor:
        B, T, _ = x.shape
        o = attn.o_norm(o).transpose(1, 2).reshape(B, T, -1)
        return attn.o_proj(o * torch.sigmoid(attn.ogate_proj(x)))

    def _run(self, idx: Tensor, prefill: bool) -> Tensor:
        m = self.model
        x = m.embed(idx)
        for block, cache in zip(m.blocks, self.caches):
            h = block.attn_norm(x)
            q, k, v, log_f = self._project(block.attn, h)
            dt = cache.k_pool.dtype
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
            o = cache.prefill(q, k, v, log_f) if prefill else cache.step(q, k, v, log_f)
            x = x + self._output(block.attn, h, o.to(h.dtype))
            x = x + block.mlp(block.mlp_norm(x))
        return m.lm_head(m.final_norm(x))

    def forward(self, idx: Tensor) -> Tensor:
        """A decoding step: idx (B, Tq) new tokens, Tq <= 16 -> logits (B, Tq, vocab)."""
        return self._run(idx, prefill=False)

    def prefill(self, idx: Tensor) -> Tensor:
        """The prompt on empty caches: idx (B, T0) -> logits (B, T0, vocab)."""
        return self._run(idx, prefill=True)

    def reset(self) -> None:
        for cache in self.caches:
            cache.reset()

    def memory(self) -> dict:
        """Bytes summed over the layers: reserved pool, pages in use now, peak in use."""
        total = {"reserved": 0, "in_use": 0, "peak": 0}
        for cache in self.caches:
            m = cache.memory()
            for key in total:
                total[key] += m[key]
        return total
