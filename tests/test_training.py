"""A tiny FoX model trains under backend="acp": the attention is rewritten to the op (its backward
runs) and losses and weights follow eager training step by step."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from fox_tiny_model import TinyFox, batches, train


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_training_matches_eager(inner):
    torch.manual_seed(0)
    eager = TinyFox(n_layer=2)
    compiled_model = copy.deepcopy(eager)
    torch.compiler.reset()
    counters.clear()
    # log_eps=None: dense, so only rounding separates the two runs (pruning is checked elsewhere).
    compiled = torch.compile(compiled_model, backend="acp", fullgraph=True,
                             options={"inner_backend": inner, "log_eps": None})
    data = batches(3)
    ref = train(eager, data)
    got = train(compiled, data)
    assert counters["acp"]["fox_attention"] == 2, dict(counters["acp"])
    assert counters["acp"]["near_miss"] == 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=f"parameter {name} drifted from eager")


def test_training_with_pruning_stays_within_eps():
    """Default log_eps=-10 with a strong forget gate: tiles are skipped and training still follows eager."""
    torch.manual_seed(0)
    eager = TinyFox(n_layer=1, block_size=256)
    with torch.no_grad():
        eager.layers[0].attn.fgate.bias.fill_(-4.0)        # log f about -4: short memory, prunable
    compiled_model = copy.deepcopy(eager)
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(compiled_model, backend="acp", fullgraph=True,
                             options={"inner_backend": "aot_eager", "report": True})
    data = batches(2, B=1, T=200)
    ref = train(eager, data)
    got = train(compiled, data)
    from acp_compile import report
    (rec,) = [r for r in report.sites() if r.site.startswith("layers.0.attn")]
    assert float(rec.skipped.max()) > 0, "the test should exercise pruning"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
