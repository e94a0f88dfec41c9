"""Shared cases for the KV cache tests (CPU general path, interpreter, GPU): a token stream with W1-like gates,
a decoding loop that drives FoxKVCache caches side by side, and the fp64 checks made at every step.

Stream (one sequence of T tokens, batch B): q (B, Hq, T, D), k (B, Hkv, T, D) RMSNorm-like (x / rms(x) * w
with |w| <= W_MAX, so that u_bound = scale * D * W_MAX^2 is a true bound), v (B, Hkv, T, Dv) normal,
log_f (B, Hq, T) = -rate_h * U(0.5, 1.5): "fast" heads forget within tens of tokens, the last head of
each kv group is global (rate 1e-6), so a kv head can be freed only when its fast query heads all agree
(GQA) and not at all when it serves a global head.
"""
from __future__ import annotations

import math

import torch

from acp_compile.cache import FoxKVCache, gather_pages
from acp_compile.kernels.reference import fox_attention_reference

W_MAX = 1.2


def rms_like(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).sqrt() * w


def make_stream(B=2, Hq=4, Hkv=2, D=24, Dv=40, T=300, fast_rate=0.5, seed=0, global_per_group=1,
                device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    wq = 0.5 + (W_MAX - 0.5) * torch.rand(D, generator=g)
    wk = 0.5 + (W_MAX - 0.5) * torch.rand(D, generator=g)
    q = rms_like(torch.randn(B, Hq, T, D, generator=g), wq)
    k = rms_like(torch.randn(B, Hkv, T, D, generator=g), wk)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    G = Hq // Hkv
    rates = torch.full((Hq,), fast_rate)
    for hk in range(Hkv):
        if hk % 2 == 1 or Hkv == 1:          # every other kv group holds global heads
            rates[hk * G + G - global_per_group: hk * G + G] = 1e-6
    log_f = -rates[None, :, None] * (0.5 + torch.rand(B, Hq, T, generator=g))
    to = dict(device=device)
    return dict(q=q.to(dtype).to(**to), k=k.to(dtype).to(**to), v=v.to(dtype).to(**to), log_f=log_f.to(**to),
                u_bound=D ** -0.5 * D * W_MAX ** 2, B=B, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, T=T)


def new_cache(s, evict, max_length=None, page_size=16, **kw):
    return FoxKVCache(batch=s["B"], n_heads=s["Hq"], n_kv_heads=s["Hkv"], head_dim=s["D"], value_dim=s["Dv"],
                      max_length=max_length or s["T"], dtype=s["q"].dtype, device=s["q"].device,
                      page_size=page_size, u_bound=s["u_bound"] if evict else None, evict=evict, **kw)


def reference_at(s, n: int, Tq: int) -> torch.Tensor:
    """fp64 output of the last Tq queries of the first n tokens, over all n keys (nothing evicted)."""
    c = torch.cumsum(s["log_f"][..., :n].double(), dim=-1)
    o, _ = fox_attention_reference(s["q"][:, :, n - Tq:n].double(), s["k"][:, :, :n].double(),
                                   s["v"][:, :, :n].double(), c)
    return o


def eps_bound(s, log_eps: float) -> float:
    return 2 * math.exp(log_eps) * s["v"].double().norm(dim=-1).max().item()


def certified_first(s, cache: FoxKVCache, n: int, slack: float) -> torch.Tensor:
    """(B, Hkv): the first live page the proof allows after n tokens, in fp64, with the threshold moved by
    `slack` nats (+: the most a correct cache may evict; -: the least it must)."""
    P, G = cache.P, cache.G
    c = torch.cumsum(s["log_f"][..., :n].double(), dim=-1).cpu()                   # (B, Hq, n)
    newest = (n - 1) // P
    # the threshold from first principles (not the cache's own delta_evict): log eps - log N - 2U
    u = torch.as_tensor(s["u_bound"], dtype=torch.float64).expand(s["Hq"])
    delta = (cache.log_eps - math.log(cache.capacity) - 2 * u).view(cache.Hkv, G)
    first = torch.zeros(s["B"], s["Hkv"], dtype=torch.long)
    for b in range(s["B"]):
        for hk in range(s["Hkv"]):
            lp = 0
            while lp < newest:
                decay = c[b, hk * G:(hk + 1) * G, n - 1] - c[b, hk * G:(hk + 1) * G, lp * P + P - 1]
                if not bool((decay < delta[hk] + slack).all()):
                    break
                lp += 1
            first[b, hk] = lp
    return first


def poison_free_pages(cache: FoxKVCache) -> None:
    """NaN into every free page: a decode that reads an evicted or unallocated page shows it."""
    free = cache.free_stack[: int(cache.free_top)]
    cache.k_pool[free] = float("nan")
    cache.v_pool[free] = float("nan")
    cache.c_pool[free] = float("nan")


def drive(s, caches, T0: int, steps: int, step_tokens: int = 1, log_eps: float = -10.0, check=None,
          poison: bool = True):
    """Prefill T0 tokens, then `steps` steps of step_tokens tokens; after each, every cache's output is
    compared with the fp64 reference within the eps bound (+ fp tolerance). check(n, caches) runs after each
    step. Returns the worst error of each cache."""
    rounding = {torch.bfloat16: 1.6e-2, torch.float16: 5e-3}.get(s["q"].dtype, 2e-3 if s["q"].is_cuda else 1e-4)
    tol = eps_bound(s, log_eps) + rounding                # output rounding (bf16: 2^-9 of |o| <= ~4), TF32 dots
    worst = [0.0] * len(caches)
    sl = lambda x, a, b: x[:, :, a:b]  # noqa: E731
    for i, cache in enumerate(caches):
        o = cache.prefill(sl(s["q"], 0, T0), sl(s["k"], 0, T0), sl(s["v"], 0, T0), sl(s["log_f"], 0, T0))
        err = (o.double().cpu() - reference_at(s, T0, T0).cpu()).abs().max().item()
        assert err <= tol, f"prefill of cache {i}: {err} > {tol}"
    n = T0
    for _ in range(steps):
        a, n = n, n + step_tokens
        want = reference_at(s, n, step_tokens).cpu()
        for i, cache in enumerate(caches):
            if poison:
                poison_free_pages(cache)
            o = cache.step(sl(s["q"], a, n), sl(s["k"], a, n), sl(s["v"], a, n), sl(s["log_f"], a, n))
            err = (o.double().cpu() - want).abs().max().item()
            assert err <= tol, f"step to n = {n}, cache {i} (evicting: {cache.evicting}): {err} > {tol}"
            worst[i] = max(worst[i], err)
        if check is not None:
            check(n, caches)
    return worst


def live_contents_match(s, cache: FoxKVCache, n: int) -> None:
    """The live slots of the pages hold exactly the stream's keys, values and c (a paging error shows)."""
    k, v, c, live = gather_pages(cache.k_pool, cache.v_pool, cache.c_pool, cache.table[:, :, :cache.L],
                                 cache.first, cache.length)
    N = min(n, k.shape[2])
    lv = live[:, :, :N]
    assert torch.equal(k[:, :, :N][lv], s["k"][:, :, :N][lv])
    assert torch.equal(v[:, :, :N][lv], s["v"][:, :, :N][lv])
    cc = torch.cumsum(s["log_f"][..., :N].float(), dim=-1)
    lq = lv.repeat_interleave(cache.G, dim=1)
    torch.testing.assert_close(c[..., :N][lq], cc[lq], atol=1e-4, rtol=1e-5)
