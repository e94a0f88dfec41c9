"""The blocked PyTorch path against the fp64 reference of exactly the attention the plan keeps.

Outputs are poisoned (NaN-filled torch.empty) so a tile the path forgets to write shows as NaN.
"""
from __future__ import annotations

import math

import pytest
import torch

from acp_compile.kernels import blocked
from acp_compile.kernels.plan import kept_entries, kept_tiles, make_plan, skipped_fraction
from acp_compile.kernels.reference import fox_attention_reference
from helpers import fox_inputs, requires_cuda

# Tolerances of the blocked path against the pruned fp64 reference, by input dtype (outputs are
# rounded to the input dtype; the compute is fp32, fp64 for fp64).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def run_forward(q, k, v, c, log_eps=-10.0, bm=16, bn=16, u_bound=None):
    scale = 1 / math.sqrt(q.shape[-1])
    plan = make_plan(q, k, c, scale, log_eps, u_bound, bm, bn)
    o, lse = blocked.forward(q, k, v, c, scale, plan)
    keep = kept_entries(plan, q.shape[2], k.shape[2])
    o_ref, lse_ref = fox_attention_reference(q, k, v, c, scale, keep=keep)
    return plan, scale, (o, lse), (o_ref, lse_ref), keep


def reference_grads(q, k, v, c, scale, keep, do):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, c)]
    o, _ = fox_attention_reference(*leaves, scale, keep=keep)
    o.backward(do.double())
    return [t.grad for t in leaves]


def assert_close_scaled(actual, expected, tol, name):
    err = (actual.double() - expected).abs().max().item()
    ref = max(expected.abs().max().item(), 1.0)
    assert err <= tol * ref, f"{name}: max error {err:.3g} > {tol:.1g} * {ref:.3g}"


def assert_backward_matches(q, k, v, c, o, lse, scale, plan, keep, tol):
    """Blocked backward of a random do against fp64 autograd through the (pruned) reference."""
    do = torch.randn_like(o)
    grads = blocked.backward(do, q, k, v, c, o, lse, scale, plan)
    for name, got, want in zip(("dq", "dk", "dv", "dc"), grads, reference_grads(q, k, v, c, scale, keep, do)):
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert_close_scaled(got, want, tol, name)


SHAPES = [
    # B, Hq, Hkv, Tq, Tk, D, strength
    (1, 2, 2, 100, 100, 16, 1.0),
    (2, 4, 2, 77, 77, 32, 0.5),
    (1, 6, 3, 45, 150, 64, 0.7),      # Tq < Tk, GQA
    (1, 3, 1, 1, 99, 80, 2.0),        # one decode step, MQA
    (1, 2, 1, 33, 65, 96, 0.3),
    (2, 2, 2, 70, 70, 128, 1.5),
]


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,strength", SHAPES)
def test_forward_and_backward_match_pruned_reference(poison, B, Hq, Hkv, Tq, Tk, D, strength):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, strength=strength, qk_scale=0.5, seed=D + Tq)
    plan, scale, (o, lse), (o_ref, lse_ref), keep = run_forward(q, k, v, c)
    assert_close_scaled(o, o_ref, TOL[torch.float32], "o")
    assert_close_scaled(lse, lse_ref, TOL[torch.float32], "lse")
    assert_backward_matches(q, k, v, c, o, lse, scale, plan, keep, 5 * TOL[torch.float32])
    if strength >= 0.7 and Tk > 64:
        assert skipped_fraction(plan).mean() > 0.2, "meant to prune: check the test inputs"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(poison, dtype):
    q, k, v, c = fox_inputs(2, 4, 2, 50, 90, 24, dtype=dtype, strength=1.0, qk_scale=0.5, seed=3)
    plan, scale, (o, lse), (o_ref, lse_ref), keep = run_forward(q, k, v, c)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close_scaled(o, o_ref, TOL[dtype], "o")
    do = torch.randn_like(o)
    grads = blocked.backward(do, q, k, v, c, o, lse, scale, plan)
    assert [g.dtype for g in grads] == [dtype, dtype, dtype, torch.float32]
    # The backward reads o and lse rounded to the output dtype; allow a few roundings.
    for name, got, want in zip(("dq", "dk", "dv", "dc"), grads, reference_grads(q, k, v, c, scale, keep, do)):
        assert_close_scaled(got, want, max(8 * TOL[dtype], 1e-6), name)


def test_dense_plan_equals_dense_reference(poison):
    q, k, v, c = fox_inputs(1, 2, 1, 90, 90, 16, strength=3.0, seed=4)
    plan, _, (o, _), _, keep = run_forward(q, k, v, c, log_eps=None)
    assert keep.sum() == 2 * 90 * 91 // 2
    o_dense, _ = fox_attention_reference(q, k, v, c)
    assert_close_scaled(o, o_dense, TOL[torch.float32], "o")


def test_transposed_inputs_need_no_copy_and_outputs_follow_strides(poison):
    """(B, T, H, D) storage seen as (B, H, T, D): outputs keep the input's strides."""
    q, k, v, c = fox_inputs(2, 4, 2, 40, 40, 8, strength=1.0, seed=5)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    plan, scale, (o, lse), (o_ref, _), keep = run_forward(qt, kt, vt, c)
    assert o.stride() == qt.stride()
    assert_close_scaled(o, o_ref, TOL[torch.float32], "o")
    grads = blocked.backward(torch.randn_like(o), qt, kt, vt, c, o, lse, scale, plan)
    assert grads[0].stride() == qt.stride() and grads[1].stride() == kt.stride() and grads[2].stride() == vt.stride()
    assert not any(torch.isnan(g).any() for g in grads)


def test_only_kept_tiles_are_read():
    """NaN in v of key block 0: query blocks that skip that block stay finite, the others see the NaN."""
    q, k, v, c = fox_inputs(1, 2, 2, 128, 128, 8, strength=1.0, qk_scale=0.3, seed=6)
    v[:, :, 3] = float("nan")                                             # inside key block 0
    scale = 1 / math.sqrt(8)
    plan = make_plan(q, k, c, scale, -10.0, None, 16, 16)
    o, _ = blocked.forward(q, k, v, c, scale, plan)
    reads_block0 = kept_tiles(plan)[..., :, 0]                            # (B, Hq, Mq)
    assert reads_block0.any() and (~reads_block0).any(), "inputs must make some query blocks skip key block 0"
    rows_nan = torch.isnan(o).any(-1).view(1, 2, 8, 16)                   # per query block, per row
    rows_nan[..., 0, :3] = True                                           # rows 0..2 never see key 3
    assert torch.equal(rows_nan.all(-1), reads_block0)


def test_work_is_the_kept_area_and_never_t_by_t(monkeypatch):
    q, k, v, c = fox_inputs(1, 4, 2, 200, 200, 8, strength=1.0, qk_scale=0.3, gate="mixed", seed=7)
    computed, largest = [0], [0]
    original = blocked._scores

    def counting_scores(blk, *args):
        qb, kb, s = original(blk, *args)
        computed[0] += s.numel()
        largest[0] = max(largest[0], s.shape[-2] * s.shape[-1])
        return qb, kb, s

    monkeypatch.setattr(blocked, "_scores", counting_scores)
    plan = make_plan(q, k, c, 1 / math.sqrt(8), -10.0, None, 16, 16)
    blocked.forward(q, k, v, c, 1 / math.sqrt(8), plan)
    kept_area = int(kept_tiles(plan).sum()) * 16 * 16                   # upper bound on computed scores
    dense_area = 4 * 200 * 200
    assert computed[0] <= kept_area
    assert computed[0] < 0.6 * dense_area                                 # half the heads are local: real skipping
    assert largest[0] <= 16 * 200                                         # one query block by at most Tk keys
    assert 0.3 < skipped_fraction(plan).mean() < 0.6


def test_heads_with_different_starts_are_grouped_correctly(poison):
    """Local and global heads in one call: several head groups per query block, GQA across them."""
    q, k, v, c = fox_inputs(2, 6, 2, 120, 120, 16, strength=1.0, qk_scale=0.3, gate="mixed", seed=8)
    plan, scale, (o, lse), (o_ref, _), keep = run_forward(q, k, v, c)
    assert len({tuple(r) for r in plan.start[..., -1].tolist()}) > 1 or plan.start[..., -1].unique().numel() > 1
    assert_close_scaled(o, o_ref, TOL[torch.float32], "o")
    assert_backward_matches(q, k, v, c, o, lse, scale, plan, keep, 5 * TOL[torch.float32])


def test_nan_in_gives_nan_out_like_eager():
    q, k, v, c = fox_inputs(1, 2, 2, 64, 64, 8, strength=1.0, seed=9)
    q[0, 0, 10, 0] = float("nan")
    c[0, 1, 20] = float("nan")
    plan, _, (o, _), (o_ref, _), _ = run_forward(q, k, v, c)
    assert torch.equal(torch.isnan(o), torch.isnan(o_ref))
    assert torch.isnan(o[0, 0, 10]).all() and torch.isnan(o[0, 1, 20:]).all() and not torch.isnan(o[0, 0, 11:]).any()


@requires_cuda
@pytest.mark.parametrize("gate,strided", [("monotone", False), ("mixed", True)])
def test_blocked_runs_on_cuda(gate, strided):
    """The fallback on CUDA tensors: same results, outputs on the device, any head-group mode."""
    q, k, v, c = fox_inputs(2, 4, 2, 100, 300, 64, strength=0.5, qk_scale=0.5, gate=gate, seed=10, device="cuda")
    if strided:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        c = c.transpose(1, 2).contiguous().transpose(1, 2)
    plan, scale, (o, lse), (o_ref, _), keep = run_forward(q, k, v, c, bm=64, bn=64)
    assert o.device.type == "cuda" and o.stride() == q.stride()
    assert skipped_fraction(plan).mean() > 0.1
    assert_close_scaled(o, o_ref, 1e-4, "o")
    assert_backward_matches(q, k, v, c, o, lse, scale, plan, keep, 5e-4)


def test_inputs_are_left_untouched():
    """The path reads views of the caller's tensors (fp32, all heads in one group): none may change."""
    q, k, v, c = fox_inputs(1, 2, 1, 70, 70, 8, strength=0.5, seed=12)
    scale = 1 / math.sqrt(8)
    plan = make_plan(q, k, c, scale, -10.0, None, 16, 16)
    copies = [t.clone() for t in (q, k, v, c)]
    o, lse = blocked.forward(q, k, v, c, scale, plan)
    do = torch.randn_like(o)
    saved = [t.clone() for t in (do, o, lse)]
    blocked.backward(do, q, k, v, c, o, lse, scale, plan)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, c, do, o, lse), copies + saved))


def test_large_gate_values_keep_fp32_accuracy(poison):
    """c far from 0 (a long decay before this window): the bias c_i - c_j - lse_i must not round to |c|."""
    q, k, v, c = fox_inputs(1, 2, 1, 100, 100, 16, strength=0.3, qk_scale=0.5, seed=13)
    c = c - 5000.0                                    # attention is unchanged; fp32 ulp of c is now 5e-4
    plan, scale, (o, lse), (o_ref, lse_ref), keep = run_forward(q, k, v, c)
    assert_close_scaled(o, o_ref, TOL[torch.float32], "o")
    assert_backward_matches(q, k, v, c, o, lse, scale, plan, keep, 5 * TOL[torch.float32])


def test_head_group_modes():
    """all heads -> slices; one contiguous run aligned to kv groups (or one head) -> views; else gathered."""
    B, Hq, Hkv = 2, 6, 3                                                  # g = 2
    every = [(b, h) for b in range(B) for h in range(Hq)]
    assert blocked._heads_of(every, B, Hq, Hkv, "cpu").mode == "all"
    assert blocked._heads_of([(1, 2), (1, 3)], B, Hq, Hkv, "cpu").mode == "slice"      # kv head 1 of b=1
    assert blocked._heads_of([(0, 3)], B, Hq, Hkv, "cpu").mode == "slice"              # one head
    assert blocked._heads_of([(0, 1), (0, 2)], B, Hq, Hkv, "cpu").mode == "index"      # splits kv groups
    assert blocked._heads_of([(0, 0), (1, 0)], B, Hq, Hkv, "cpu").mode == "index"      # two batch elements


def test_all_three_head_modes_in_one_call_match_the_reference(poison, monkeypatch):
    q, k, v, c = fox_inputs(2, 4, 2, 150, 150, 16, strength=1.0, qk_scale=0.3, gate="mixed", seed=14)
    modes = []
    original = blocked._heads_of
    monkeypatch.setattr(blocked, "_heads_of", lambda *a: modes.append(original(*a).mode) or original(*a))
    plan, scale, (o, lse), (o_ref, _), keep = run_forward(q, k, v, c)
    assert {"all", "slice", "index"} <= set(modes)
    assert_close_scaled(o, o_ref, TOL[torch.float32], "o")
    assert_backward_matches(q, k, v, c, o, lse, scale, plan, keep, 5 * TOL[torch.float32])


def _gate_layouts(c):
    """c (B, H, T) in the layouts a graph may hand over: contiguous, permuted from (B, T, H),
    one gate shared by all heads (stride 0), and a sliced view."""
    B, H, T = c.shape
    return {
        "contiguous": c,
        "from_bth": c.permute(0, 2, 1).contiguous().permute(0, 2, 1),
        "shared_over_heads": c[:, :1].expand(B, H, T),
        "sliced": torch.cat([c, c], dim=-1)[..., :T],
    }


@pytest.mark.parametrize("layout", ["contiguous", "from_bth", "shared_over_heads", "sliced"])
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk", [(1, 4, 4, 100, 100), (2, 4, 2, 64, 64), (1, 2, 1, 30, 90)])
def test_any_gate_layout_through_the_op(layout, B, Hq, Hkv, Tq, Tk):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, 16, strength=0.5, qk_scale=0.5, seed=Tk)
    c = _gate_layouts(c)[layout]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [c.detach().requires_grad_()]
    o, _, _, _ = torch.ops.acp.fox_attention_fwd(*leaves, None, -10.0, None)
    do = torch.randn_like(o)
    o.backward(do)
    plan = make_plan(q, k, c, 1 / 4, -10.0, None, blocked.BLOCK_M, blocked.BLOCK_N)
    keep = kept_entries(plan, Tq, Tk)
    o_ref, _ = fox_attention_reference(q, k, v, c, 1 / 4, keep=keep)
    assert_close_scaled(o, o_ref, TOL[torch.float32], "o")
    for name, got, want in zip(("dq", "dk", "dv", "dc"), leaves, reference_grads(q, k, v, c, 1 / 4, keep, do)):
        assert_close_scaled(got.grad, want, 5 * TOL[torch.float32], name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 4, 2, 97, 131, 24), (1, 3, 1, 70, 70, 16)])
def test_online_forward_then_backward_with_the_recorded_set_in_another_partition(dtype, shape):
    """The online forward (16 x 8 tiles) records keep_from; the backward in the default 64 x 64
    partition computes exactly that set (masks inside its tiles): both equal the fp64 reference of the
    recorded set, and the case prunes. Outputs of the forward are compared, gradients too."""
    from acp_compile.kernels import blocked_certified
    from acp_compile.kernels.certificate import cert_stats, keep_from_rows
    from acp_compile.kernels.plan import recorded_plan
    from acp_compile.kernels.reference import recorded_entries
    B, Hq, Hkv, Tq, Tk, D = shape
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, gate="walk", strength=1.0, seed=5)
    c = c.to(torch.float64 if dtype == torch.float64 else torch.float32)
    scale = 1 / math.sqrt(D)
    o, lse, start = blocked_certified.forward(q, k, v, c, scale, -6.0, cert_stats(q, k, c, scale, 8), 16)
    keep_from = keep_from_rows(start, Tq, 16, 8)
    keep = recorded_entries(keep_from, Tk)
    assert (keep_from > 0).float().mean() > 0.3, "the case must prune"
    o_ref, lse_ref = fox_attention_reference(q, k, v, c, scale, keep=keep)
    assert_close_scaled(o, o_ref, TOL[dtype], "o")
    assert_close_scaled(lse, lse_ref, 1e-6, "lse")
    do = torch.randn_like(o)
    plan = recorded_plan(keep_from, Tk, blocked.BLOCK_M, blocked.BLOCK_N)
    grads = blocked.backward(do, q, k, v, c, o, lse, scale, plan, keep_from=keep_from)
    for name, got, want in zip(("dq", "dk", "dv", "dc"), grads, reference_grads(q, k, v, c, scale, keep, do)):
        assert_close_scaled(got, want, 10 * TOL[dtype], name)
