"""acp_compile.step_stats on the Triton backward (interpreter): the fraction of exact-form programs it
records follows the spread of c (kernels/fox_triton/backward.py, exact_modes)."""
from __future__ import annotations

import pytest
import torch

import acp_compile  # noqa: F401  (registers torch.ops.acp)
from acp_compile import step_stats
from helpers import fox_inputs


@pytest.mark.parametrize("strength,exact", [(1e-3, False), (2.0, True)], ids=["gentle", "steep"])
def test_backward_records_its_exact_programs(strength, exact):
    q, k, v, c = fox_inputs(1, 2, 2, 96, 96, 16, gate="monotone", strength=strength, seed=1)
    q, k, v, c = (t.requires_grad_() for t in (q, k, v, c))
    with step_stats.recording() as rec:
        o = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, None, None)[0]
        o.sum().backward()
    s = rec.summary()
    assert s["calls"] == 1
    assert (s["exact_kv_fraction"] > 0.9) == exact and (s["exact_q_fraction"] > 0.9) == exact
    assert exact or s["exact_kv_fraction"] == s["exact_q_fraction"] == 0.0
