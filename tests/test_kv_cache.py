"""FoxKVCache on CPU (the general-op path of acp::fox_decode_paged): decoding with certified eviction equals
decoding without it and the fp64 reference within the eps bound at every step; eviction frees exactly the
pages the proof allows (fp64 oracle); freed pages are never read (NaN planted in them); bad gates, missing
bounds and overflows are handled as documented. The same loop under the interpreter:
tests/triton_interpret/test_kv_cache.py; on the GPU: tests/gpu/test_gpu_kv_cache.py."""
from __future__ import annotations

import logging

import pytest
import torch

from acp_compile.cache import FoxKVCache, logit_bound, rmsnorm_norm_bound
from acp_compile.cache.kv_cache import EVICT_MARGIN
from kv_cache_cases import (
    certified_first, drive, eps_bound, live_contents_match, make_stream, new_cache, reference_at,
)


def _oracle_check(s):
    def check(n, caches):
        evicting = caches[0]
        first = evicting.first.cpu()
        most = certified_first(s, evicting, n, +1e-3)
        least = certified_first(s, evicting, n, -(EVICT_MARGIN + 1e-3))   # the cache keeps a rounding margin
        assert (first <= most).all(), f"n = {n}: evicted beyond the certified boundary: {first} > {most}"
        assert (first >= least).all(), f"n = {n}: kept pages the proof frees: {first} < {least}"
        for cache in caches:
            live_contents_match(s, cache, n)
    return check


@pytest.mark.parametrize("case", [
    dict(B=2, Hq=4, Hkv=2, D=24, Dv=40, T=290, T0=37, steps=250, page=16),     # GQA 2:1, Dv != D
    dict(B=1, Hq=3, Hkv=3, D=20, Dv=20, T=310, T0=5, steps=300, page=32),      # MHA, odd head count
], ids=["gqa", "mha"])
def test_eviction_matches_no_eviction_and_the_reference_every_step(case):
    s = make_stream(B=case["B"], Hq=case["Hq"], Hkv=case["Hkv"], D=case["D"], Dv=case["Dv"], T=case["T"],
                    seed=case["T"])
    evicting, keeping = new_cache(s, True, page_size=case["page"]), new_cache(s, False, page_size=case["page"])
    assert evicting.evicting and not keeping.evicting
    drive(s, [evicting, keeping], case["T0"], case["steps"], check=_oracle_check(s))
    # fast kv heads (no global query head) were freed down to a window; global ones kept everything
    fast = [hk for hk in range(s["Hkv"]) if not (hk % 2 == 1 or s["Hkv"] == 1)]
    assert (evicting.first[:, fast] > 2).all(), evicting.first
    assert (evicting.first[:, [hk for hk in range(s["Hkv"]) if hk not in fast]] == 0).all()
    assert int(evicting.pages_in_use()) < int(keeping.pages_in_use())


def test_speculative_steps_of_several_tokens():
    """Steps of 5 tokens (a verified speculative block): eviction is decided from the newest position only
    after every row of the block was served."""
    s = make_stream(B=1, Hq=4, Hkv=2, T=260, seed=3)
    caches = [new_cache(s, True), new_cache(s, False)]
    drive(s, caches, 10, 50, step_tokens=5, check=_oracle_check(s))
    assert int(caches[0].first.max()) > 0


def test_dense_cache_is_exact():
    s = make_stream(B=1, Hq=2, Hkv=1, T=120, seed=4)
    cache = new_cache(s, "auto", log_eps=None)
    assert not cache.evicting
    drive(s, [cache], 7, 60, log_eps=float("-inf"))


def test_a_per_head_bound_is_accepted():
    s = make_stream(B=1, Hq=4, Hkv=2, T=150, seed=5)
    s["u_bound"] = torch.full((4,), s["u_bound"])
    cache = new_cache(s, True)
    drive(s, [cache], 20, 100)
    assert int(cache.first.max()) > 0


def test_no_bound_means_no_eviction_and_a_log_line(caplog):
    s = make_stream(B=1, Hq=2, Hkv=1, T=100, seed=6)
    with caplog.at_level(logging.INFO, logger="acp_compile"):
        cache = FoxKVCache(batch=1, n_heads=2, n_kv_heads=1, head_dim=s["D"], value_dim=s["Dv"], max_length=100)
    assert not cache.evicting
    assert "no bound on future logits" in caplog.text and "u_bound" in caplog.text
    drive(s, [cache], 10, 40)
    assert int(cache.first.max()) == 0


@pytest.mark.parametrize("kw,match", [
    (dict(), "u_bound"),
    (dict(u_bound=float("nan")), "finite"),
    (dict(u_bound=1.0, log_eps=None), "dense"),
])
def test_eviction_asked_without_a_valid_bound_is_an_error(kw, match):
    with pytest.raises(ValueError, match=match):
        FoxKVCache(batch=1, n_heads=2, n_kv_heads=1, head_dim=16, max_length=64, evict=True, **kw)


def _with_bad_gate(s, at: int, head: int):
    s["log_f"][:, head, at] = 0.5          # c grows here: keys evicted earlier might matter again
    return s


def test_a_bad_gate_before_any_eviction_stops_eviction_and_logs(caplog):
    s = _with_bad_gate(make_stream(B=1, Hq=4, Hkv=2, T=200, seed=7), at=12, head=0)
    cache = new_cache(s, "auto")
    cache.evict_requested = "auto"
    with caplog.at_level(logging.WARNING, logger="acp_compile"):
        drive(s, [cache], 10, 150)
    assert "eviction stops" in caplog.text
    assert int(cache.first[:, 0].max()) == 0          # kv head 0 (the bad gate's) never evicts
    assert not bool(cache.gate_ok[:, 0].any()) and bool(cache.gate_ok[:, 1].all())


def test_a_bad_gate_with_evict_true_is_an_error():
    s = _with_bad_gate(make_stream(B=1, Hq=4, Hkv=2, T=100, seed=8), at=12, head=1)
    cache = new_cache(s, True)
    with pytest.raises(ValueError, match="log forget gate"):
        drive(s, [cache], 10, 20)


def test_a_bad_gate_after_an_eviction_gives_nan_not_a_wrong_number(caplog):
    s = make_stream(B=1, Hq=4, Hkv=2, T=200, seed=9)
    cache = new_cache(s, "auto")
    drive(s, [cache], 20, 120)
    assert int(cache.first[0, 0]) > 0
    n = 140
    log_f = s["log_f"][:, :, n:n + 1].clone()
    log_f[:, 1] = 3.0
    with caplog.at_level(logging.WARNING, logger="acp_compile"):
        o = cache.step(s["q"][:, :, n:n + 1], s["k"][:, :, n:n + 1], s["v"][:, :, n:n + 1], log_f)
    assert "NaN" in caplog.text
    assert torch.isnan(o[:, :2]).all()                 # the query heads of kv head 0
    assert not torch.isnan(o[:, 2:]).any()


def test_pool_exhaustion_is_an_error_that_says_what_to_pass():
    s = make_stream(B=1, Hq=2, Hkv=1, T=200, seed=10)
    cache = new_cache(s, False, pool_pages=3)
    with pytest.raises(RuntimeError, match="pool_pages"):
        drive(s, [cache], 16, 60)


def test_more_tokens_than_max_length_is_an_error():
    s = make_stream(B=1, Hq=2, Hkv=1, T=80, seed=11)
    cache = new_cache(s, False, max_length=40)
    with pytest.raises(RuntimeError, match="max_length"):
        drive(s, [cache], 30, 20)


def test_bad_inputs_are_named():
    s = make_stream(B=1, Hq=2, Hkv=1, T=20, seed=12)
    cache = new_cache(s, False)
    q, k, v, f = (s[x][:, :, :3] for x in ("q", "k", "v", "log_f"))
    with pytest.raises(ValueError, match="log_f must be"):
        cache.step(q, k, v, f[:, :1])
    with pytest.raises(ValueError, match="k must be"):
        cache.step(q, k[..., :5], v, f)
    with pytest.raises(ValueError, match="at most 16"):
        cache.step(*(s[x] for x in ("q", "k", "v", "log_f")))                  # 20 tokens
    with pytest.raises(ValueError, match="empty cache"):
        cache.prefill(q, k, v, f)
        cache.prefill(q, k, v, f)
    with pytest.raises(ValueError, match="multiple"):
        FoxKVCache(batch=1, n_heads=3, n_kv_heads=2, head_dim=16, max_length=64)


def test_reset_empties_the_cache():
    s = make_stream(B=1, Hq=4, Hkv=2, T=150, seed=13)
    cache = new_cache(s, True)
    drive(s, [cache], 20, 100)
    cache.reset()
    assert int(cache.pages_in_use()) == 0 and int(cache.length) == 0
    drive(s, [cache], 20, 30)


def test_rmsnorm_bound_holds():
    w = torch.tensor([0.3, -1.7, 0.9, 1.1])
    norm = torch.nn.RMSNorm(4, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(w)
    x = torch.randn(1000, 4) * torch.logspace(-3, 3, 1000)[:, None]
    assert norm(x).norm(dim=-1).max().item() <= rmsnorm_norm_bound(w, 4)
    assert logit_bound(2.0, 3.0, 0.5) >= 3.0


def test_reference_helper_sees_everything():
    """The test oracle itself: the reference at n tokens equals a direct fp64 softmax."""
    s = make_stream(B=1, Hq=2, Hkv=1, T=30, seed=14)
    o = reference_at(s, 30, 1)
    c = torch.cumsum(s["log_f"].double(), -1)
    logits = (s["q"][:, :, -1:].double() @ s["k"].double().transpose(-1, -2)) * s["D"] ** -0.5 \
        + c[..., -1:, None] - c[..., None, :]
    want = torch.softmax(logits, -1) @ s["v"].double()
    torch.testing.assert_close(o, want)
    assert eps_bound(s, -10.0) > 0


def test_strided_inputs_as_a_model_makes_them():
    """(B, T, H, D) projections viewed as (B, H, T, D) and a transposed log f, as a model hands them over (GQA)."""
    s = make_stream(B=2, Hq=6, Hkv=2, T=140, seed=15)
    for name in ("q", "k", "v", "log_f"):
        s[name] = s[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not s[name].is_contiguous()
    caches = [new_cache(s, True), new_cache(s, False)]
    drive(s, caches, 21, 110, check=_oracle_check(s))
    assert int(caches[0].first.max()) > 0
