"""FoxKVCache through the paged Triton decode kernel (kernels/fox_triton/decode_paged.py) under the
interpreter: the CPU test loop of tests/test_kv_cache.py, shorter, with the kernel doing the decode.
Freed pages hold NaN at every step (kv_cache_cases.poison_free_pages), so a read of one shows."""
from __future__ import annotations

import pytest
import torch

import acp_compile
from kv_cache_cases import certified_first, drive, live_contents_match, make_stream, new_cache

pytestmark = pytest.mark.skipif(not acp_compile.generation._triton_covers(
    torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16)), reason="needs the interpreter switch")


def _check(s):
    def check(n, caches):
        first = caches[0].first.cpu()
        assert (first <= certified_first(s, caches[0], n, 1e-3)).all()
        live_contents_match(s, caches[0], n)
    return check


@pytest.mark.parametrize("Hq,Hkv,D,Dv,page,step_tokens", [
    (4, 2, 24, 40, 16, 1),       # GQA, Dv != D
    (3, 3, 16, 16, 32, 1),       # MHA
    (2, 1, 32, 32, 16, 3),       # several tokens per step
], ids=lambda x: str(x))
def test_kernel_with_eviction_matches_no_eviction_and_the_reference(Hq, Hkv, D, Dv, page, step_tokens):
    s = make_stream(B=2 if Hkv == 2 else 1, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, T=80, seed=Hq * 7 + D, fast_rate=1.0)
    caches = [new_cache(s, True, page_size=page), new_cache(s, False, page_size=page)]
    drive(s, caches, 9, 60 // step_tokens, step_tokens=step_tokens, check=_check(s))
    fast_kv = 0                                  # kv head 0 has no global query head (kv_cache_cases)
    if Hkv > 1:
        assert (caches[0].first[:, fast_kv] > 0).all(), caches[0].first


def test_dense_kernel_path_is_exact():
    s = make_stream(B=1, Hq=2, Hkv=1, T=90, seed=2)
    cache = new_cache(s, "auto", log_eps=None)
    drive(s, [cache], 5, 30, log_eps=float("-inf"))


def test_fp16_pools():
    s = make_stream(B=1, Hq=4, Hkv=2, T=120, seed=3, dtype=torch.float16)
    caches = [new_cache(s, True), new_cache(s, False)]
    drive(s, caches, 9, 30)
