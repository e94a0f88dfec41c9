"""A paged, static-shape KV cache for FoX decoding with certified eviction (DESIGN.md, "The KV cache").

  kv_cache.py      FoxKVCache: pages, page table, append, certified eviction, attend
  paged_decode.py  the op acp::fox_decode_paged (Triton on CUDA, the general op elsewhere)
  bounds.py        the bound on future logits that eviction needs (QK RMSNorm: static from the weights)
"""
from acp_compile.cache.bounds import logit_bound, rmsnorm_norm_bound
from acp_compile.cache.kv_cache import FoxKVCache
from acp_compile.cache.paged_decode import gather_pages

__all__ = ["FoxKVCache", "logit_bound", "rmsnorm_norm_bound", "gather_pages"]
