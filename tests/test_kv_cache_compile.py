"""The example FoX model (examples/fox_model.py) decoding with FoxKVCache under torch.compile: one graph
serves every step (static shapes; a recompile is an error here), and the logits equal full recomputation
without a cache within the eps tolerance, with eviction on (which frees pages) and off.
The GPU version with mode="reduce-overhead" (CUDA graphs) is tests/gpu/test_gpu_kv_cache.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import fox_model  # noqa: E402
from fox_cached import CachedFoxLM  # noqa: E402


@pytest.mark.parametrize("evict", [True, False])
def test_compiled_decoding_with_the_cache_never_recompiles(evict):
    torch.manual_seed(0)
    model = fox_model.FoxLM(fox_model.tiny_config(init_std=0.2, local_fgate_bias=-1.0)).eval()  # fast local heads
    prompt = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        dec = CachedFoxLM(model, batch=2, max_length=160, page_size=16, evict=evict)
        assert all(c.evicting == evict for c in dec.caches)
        logits = dec.prefill(prompt)
        step = torch.compile(dec, backend="aot_eager", fullgraph=True, dynamic=False)
        tokens = [prompt]
        worst = 0.0
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(100):
                nxt = logits[:, -1:].argmax(-1)
                tokens.append(nxt)
                logits = step(nxt)
                if i % 11 == 10 or i == 99:
                    want = model(torch.cat(tokens, dim=1))[:, -1]
                    worst = max(worst, (logits[:, -1] - want).abs().max().item())
        assert counters["stats"]["unique_graphs"] == 1, counters["stats"]
        assert worst < 1e-3, worst
        first = torch.stack([c.first for c in dec.caches])                  # (layers, B, H)
        local = model.cfg.n_local_heads
        if evict:
            assert (first[:, :, :local] > 0).all(), first                   # local heads were freed
            assert (first[:, :, local:] == 0).all()                         # global heads keep everything
        else:
            assert (first == 0).all()
