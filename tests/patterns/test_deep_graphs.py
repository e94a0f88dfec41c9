"""Whole-model graphs: every layer's site is rewritten even when a layer's gate depends on hundreds of
nodes of the layers before it (forward and backward in one compiled function included). A bias term
whose producers are too many to evaluate is a per-call gate, proven by stand-ins, not a refusal."""
from __future__ import annotations

import pytest
import torch

import acp_compile
from fox_tiny_model import TinyFox


@pytest.mark.parametrize("with_backward", [False, True], ids=["forward", "forward_and_backward"])
def test_every_layer_of_a_deep_model_is_rewritten(with_backward):
    torch._dynamo.reset()
    acp_compile.clear_compilations()
    torch.manual_seed(0)
    n_layer = 6
    model = TinyFox(n_layer=n_layer)
    idx, tgt = torch.randint(0, 64, (2, 40)), torch.randint(0, 64, (2, 40))

    def step(idx, tgt):
        loss = model(idx, tgt)
        if with_backward:
            loss.backward()
        return loss.detach()

    compiled = torch.compile(step, backend="acp", options={"inner_backend": "eager"})
    want = step(idx, tgt)
    model.zero_grad(set_to_none=True)
    got = compiled(idx, tgt)
    sites = [s for rec in acp_compile.compilations() for s in rec.sites]
    misses = [str(m) for rec in acp_compile.compilations() for m in rec.near_misses]
    assert len(sites) == n_layer and not misses, (sites, misses)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
