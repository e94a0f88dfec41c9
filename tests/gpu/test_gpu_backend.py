"""backend="acp" on CUDA: training under CUDA graphs (mode="reduce-overhead") matches eager, and
the rewritten graph is captured without cudagraph skips (the op never synchronises)."""
import copy
import functools
import os
import sys

import pytest
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fox_tiny_model import TinyFox, batches, train  # noqa: E402

import acp_compile.backend  # noqa: E402


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_training_under_acp_matches_eager(mode):
    torch.manual_seed(0)
    eager = TinyFox(n_layer=2, d_model=128, n_head=2, block_size=512).cuda()   # head dim 64
    model = copy.deepcopy(eager)
    torch.compiler.reset()
    counters.clear()
    # torch.compile refuses mode= together with options=: bind both into the backend instead.
    backend = functools.partial(acp_compile.backend.acp, options={"log_eps": None}, mode=mode)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    data = batches(4, B=2, T=300, device="cuda")
    ref = train(eager, data)
    got = train(compiled, data)
    assert counters["acp"]["fox_attention"] == 2, dict(counters["acp"])
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_pruned_training_bf16_runs_under_cuda_graphs():
    torch.manual_seed(0)
    model = TinyFox(n_layer=2, d_model=256, n_head=2, block_size=2048).cuda()
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.fgate.bias.fill_(-3.0)                 # short memory: many tiles prunable
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(model, backend="acp", mode="reduce-overhead", fullgraph=True)
    data = batches(4, B=1, T=2048, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = train(compiled, data)
    assert torch.isfinite(losses).all()
    assert counters["acp"]["fox_attention"] == 2
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
