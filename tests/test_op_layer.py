"""The custom ops and the functional API: opcheck, gradcheck in fp64, layouts, dtypes, dense switch."""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile
from acp_compile.kernels import blocked
from acp_compile.kernels.plan import make_plan, skipped_fraction
from acp_compile.kernels.reference import fox_attention_reference
from helpers import fox_inputs

OPCHECK_CASES = {
    "mha": dict(B=1, Hq=2, Hkv=2, Tq=70, Tk=70, D=16),
    "gqa_tq_lt_tk": dict(B=2, Hq=4, Hkv=2, Tq=20, Tk=90, D=8),
    "mqa_decode": dict(B=1, Hq=3, Hkv=1, Tq=1, Tk=40, D=32),
}


def _op_args(case, transposed=False, strength=1.0, dtype=torch.float32):
    q, k, v, c = fox_inputs(**OPCHECK_CASES[case], dtype=dtype, strength=strength, qk_scale=0.3, seed=1)
    if transposed:                                   # (B, T, H, D) storage viewed as (B, H, T, D)
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v, c


@pytest.mark.parametrize("case,transposed,log_eps", [
    ("mha", False, -10.0), ("gqa_tq_lt_tk", True, -10.0), ("mqa_decode", False, None), ("mha", True, float("-inf")),
])
def test_opcheck_forward_and_backward(case, transposed, log_eps):
    q, k, v, c = _op_args(case, transposed)
    q, k, v, c = (t.requires_grad_() for t in (q, k, v, c))
    torch.library.opcheck(torch.ops.acp.fox_attention_fwd.default, (q, k, v, c, None, log_eps, None))
    with torch.no_grad():
        o, lse, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None)
    do = torch.randn_like(o)
    scale = 1 / math.sqrt(q.shape[-1])
    torch.library.opcheck(
        torch.ops.acp.fox_attention_bwd.default, (do, q.detach(), k.detach(), v.detach(), c.detach(), o, lse, scale, log_eps, None),
    )


def test_opcheck_with_user_bound():
    q, k, v, c = _op_args("gqa_tq_lt_tk")
    u = torch.full((4,), 2.0)
    torch.library.opcheck(torch.ops.acp.fox_attention_fwd.default, (q, k, v, c, 0.2, -8.0, u))


def _api_fn(log_eps, layout="bhtd"):
    def fn(q, k, v, log_f):
        return acp_compile.fox_attention(q, k, v, log_f, log_eps=log_eps, layout=layout)
    return fn


def test_gradcheck_fp64_small_dense_and_pruned_settings():
    """Small shapes (one tile): the pruned setting must equal the dense gradient here."""
    q, k, v, log_f = fox_inputs(1, 2, 1, 5, 7, 3, dtype=torch.float64, seed=2, strength=0.3, log_f=True,
                                gate_dtype=torch.float64, gate_seed=2)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, log_f))
    for log_eps in (None, -10.0):
        assert torch.autograd.gradcheck(_api_fn(log_eps), inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_fp64_with_real_pruning():
    """T spans several blocked tiles and the decay is strong: gradients of the pruned attention."""
    T, D = 2 * blocked.BLOCK_M + 7, 2
    q, k, v, log_f = fox_inputs(1, 2, 1, T, T, D, dtype=torch.float64, qk_scale=0.5, seed=3, strength=0.5, log_f=True,
                                gate_dtype=torch.float64, gate_seed=3)
    plan = make_plan(q, k, torch.cumsum(log_f, -1), 1 / math.sqrt(D), -10.0, None, blocked.BLOCK_M, blocked.BLOCK_N)
    assert skipped_fraction(plan).min() > 0.15, "the case must prune for this test to mean anything"
    inputs = tuple(t.requires_grad_() for t in (q, k, v, log_f))
    assert torch.autograd.gradcheck(_api_fn(-10.0), inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_layout_bthd_equals_bhtd_and_keeps_strides():
    q, k, v, c = fox_inputs(2, 4, 2, 30, 50, 8, strength=0.5, seed=4)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros(2, 4, 1))
    o = acp_compile.fox_attention(q, k, v, log_f)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))      # real (B, T, H, D) tensors
    ot = acp_compile.fox_attention(qt, kt, vt, log_f.transpose(1, 2).contiguous(), layout="bthd")
    assert ot.shape == (2, 30, 4, 8) and ot.is_contiguous()
    torch.testing.assert_close(ot.transpose(1, 2), o, rtol=1e-6, atol=1e-6)


def test_api_matches_reference_with_gate_cumsum():
    q, k, v, c = fox_inputs(1, 2, 2, 80, 80, 16, strength=0.2, seed=5)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros(1, 2, 1))
    o = acp_compile.fox_attention(q, k, v, log_f, log_eps=None)
    o_ref, _ = fox_attention_reference(q, k, v, torch.cumsum(log_f.double(), -1))
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_through_the_op_with_backward(dtype):
    q, k, v, c = fox_inputs(1, 4, 2, 70, 70, 32, dtype=dtype, strength=0.5, qk_scale=0.5, seed=6)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros(1, 4, 1)).to(dtype)
    inputs = [t.requires_grad_() for t in (q, k, v, log_f)]
    o = acp_compile.fox_attention(*inputs)
    assert o.dtype == dtype
    o.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in inputs)
    o_ref, _ = fox_attention_reference(q, k, v, torch.cumsum(log_f.float(), -1))
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert (o.double() - o_ref).abs().max() < tol


def test_pruning_off_is_bitwise_the_same_for_none_and_minus_inf():
    q, k, v, c = fox_inputs(1, 2, 1, 140, 140, 16, strength=2.0, seed=7)
    o_none, lse_none, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, None, None)
    o_inf, lse_inf, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, float("-inf"), None)
    assert torch.equal(o_none, o_inf) and torch.equal(lse_none, lse_inf)
    plan = make_plan(q, k, c, 0.25, -10.0, None, blocked.BLOCK_M, blocked.BLOCK_N)
    assert skipped_fraction(plan).min() > 0.1          # the same inputs do prune when pruning is on
    plan_off = make_plan(q, k, c, 0.25, float("-inf"), None, blocked.BLOCK_M, blocked.BLOCK_N)
    assert (skipped_fraction(plan_off) == 0).all()


def test_user_bound_as_float_in_the_api():
    q, k, v, c = fox_inputs(1, 2, 2, 100, 100, 8, strength=1.0, qk_scale=0.1, seed=8)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros(1, 2, 1))
    u = float(0.1 * 0.1 * 8 * 8)                      # generous: |scale q.k| stays far below it here
    o = acp_compile.fox_attention(q, k, v, log_f, u_bound=u)
    o_tensor = acp_compile.fox_attention(q, k, v, log_f, u_bound=torch.tensor(u))
    assert torch.equal(o, o_tensor)


def test_compiles_with_aot_eager_and_matches_eager():
    q, k, v, c = fox_inputs(1, 2, 1, 70, 70, 16, strength=1.0, seed=9)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros(1, 2, 1))
    inputs = [t.requires_grad_() for t in (q, k, v, log_f)]
    eager = acp_compile.fox_attention(*inputs)
    eager_grads = torch.autograd.grad(eager.sum(), inputs)
    compiled = torch.compile(acp_compile.fox_attention, backend="aot_eager", fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled.sum(), inputs)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_forward_returns_the_bound_it_pruned_with_and_the_backward_reuses_it(monkeypatch):
    """Paper rule: u is U from the data (auto), the caller's u_bound, or zeros without pruning; the online
    rule returns zeros. A forward and backward through autograd compute U once (the backward reads the
    recorded keep_from and computes no plan), and the gradients equal a direct backward call with it."""
    from acp_compile.kernels import dispatch, plan
    q, k, v, c = _op_args("gqa_tq_lt_tk", strength=1.0)
    scale = 1 / math.sqrt(q.shape[-1])
    _, _, u_auto, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None, certificate="paper")
    torch.testing.assert_close(u_auto, plan.torch_qk_bound(q, k, scale), rtol=0, atol=0)
    _, _, u_given, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, torch.tensor(0.75), certificate="paper")
    assert u_given.shape == q.shape[:2] and (u_given == 0.75).all()
    _, _, u_dense, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, None, None, certificate="paper")
    assert (u_dense == 0).all()
    _, _, u_online, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None)
    assert (u_online == 0).all()

    calls = []
    counted = plan.torch_qk_bound

    def counting(*args):
        calls.append(1)
        return counted(*args)
    monkeypatch.setattr(plan, "torch_qk_bound", counting)
    monkeypatch.setattr(dispatch, "torch_qk_bound", counting)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, c)]
    o, _, _, _ = torch.ops.acp.fox_attention_fwd(*leaves, None, -10.0, None, certificate="paper")
    o.backward(torch.randn_like(o))
    assert len(calls) == 1, f"U computed {len(calls)} times in one forward and backward"
    for certificate in ("paper", "online"):
        do = torch.randn_like(o)
        grads = torch.autograd.grad(
            torch.ops.acp.fox_attention_fwd(*leaves, None, -10.0, None, certificate=certificate)[0], leaves, do)
        with torch.no_grad():
            o2, lse2, u2, kf2 = torch.ops.acp.fox_attention_fwd(*leaves, None, -10.0, None, certificate=certificate)
            ref = torch.ops.acp.fox_attention_bwd(do, *leaves, o2, lse2, None, -10.0, u2, keep_from=kf2)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r.to(g.dtype), rtol=0, atol=0)


def test_online_certificate_reads_only_an_infinite_u_bound():
    """Under the online certificate u_bound = +inf keeps that head dense; a finite u_bound changes nothing
    (the certificate reads the norms); given norms equal to the computed ones give the same call."""
    from acp_compile.ops import row_norms
    q, k, v, c = fox_inputs(1, 2, 1, 200, 200, 16, gate="monotone", strength=1.0, seed=4)
    base = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -8.0, None)
    assert (base[3] > 0).any(dim=-1).all(), "both heads must prune"
    inf_head = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -8.0, torch.tensor([[float("inf"), 1.0]]))
    assert (inf_head[3][:, 0] == 0).all() and torch.equal(inf_head[3][:, 1], base[3][:, 1])
    finite = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -8.0, torch.tensor(0.01))
    assert torch.equal(finite[3], base[3]) and torch.equal(finite[0], base[0])
    given = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -8.0, None, q_norm=row_norms(q), k_norm=row_norms(k))
    assert torch.equal(given[0], base[0]) and torch.equal(given[3], base[3])
