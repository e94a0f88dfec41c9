"""acp_compile.step_stats: per-step pruning statistics recorded from the op's own outputs."""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile
from acp_compile import step_stats
from helpers import fox_inputs


def _call(log_eps, Tq=None, Hkv=2, gate="monotone", strength=0.3):
    q, k, v, c = fox_inputs(B=2, Hq=4, Hkv=Hkv, Tq=Tq, Tk=300, D=16, gate=gate, strength=strength, qk_scale=0.5, seed=3)
    return q, k, v, c, torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None)


@pytest.mark.parametrize("Tq", [300, 37], ids=["square", "tq_lt_tk"])
def test_skipped_fraction_counts_the_recorded_kept_set(Tq):
    _, _, _, _, (_, _, _, keep_from) = _call(-10.0, Tq=Tq)
    with step_stats.recording() as rec:
        q, k, v, c, (o, _, _, keep_again) = _call(-10.0, Tq=Tq)
    assert torch.equal(keep_from, keep_again)                   # recording does not change the op
    visible = torch.arange(300 - Tq + 1, 301)                   # causal keys of each row
    expected = torch.minimum(keep_from.long(), visible).sum().item() / (visible.sum().item() * 2 * 4)
    s = rec.summary()
    assert s["calls"] == 1
    assert 0.05 < s["skipped_fraction"] == pytest.approx(expected, rel=1e-12)
    u = 0.5 * 0.5 * 16 / math.sqrt(16)                          # order of magnitude of the paper's U here
    assert 0.1 * u < s["u_paper_max"] < 20 * u
    assert s["delta_paper_min"] == pytest.approx(-10.0 - math.log(300) - 2 * s["u_paper_max"], rel=1e-6)
    assert s["skipped_decay_max"] < -10.0                      # a skipped key is far older than eps allows


def test_dense_records_nothing_skipped_and_nesting_restores():
    with step_stats.recording() as outer:
        with step_stats.recording() as inner:
            _call(None)
        _call(None)
        assert step_stats.active() is outer
    assert step_stats.active() is None
    assert inner.summary()["calls"] == 1 and outer.summary()["calls"] == 1
    assert outer.summary()["skipped_fraction"] == 0.0 and outer.summary()["skipped_decay_max"] is None
    assert step_stats.Recorder().summary() == {"calls": 0, "exact_kv_fraction": None, "exact_q_fraction": None}
    assert outer.summary()["exact_kv_fraction"] is None          # the blocked backward has no exact form


def test_records_the_calls_of_a_compiled_model():
    def attention(q, k, v, log_f):
        return acp_compile.fox_attention(q, k, v, log_f)
    q, k, v, c = fox_inputs(B=1, Hq=2, Tk=260, D=16, gate="monotone", strength=0.3, qk_scale=0.5, seed=4)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros_like(c[..., :1]))
    f = torch.compile(attention, backend="acp", options={"inner_backend": "eager"})
    with step_stats.recording() as rec:
        o = f(q, k, v, log_f)
        f(q, k, v, log_f)
    s = rec.summary()
    assert s["calls"] == 2 and s["skipped_fraction"] > 0.05
    assert torch.isfinite(o).all()


def test_exact_mode_fractions_come_from_the_kernels_observer():
    """The Triton backward emits its exact-mode flags (kernels/observe.py); a recorder averages them. Here
    the emission is driven directly, as the CPU test process runs the blocked backward."""
    from acp_compile.kernels import observe
    with step_stats.recording() as rec:
        observe.emit("backward_exact_modes", kv=torch.tensor([[[1, 0, 0, 0]]], dtype=torch.int8),
                     q=torch.zeros(1, 2, 3, dtype=torch.int8))
        observe.emit("something_else", kv=torch.ones(1))
    s = rec.summary()
    assert s["exact_kv_fraction"] == 0.25 and s["exact_q_fraction"] == 0.0
    observe.emit("backward_exact_modes", kv=torch.ones(1), q=torch.ones(1))      # after the block: not seen
    assert len(rec.exact) == 1
