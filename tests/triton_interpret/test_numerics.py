"""Numerics at the edges (issue 10) of the Triton kernels, through the interpreter (fp32 and fp16; bf16
is broken in the interpreter). Same properties as tests/test_numerics.py on the blocked path:
hard resets exact to fp32 rounding across tile borders (interpreter tiles: forward 32 x 16, backward
32 x 32), a steep decay exact, the gate gradient in fp16 within 1.5x of eager fp16 autograd, and
eager's NaN semantics for a non-finite v, whatever the tile size.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import acp_compile
from acp_compile.kernels import dispatch
from helpers import fox_inputs
from numerics_helpers import eager_grads, gate_options, op_grads, reference_grads, rel_err, reverse_cumsum


def test_the_triton_path_is_taken():
    q = torch.randn(1, 1, 8, 16)
    assert dispatch.forward_implementation(q, q, q, torch.zeros(1, 1, 8)) == "triton"


@settings(max_examples=4)
@given(pos=st.sampled_from([0, 15, 16, 31, 32, 33, 63, 64, 90]), reset=st.sampled_from([-1e4, -1e9, -1e30, -2.5e38]),
       second=st.booleans(), prune=st.booleans(), Tq=st.sampled_from([97, 40]), seed=st.integers(0, 2 ** 16))
def test_hard_reset_anywhere_is_exact(pos, reset, second, prune, Tq, seed):
    """Rows after the reset keep q.k (the kernels form c_i - c_j per entry in a block whose c spreads
    by more than C_SPAN_LIMIT); o, lse and every gradient match fp64 to fp32 rounding."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Tk, D = 1, 2, 1, 97, 16
    q, do = (torch.randn(B, Hq, Tq, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g) for _ in range(2))
    log_f = -0.2 * torch.rand(B, Hq, Tk, generator=g)
    log_f[..., pos] = reset
    if second:
        log_f[..., (pos + 41) % Tk] = reset / 3
    c = torch.cumsum(log_f, -1)
    log_eps = -10.0 if prune else None
    o, lse, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None)
    o64, lse64, dq, dk, dv, dc = reference_grads(q, k, v, c, do)
    assert (o.double() - o64).abs().max() < 2e-5 and (lse.double() - lse64).abs().max() < 2e-5
    grads = op_grads(q, k, v, log_f, do, log_eps=log_eps)
    for name, a, r in zip(("dq", "dk", "dv", "dlogf"), grads, (dq, dk, dv, reverse_cumsum(dc))):
        assert torch.isfinite(a).all(), name
        assert (a - r).abs().max() < 5e-5 * max(1.0, r.abs().max().item()), name


def test_steep_decay_is_exact():
    """-50 nats per token: the old one-reference-per-block form lost 2e-4 in lse."""
    q, k, v, _, do = fox_inputs(1, 2, 2, 100, 100, 16, seed=3, grad="before_gate")
    log_f = torch.full((1, 2, 100), -50.0)
    c = torch.cumsum(log_f, -1)
    o, lse, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, None, None)
    o64, lse64, dq, dk, dv, dc = reference_grads(q, k, v, c, do)
    assert (lse.double() - lse64).abs().max() < 2e-6 and (o.double() - o64).abs().max() < 2e-6
    grads = op_grads(q, k, v, log_f, do, log_eps=None)
    for name, a, r in zip(("dq", "dk", "dv", "dlogf"), grads, (dq, dk, dv, reverse_cumsum(dc))):
        assert (a - r).abs().max() < 2e-5 * max(1.0, r.abs().max().item()), name


@pytest.mark.parametrize("gates", ["uniform2", "mixed"])
def test_fp16_gate_gradient_is_as_accurate_as_eager(gates):
    """The dq kernel adds the row term sum_j dS_ij to dc: without it d log f drifted with T (issue 10)."""
    T, H = 480, 2
    q, k, v, log_f, do = fox_inputs(1, H, H, T, T, 32, dtype=torch.float16, seed=11, grad="before_gate",
                                    **gate_options(gates, H))
    _, _, *ref = reference_grads(q, k, v, torch.cumsum(log_f, -1), do)
    ref[3] = reverse_cumsum(ref[3])
    ours = op_grads(q, k, v, log_f, do)
    eager = eager_grads(q, k, v, log_f, do)
    for name, a, e, r in zip(("dq", "dk", "dv", "dlogf"), ours, eager, ref):
        assert rel_err(a, r) <= 1.5 * rel_err(e, r), f"{name}: ours {rel_err(a, r):.3g}, eager fp16 {rel_err(e, r):.3g}"


@settings(max_examples=3)
@given(pos=st.integers(0, 96), col=st.integers(0, 19), prune=st.booleans())
def test_non_finite_v_anywhere_gives_nan_in_that_column_of_every_row(pos, col, prune):
    B, Hq, Hkv, T, D = 1, 2, 1, 97, 20
    q, k, v, log_f = fox_inputs(B, Hq, Hkv, T, T, D, gate="uniform", strength=0.5, log_f=True, seed=pos)
    v[0, 0, pos, col] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_f)]
    o = acp_compile.fox_attention(*leaves, log_eps=-10.0 if prune else None)
    want = torch.zeros_like(o, dtype=torch.bool)
    want[..., col] = True
    assert torch.equal(torch.isnan(o), want)
    o.backward(torch.randn_like(o))
    dq, dk, dv, dlf = (t.grad for t in leaves)
    assert torch.isnan(dq).all() and torch.isnan(dk).all() and torch.isnan(dlf).all() and torch.isfinite(dv).all()
