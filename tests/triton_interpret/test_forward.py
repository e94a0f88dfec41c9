"""The Triton forward kernel (kernels/fox_triton/forward.py) on CPU through the Triton interpreter.

Truth is the fp64 reference: with keep = the entries that the kernel's own plan computes the result
must agree tightly; against the dense reference it must stay inside the eps bound
|o - o_dense| <= 2 eps max_j ||v_j||. Outputs are NaN-poisoned before each launch (explicitly and
through fill_uninitialized_memory), so an unwritten tile fails. Odd sizes (T = 1, 17, 100, 130),
head dims 16, 32, 80, fp32 and fp16, GQA, Tq < Tk and non-contiguous inputs. The op itself is run
through the interpreter switch (ACP_TRITON_ON_CPU=1 with TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math

import pytest
import torch

from hypothesis import given, settings, strategies as st

import acp_compile  # noqa: F401  (registers torch.ops.acp)
from acp_compile.kernels import dispatch
from acp_compile.kernels.fox_triton.configs import FwdConfig
from acp_compile.kernels.fox_triton.forward import forward, forward_recorded, launch_forward
from acp_compile.kernels.fox_triton.plan import compute_plan
from acp_compile.kernels.plan import kept_entries, make_plan
from acp_compile.kernels.reference import fox_attention_reference

from helpers import default_scale, fox_inputs

SMALL = FwdConfig(32, 16, 4, 1)
TALL = FwdConfig(16, 32, 4, 1, False, True)   # block_n > block_m; grid (B * Hq, Mq) launch order
TMA = FwdConfig(32, 16, 4, 1, True)   # tensor-descriptor loads/stores (emulated by the interpreter)
# Newest key block first: the first tile visited (the diagonal) leaves the first 16 rows of every
# 32-row block fully masked, which must give them zero weight, not NaN.
NEWEST = FwdConfig(32, 16, 4, 1, False, False, True)
TOL = {torch.float32: dict(o=2e-5, lse=2e-5), torch.float16: dict(o=4e-3, lse=2e-3)}

def run_poisoned(q, k, v, c, scale, log_eps, u_bound, cfg):
    """Kernel output with NaN-filled o/lse, plus the torch plan with the same tiles (None if dense)."""
    B, Hq, Tq, D = q.shape
    start = None
    plan = None
    if log_eps is not None:
        start, _ = compute_plan(q, k, c, scale, log_eps, u_bound, cfg.block_m, cfg.block_n)
        plan = make_plan(q, k, c, scale, log_eps, u_bound, cfg.block_m, cfg.block_n)
    o = torch.full_like(q, float("nan"))
    lse = torch.full((B, Hq, Tq), float("nan"))
    o, lse = launch_forward(q, k, v, c, scale, start, cfg, o=o, lse=lse)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "unwritten output entries"
    return o, lse, plan

def check_tight(q, k, v, c, scale, o, lse, plan):
    keep = None if plan is None else kept_entries(plan, q.shape[2], k.shape[2])
    ro, rl = fox_attention_reference(q, k, v, c, scale, keep=keep)
    tol = TOL[q.dtype]
    assert (o.double() - ro).abs().max().item() <= tol["o"] * max(1.0, ro.abs().max().item())
    assert (lse.double() - rl).abs().max().item() <= tol["lse"] * max(1.0, rl.abs().max().item())

def check_eps_bound(q, k, v, c, scale, o, log_eps):
    ro, _ = fox_attention_reference(q, k, v, c, scale)
    vmax = v.double().norm(dim=-1).amax().item()
    bound = 2 * math.exp(log_eps) * vmax + TOL[q.dtype]["o"] * max(1.0, ro.abs().max().item())
    assert (o.double() - ro).abs().max().item() <= bound

SHAPES = [
    # B, Hq, Hkv, Tq, Tk, D
    (1, 2, 2, 1, 1, 16),
    (1, 2, 1, 17, 17, 32),
    (2, 2, 2, 100, 100, 16),
    (1, 4, 2, 130, 130, 80),
    (1, 2, 1, 1, 77, 32),
    (1, 2, 2, 50, 130, 16),
]

@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D", SHAPES)
def test_dense_matches_reference(B, Hq, Hkv, Tq, Tk, D, dtype):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, strength=0.2, seed=Tq * 7 + D)
    scale = default_scale(D)
    o, lse, _ = run_poisoned(q, k, v, c, scale, None, None, SMALL)
    assert o.dtype == dtype and o.shape == q.shape and lse.dtype == torch.float32
    check_tight(q, k, v, c, scale, o, lse, None)

@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("cfg", [SMALL, TALL, TMA, NEWEST], ids=["32x16", "16x32", "tma", "newest-first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,gate", [
    (1, 2, 1, 100, 100, 16, "monotone"), (1, 2, 2, 130, 130, 32, "walk"), (2, 4, 2, 40, 130, 80, "mixed"),
])
def test_pruned_matches_pruned_reference_and_eps_bound(B, Hq, Hkv, Tq, Tk, D, gate, dtype, cfg):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, gate=gate, strength=1.0, seed=Tk + D)
    scale, log_eps = default_scale(D), -6.0
    o, lse, plan = run_poisoned(q, k, v, c, scale, log_eps, None, cfg)
    if gate == "monotone":
        assert plan.start.sum() > 0, "test case meant to prune skipped nothing"
    check_tight(q, k, v, c, scale, o, lse, plan)
    check_eps_bound(q, k, v, c, scale, o, log_eps)

@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D", [(1, 2, 1, 17, 17, 32), (1, 4, 2, 130, 130, 80), (1, 2, 2, 50, 130, 16)])
def test_tma_dense_matches_reference(B, Hq, Hkv, Tq, Tk, D, dtype):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, strength=0.2, seed=Tq + D)
    o, lse, _ = run_poisoned(q, k, v, c, 0.2, None, None, TMA)
    check_tight(q, k, v, c, 0.2, o, lse, None)

@pytest.mark.usefixtures("poison")
def test_non_contiguous_inputs_and_output_strides():
    q, k, v, c = fox_inputs(2, 4, 2, 70, 70, 32, strength=0.5)
    wide = torch.randn(2, 4, 70, 64)
    q = wide[..., ::2]                                         # last-dim stride 2
    assert q.stride(-1) == 2
    k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))   # (B, T, H, D) memory
    c = c.transpose(1, 2).contiguous().transpose(1, 2)
    scale = 0.2
    o, lse, plan = run_poisoned(q, k, v, c, scale, -8.0, None, SMALL)
    check_tight(q, k, v, c, scale, o, lse, plan)
    o_tma, _, _ = run_poisoned(q, k, v, c, scale, -8.0, None, TMA)   # stride-2 q: falls back to plain loads
    torch.testing.assert_close(o_tma, o)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    o2, _ = forward(qt, k, v, c, scale, -8.0, None, config=SMALL)
    assert o2.stride() == qt.stride(), "output must take the strides of q"
    torch.testing.assert_close(o2, o)

@pytest.mark.usefixtures("poison")
def test_given_bound_prunes_more_and_stays_inside_eps():
    q, k, v, c = fox_inputs(1, 2, 1, 128, 128, 16, strength=0.5, seed=3)
    u = torch.tensor(0.5)          # |scale q.k| is not bounded by this: only the tile rule is tested
    o, lse, plan = run_poisoned(q, k, v, c, 0.25, -4.0, u, SMALL)
    assert plan.start.sum() > 0
    check_tight(q, k, v, c, 0.25, o, lse, plan)

@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_routes_to_triton_under_the_switch(dtype):
    q, k, v, c = fox_inputs(1, 4, 2, 45, 60, 32, dtype=dtype, strength=1.0)
    assert dispatch.forward_implementation(q, k, v, c) == "triton"
    for certificate in ("online", "paper"):
        o, lse, _, keep_from = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -8.0, None, certificate=certificate)
        ro, _ = fox_attention_reference(q, k, v, c)
        bound = 2 * math.exp(-8.0) * v.double().norm(dim=-1).amax().item() + TOL[dtype]["o"] * 4
        assert (o.double() - ro).abs().max().item() <= bound
        direct, _, direct_keep = forward_recorded(q, k, v, c, default_scale(32), -8.0, None, certificate=certificate)
        assert torch.equal(o, direct) and torch.equal(keep_from, direct_keep), "the op must run exactly the Triton forward"
    paper, _ = forward(q, k, v, c, default_scale(32), -8.0, None)
    assert torch.equal(o, paper), "forward() is the paper rule"

def test_bfloat16_falls_back_to_blocked_under_the_interpreter():
    q, k, v, c = fox_inputs(1, 2, 2, 20, 20, 16, dtype=torch.bfloat16)
    assert dispatch.forward_implementation(q, k, v, c) == "blocked"
    o, _, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, None, None)
    ro, _ = fox_attention_reference(q, k, v, c)
    assert (o.double() - ro).abs().max().item() < 3e-2

@settings(max_examples=12, deadline=None)
@given(
    Tq=st.integers(1, 80), extra=st.integers(0, 50), D=st.sampled_from([16, 24, 32, 48]),
    group=st.sampled_from([1, 2]), strength=st.floats(0.0, 2.0), seed=st.integers(0, 10_000),
    log_eps=st.sampled_from([None, -2.0, -8.0]), cfg=st.sampled_from([SMALL, TALL, TMA, NEWEST]),
)
def test_forward_property(Tq, extra, D, group, strength, seed, log_eps, cfg):
    q, k, v, c = fox_inputs(1, 2, 2 // group, Tq, Tq + extra, D, strength=strength, seed=seed)
    scale = default_scale(D)
    o, lse, plan = run_poisoned(q, k, v, c, scale, log_eps, None, cfg)
    check_tight(q, k, v, c, scale, o, lse, plan)
    if log_eps is not None:
        check_eps_bound(q, k, v, c, scale, o, log_eps)
