"""The Triton ACP plan (kernels/fox_triton/plan.py) against the torch plan, under the Triton interpreter.

The torch plan (kernels/plan.py make_plan) is the oracle: start and end must be EQUAL, for monotone
and non-monotone gates, GQA, Tq < Tk, several tile shapes, a given u_bound and the bound computed
from the data, and pruning off. Outputs are NaN-poisoned (fill_uninitialized_memory), and each case
that is meant to prune asserts that it does, so a plan that never skips cannot pass.
"""
from __future__ import annotations

import pytest
import torch

from hypothesis import given, settings, strategies as st

from acp_compile.kernels.fox_triton.plan import compute_plan
from acp_compile.kernels.plan import make_plan

from helpers import default_scale, fox_inputs

CASES = [
    # B, Hq, Hkv, Tq, Tk, D, block_m, block_n, gate, strength
    (2, 4, 2, 100, 130, 32, 32, 16, "monotone", 0.5),
    (1, 2, 2, 17, 17, 16, 16, 16, "walk", 1.0),
    (1, 2, 1, 1, 77, 80, 32, 16, "monotone", 0.5),
    (2, 2, 2, 130, 130, 16, 32, 32, "mixed", 0.6),
    (1, 3, 1, 64, 200, 16, 16, 64, "monotone", 0.3),
    (1, 2, 2, 150, 150, 16, 64, 16, "walk", 2.0),
]

def assert_same_plan(q, k, c, scale, log_eps, u_bound, bm, bn):
    start, end = compute_plan(q, k, c, scale, log_eps, u_bound, bm, bn)
    ref = make_plan(q, k, c, scale, log_eps, u_bound, bm, bn)
    assert start.dtype == torch.int32 and end.dtype == torch.int32
    assert torch.equal(start, ref.start), f"start differs:\n{start}\n{ref.start}"
    assert torch.equal(end, ref.end), f"end differs:\n{end}\n{ref.end}"
    return ref

@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,bm,bn,gate,strength", CASES)
def test_plan_equals_torch_plan_with_given_bound(B, Hq, Hkv, Tq, Tk, D, bm, bn, gate, strength):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, gate=gate, strength=strength, seed=Tq + Tk)
    u = torch.linspace(0.2, 1.0, Hq)                     # broadcasts to (B, Hq)
    ref = assert_same_plan(q, k, c, 0.3, -3.0, u, bm, bn)
    if Tk >= 64 and gate != "walk":
        assert ref.start.sum() > 0, "test case meant to prune skipped nothing"

@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,bm,bn,gate,strength", CASES)
def test_plan_equals_torch_plan_with_bound_from_data(B, Hq, Hkv, Tq, Tk, D, bm, bn, gate, strength):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, gate=gate, strength=4 * strength, qk_scale=0.3, seed=Tk)
    ref = assert_same_plan(q, k, c, default_scale(D), -10.0, None, bm, bn)
    if Tk >= 64 and gate == "monotone":
        assert ref.start.sum() > 0, "test case meant to prune skipped nothing"

@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("log_eps", [None, float("-inf")])
def test_pruning_off_keeps_every_causal_tile(log_eps):
    q, k, v, c = fox_inputs(1, 2, 1, 50, 90, 16, strength=5.0)
    start, end = compute_plan(q, k, c, 0.25, log_eps, None, 16, 32)
    assert torch.equal(start, torch.zeros_like(start))
    assert torch.equal(end, torch.full_like(end, start.shape[-1]))
    assert_same_plan(q, k, c, 0.25, log_eps, None, 16, 32)

@pytest.mark.usefixtures("poison")
def test_negative_or_nan_bound_turns_pruning_off_for_that_head():
    q, k, v, c = fox_inputs(1, 3, 3, 64, 64, 16, strength=5.0)
    u = torch.tensor([0.1, -1.0, float("nan")])
    start, _ = compute_plan(q, k, c, 0.25, -5.0, u, 16, 16)
    assert start[0, 0].sum() > 0
    assert start[0, 1:].sum() == 0
    assert_same_plan(q, k, c, 0.25, -5.0, u, 16, 16)

@pytest.mark.usefixtures("poison")
def test_plan_of_transposed_gate_and_inputs():
    q, k, v, c = fox_inputs(2, 4, 2, 70, 70, 32, strength=1.0)
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    ct = c.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous() and not ct.is_contiguous()
    ref = assert_same_plan(qt, kt, ct, 0.2, -6.0, None, 16, 16)
    assert ref.start.sum() > 0

@settings(max_examples=15, deadline=None)
@given(
    Tq=st.integers(1, 90), extra=st.integers(0, 40), bm=st.sampled_from([16, 32]), bn=st.sampled_from([16, 32]),
    gate=st.sampled_from(["monotone", "walk"]), strength=st.floats(0.05, 3.0), seed=st.integers(0, 10_000),
    log_eps=st.sampled_from([-1.0, -5.0, -10.0]),
)
def test_plan_property(Tq, extra, bm, bn, gate, strength, seed, log_eps):
    q, k, v, c = fox_inputs(1, 2, 1, Tq, Tq + extra, 16, gate=gate, strength=strength, seed=seed)
    u = torch.rand(1, 2, generator=torch.Generator().manual_seed(seed))
    assert_same_plan(q, k, c, 0.25, log_eps, u, bm, bn)
