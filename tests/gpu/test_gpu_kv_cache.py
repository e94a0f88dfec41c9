"""FoxKVCache on the GPU: the paged Triton decode with certified eviction against the fp64 reference at every
step (bf16 and fp16, GQA 16:4 and MHA, head dim 128), and the example model decoding under torch.compile with
mode="reduce-overhead" (CUDA graphs): no recompile, no CUDA-graph skip, logits equal to eager decoding."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))

from kv_cache_cases import certified_first, drive, make_stream, new_cache  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("Hq,Hkv,dtype", [(16, 4, torch.bfloat16), (8, 8, torch.float16)], ids=["gqa-bf16", "mha-fp16"])
def test_eviction_on_the_gpu_matches_the_reference_every_step(Hq, Hkv, dtype):
    s = make_stream(B=2, Hq=Hq, Hkv=Hkv, D=128, Dv=128, T=1400, fast_rate=0.1, seed=1, device="cuda", dtype=dtype)
    caches = [new_cache(s, True, page_size=64), new_cache(s, False, page_size=64)]

    def check(n, cs):
        if n % 100 == 0:
            assert (cs[0].first.cpu() <= certified_first(s, cs[0], n, 1e-3)).all()

    drive(s, caches, 200, 1100, check=check)
    assert int(caches[0].first.max()) > 2
    assert int(caches[0].pages_in_use()) < int(caches[1].pages_in_use())


@pytest.mark.parametrize("evict", [True, False])
def test_model_decodes_under_cuda_graphs(evict):
    import fox_model
    from fox_cached import CachedFoxLM
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = fox_model.FoxLM(fox_model.small_config(init_std=0.2)).cuda().eval()
    prompt = torch.randint(0, 256, (2, 100), device="cuda")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = CachedFoxLM(model, batch=2, max_length=1024, evict=evict, sync_checks=False)
        graphed = CachedFoxLM(model, batch=2, max_length=1024, evict=evict, sync_checks=False)
        la, lb = eager.prefill(prompt), graphed.prefill(prompt)
        step = torch.compile(graphed, mode="reduce-overhead", fullgraph=True, dynamic=False)
        worst = 0.0
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(600):
                tok = la[:, -1:].argmax(-1)
                la = eager(tok)
                lb = step(tok).clone()
                worst = max(worst, (la - lb).abs().max().item())
        assert worst < 2e-3, worst
        assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])
        if evict:
            assert all(int(c.first.max()) > 0 for c in graphed.caches)
            torch.testing.assert_close(torch.stack([c.first for c in graphed.caches]),
                                       torch.stack([c.first for c in eager.caches]))
