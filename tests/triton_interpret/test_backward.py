"""The Triton backward kernels (kernels/fox_triton/backward*.py) on CPU through the Triton interpreter.

Truth is the fp64 reference: gradients by autograd through `fox_attention_reference`, with
`keep = kept_entries(plan)` for the kernels' own tile partition (tight), or dense (eps-level).
Every output and the Delta scratch are NaN-poison before the launch, so an unwritten tile fails.
"""
from __future__ import annotations

import math

import pytest
import torch

from hypothesis import given, settings, strategies as st

from acp_compile.kernels.fox_triton.backward import BackwardConfig, backward
from acp_compile.kernels.plan import kept_entries, make_plan
from acp_compile.kernels.reference import fox_attention_reference
from helpers import fox_inputs

# Small tiles so that T around 100 crosses several of them; kv and q kernels differ in shape on purpose.
SAME = BackwardConfig(16, 32, 16, 32, 4, 1, 4, 1, 16)
MIXED = BackwardConfig(16, 32, 32, 16, 4, 1, 4, 1, 32)


def reference_grads(q, k, v, c, do, scale, keep=None):
    """fp64 (o, lse, dq, dk, dv, dc) of the (pruned, if keep) attention, by autograd."""
    leaves = [t.double().requires_grad_() for t in (q, k, v, c)]
    o, lse = fox_attention_reference(*leaves, sm_scale=scale, keep=keep)
    grads = torch.autograd.grad(o, leaves, do.double())
    return (o.detach(), lse.detach(), *grads)


def run_kernel(q, k, v, c, do, o, lse, scale, log_eps, u_bound, cfg):
    out = backward(do, q, k, v, c, o.to(q.dtype), lse.float(), scale, log_eps, u_bound, cfg)
    for t in out:
        assert not torch.isnan(t).any(), "an output was not written (NaN poison survived)"
    return out


def assert_close(got, want, tol, what):
    want = want.double()
    err = (got.double() - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3g}"


def tol_for(dtype):
    return 2e-4 if dtype == torch.float32 else 2e-2

SHAPES = [
    # B, Hq, Hkv, Tq, Tk, D, dtype
    (1, 1, 1, 1, 1, 16, torch.float32),
    (2, 4, 2, 17, 17, 32, torch.float32),     # GQA group 2, T below one tile row of the kv kernel
    (1, 2, 1, 100, 100, 80, torch.float16),   # D not a power of two, T not a multiple of a block
    (1, 2, 2, 30, 130, 16, torch.float32),    # Tq < Tk: prefill after a cache
    (1, 4, 1, 1, 100, 32, torch.float16),     # one decode step, GQA group 4
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hq{}Hkv{}Tq{}Tk{}D{}-{}".format(*s[:6], str(s[6])[6:]))
def test_dense_matches_reference(shape, poison):
    B, Hq, Hkv, Tq, Tk, D, dtype = shape
    q, k, v, c, do = fox_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, gate="uniform", strength=0.3, seed=Tk + D,
                                grad="after_gate")
    scale = 1.0 / math.sqrt(D)
    o, lse, *want = reference_grads(q, k, v, c, do, scale)
    got = run_kernel(q, k, v, c, do, o, lse, scale, None, None, SAME)
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert_close(g, w, tol_for(dtype), name)


@pytest.mark.parametrize("monotone", [True, False], ids=["monotone_c", "non_monotone_c"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_pruned_matches_pruned_reference(monotone, dtype, poison):
    """Tight: the kernels compute exactly the pruned attention of the plan for their partition."""
    B, Hq, Hkv, Tq, Tk, D = 1, 4, 2, 70, 130, 32
    q, k, v, c, do = fox_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, gate="uniform" if monotone else "bump", strength=0.5,
                                qk_scale=1.8, seed=7, grad="after_gate")
    # delta = -log(Tk): skipped entries still carry visible mass, so a wrongly visited tile shows.
    scale, log_eps = 1.0 / math.sqrt(D), 0.0
    u_bound = torch.tensor(0.0)      # not a valid bound on purpose
    plan = make_plan(q, k, c, scale, log_eps, u_bound, SAME.kv_block_m, SAME.kv_block_n)
    kept = kept_entries(plan, Tq, Tk)
    assert (plan.start > 0).any(), "the case must actually skip tiles"
    if monotone:
        assert (plan.end == 0).any(), "the case must have key blocks that no query block keeps"
    else:   # a kept query block below end[n] after a skipped one: the per-tile check matters
        m_idx = torch.arange(plan.num_query_blocks)[:, None]
        n_idx = torch.arange(plan.num_key_blocks)[None, :]
        kept_tiles = (n_idx >= plan.start[..., None]) & (n_idx <= plan.n_hi[:, None])
        below_end = m_idx < plan.end[..., None, :]
        assert (below_end & ~kept_tiles & (n_idx <= plan.n_hi[:, None])).any(), "needs a gap below end[n]"
    o, lse, *want = reference_grads(q, k, v, c, do, scale, keep=kept)
    got = run_kernel(q, k, v, c, do, o, lse, scale, log_eps, u_bound, SAME)
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert_close(g, w, tol_for(dtype), name)
    unkept_keys = ~kept.any(dim=2)                                    # (B, Hq, Tk)
    assert (got[3][unkept_keys] == 0).all(), "dc of keys no query keeps must be exactly 0"


def test_pruned_within_eps_of_dense_with_mixed_partitions(poison):
    """Valid U, kv and q kernels on different tile partitions: gradients stay eps-close to dense."""
    B, Hq, Hkv, Tq, Tk, D = 1, 2, 1, 90, 120, 16
    q, k, v, c, do = fox_inputs(B, Hq, Hkv, Tq, Tk, D, gate="uniform", strength=2.0, qk_scale=0.3, seed=3, grad="after_gate")
    scale, log_eps = 1.0 / math.sqrt(D), -9.0
    plan = make_plan(q, k, c, scale, log_eps, None, MIXED.kv_block_m, MIXED.kv_block_n)
    assert (plan.start > 0).any(), "the case must actually skip tiles"
    o, lse, *want = reference_grads(q, k, v, c, do, scale)
    got = run_kernel(q, k, v, c, do, o, lse, scale, log_eps, None, MIXED)
    eps = math.exp(log_eps)
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert_close(g, w, 2e-4 + 50 * eps, name)
    # and dense on mixed partitions is exact
    got_dense = run_kernel(q, k, v, c, do, o, lse, scale, None, None, MIXED)
    for g, w, name in zip(got_dense, want, ("dq", "dk", "dv", "dc")):
        assert_close(g, w, 2e-4, name + " (dense)")


def test_dq_on_the_shared_coarser_plan_is_exact(poison):
    """MIXED tiles share the dk/dv kernel's plan: dq keeps, per 32-row block, the keys from the smaller
    start of its two 16-row plan blocks. Checked exactly against that formula."""
    from acp_compile.kernels.reference import causal_mask, logits, repeat_kv

    assert MIXED.shares_plan and not (MIXED.kv_block_m, MIXED.kv_block_n) == (MIXED.q_block_m, MIXED.q_block_n)
    B, Hq, Hkv, Tq, Tk, D = 1, 2, 1, 75, 110, 16
    q, k, v, c, do = fox_inputs(B, Hq, Hkv, Tq, Tk, D, gate="uniform", strength=0.5, qk_scale=1.8, seed=21, grad="after_gate")
    scale, log_eps, u_bound = 1.0 / math.sqrt(D), 0.0, torch.tensor(0.0)
    plan = make_plan(q, k, c, scale, log_eps, u_bound, MIXED.kv_block_m, MIXED.kv_block_n)
    keep_kv = kept_entries(plan, Tq, Tk)
    o, lse, *want = reference_grads(q, k, v, c, do, scale, keep=keep_kv)
    got = run_kernel(q, k, v, c, do, o, lse, scale, log_eps, u_bound, MIXED)
    for g, w, name in zip(got[1:3], want[1:3], ("dk", "dv")):
        assert_close(g, w, 2e-4, name)
    ratio = MIXED.q_block_m // MIXED.kv_block_m
    blk = torch.arange(Tq) // MIXED.q_block_m
    sub = torch.clamp(blk[:, None] * ratio + torch.arange(ratio)[None, :], max=plan.num_query_blocks - 1)
    first_key = plan.start[..., sub].amin(-1).long() * MIXED.kv_block_n          # (B, Hq, Tq)
    keep_q = (torch.arange(Tk) >= first_key[..., None]) & causal_mask(Tq, Tk)
    assert (keep_q & ~keep_kv).any(), "the case must tell the two key sets apart"
    p = torch.exp(logits(q, k, c, scale).masked_fill(~keep_q, float("-inf")) - lse[..., None])
    delta = (do.double() * o).sum(-1, keepdim=True)
    ds = p * (do.double() @ repeat_kv(v.double(), Hq).transpose(-1, -2) - delta)
    assert_close(got[0], scale * ds @ repeat_kv(k.double(), Hq), 2e-4, "dq")
    # dc: the column sums come from the dk/dv kernel's tiles (the reference on keep_kv, whose own row
    # sums vanish), the row sums from the dq kernel's tiles, added at the query positions.
    ds_kv = p.masked_fill(~keep_kv, 0.0) * (do.double() @ repeat_kv(v.double(), Hq).transpose(-1, -2) - delta)
    want_dc = want[3].double().clone()
    want_dc[..., Tk - Tq:] += ds.sum(-1) - ds_kv.sum(-1)
    assert_close(got[3], want_dc, 2e-4, "dc")


def test_any_strides_and_reproducible(poison):
    """(B, T, H, D) views and a transposed gate; two runs give identical bits."""
    B, Hq, Hkv, T, D = 2, 2, 1, 45, 32
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    c = (-0.5 * torch.rand(B, T, Hq, generator=g)).cumsum(1).transpose(1, 2)   # (B, Hq, T), strided
    do = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2)
    scale, log_eps, u_bound = 0.2, -3.0, torch.tensor(0.2)
    plan = make_plan(q, k, c, scale, log_eps, u_bound, SAME.kv_block_m, SAME.kv_block_n)
    o, lse, *want = reference_grads(q, k, v, c, do, scale, keep=kept_entries(plan, T, T))
    got = run_kernel(q, k, v, c, do, o.float().transpose(1, 2).contiguous().transpose(1, 2), lse,
                     scale, log_eps, u_bound, SAME)
    assert got[0].stride() == q.stride() and got[1].stride() == k.stride() and got[3].stride() == c.stride()
    for gt, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert_close(gt, w, 2e-4, name)
    again = run_kernel(q, k, v, c, do, o.float(), lse, scale, log_eps, u_bound, SAME)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


def test_dc_row_term_really_cancels():
    """The kernels compute dc as -colsum(dS); autograd's dc also holds rowsum(dS), which must vanish."""
    q, k, v, c, do = fox_inputs(1, 2, 2, 40, 40, 16, dtype=torch.float64, gate="uniform", strength=0.5, seed=5,
                                grad="after_gate")
    c = c.double()
    from acp_compile.kernels.reference import logits
    s = logits(q, k, c, 0.25)
    p = torch.softmax(s, -1)
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (do * (p @ v)).sum(-1, keepdim=True))
    _, _, _, _, _, dc = reference_grads(q, k, v, c, do, 0.25)
    assert ds.sum(-1).abs().max() < 1e-10
    assert torch.allclose(dc, -ds.sum(-2), atol=1e-10)

@settings(max_examples=6, deadline=None)
@given(
    Tq=st.integers(1, 70), extra=st.integers(0, 40), D=st.sampled_from([16, 24, 32, 48]),
    group=st.sampled_from([1, 2]), log_eps=st.sampled_from([None, -2.0, -6.0]), seed=st.integers(0, 2**16),
)
def test_property_matches_pruned_reference(Tq, extra, D, group, log_eps, seed):
    Tk = Tq + extra
    q, k, v, c, do = fox_inputs(1, 2 * group, 2, Tq, Tk, D, gate="uniform", strength=1.0, seed=seed, grad="after_gate")
    scale, u_bound = 1.0 / math.sqrt(D), torch.tensor(0.3)
    keep = None
    if log_eps is not None:
        plan = make_plan(q, k, c, scale, log_eps, u_bound, SAME.kv_block_m, SAME.kv_block_n)
        keep = kept_entries(plan, Tq, Tk)
    o, lse, *want = reference_grads(q, k, v, c, do, scale, keep=keep)
    got = backward(do, q, k, v, c, o.float(), lse.float(), scale, log_eps, u_bound, SAME)
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert_close(g, w, 2e-4, name)


@pytest.mark.parametrize("log_eps", [None, -8.0])
def test_op_gradients_route_to_triton_backward(log_eps):
    """The op under the interpreter switch: Triton forward + this backward, vs dense fp64 autograd."""
    import acp_compile  # noqa: F401  (registers torch.ops.acp)
    from acp_compile.kernels import dispatch

    q, k, v, c, do = fox_inputs(1, 4, 2, 60, 90, 32, gate="uniform", strength=1.0, qk_scale=0.5, seed=13,
                                grad="after_gate")
    assert dispatch.forward_implementation(q, k, v, c) == "triton"      # one coverage rule for both passes
    leaves = [t.clone().requires_grad_() for t in (q, k, v, c)]
    o, _, _, _ = torch.ops.acp.fox_attention_fwd(*leaves, None, log_eps, None)
    o.backward(do)
    _, _, *want = reference_grads(q, k, v, c, do, 1.0 / math.sqrt(32))
    tol = 2e-4 + (0.0 if log_eps is None else 50 * math.exp(log_eps))
    for leaf, w, name in zip(leaves, want, ("dq", "dk", "dv", "dc")):
        assert_close(leaf.grad, w, tol, name)
