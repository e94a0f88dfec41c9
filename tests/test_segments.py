"""Padded batches (key_mask) and packed documents (doc_ids, cu_seqlens) on CPU: the blocked path, the
plan, the op and the API against the fp64 reference (issue #12 items 2 and 3).

Rows with no visible key return 0 with zero gradients (the op's semantics, kernels/segments.py).
Outputs are NaN-poisoned (torch.empty filled with NaN) so an unwritten tile fails.
"""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile
from acp_compile.kernels import blocked
from acp_compile.kernels.plan import kept_entries, make_plan, skipped_fraction
from acp_compile.kernels.reference import fox_attention_reference
from acp_compile.kernels.segments import make_segments, visible_mask
from helpers import fox_inputs
from segment_cases import cu_seqlens_of, segment_inputs

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
KINDS = ["left", "right", "holes", "docs", "docs_left"]


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    ref = max(1.0, want.double().abs().max().item())
    assert err <= tol * ref, f"{what}: max error {err:.3e} > {tol:.1e} * {ref:.3g}"


def _blocked_vs_reference(q, k, v, c, do, key_mask, doc, log_eps, u_bound, dtype):
    Tq, Tk = q.shape[2], k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1])
    seg = make_segments(key_mask, doc, Tq, Tk)
    plan = make_plan(q, k, c, scale, log_eps, u_bound, 16, 16, seg)
    o, lse = blocked.forward(q, k, v, c, scale, plan, seg)
    keep = kept_entries(plan, Tq, Tk)
    leaves = [t.double().requires_grad_() for t in (q, k, v, c)]
    ro, rl = fox_attention_reference(*leaves, sm_scale=scale, keep=keep, key_mask=key_mask, doc=doc)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    _close(o, ro.detach(), TOL[dtype], "o")
    finite = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), finite), "lse = -inf exactly for rows with no visible key"
    _close(lse[finite], rl.detach()[finite], max(TOL[dtype], 2e-5), "lse")
    grads = blocked.backward(do, q, k, v, c, o, lse, scale, plan, seg)
    want = torch.autograd.grad(ro, leaves, do.double())
    for g, w, name in zip(grads, want, ("dq", "dk", "dv", "dc")):
        assert not torch.isnan(g).any(), name
        _close(g, w, max(8 * TOL[dtype], 1e-6), name)
    return plan, seg, o


@pytest.mark.parametrize("kind", KINDS)
def test_blocked_matches_pruned_reference(kind, poison):
    B, Hq, Hkv, Tq, Tk, D = 3, 4, 2, 70, 90, 16
    q, k, v, c, do = fox_inputs(B, Hq, Hkv, Tq, Tk, D, strength=1.5, qk_scale=0.5, seed=11, grad="after_gate")
    key_mask, doc = segment_inputs(kind, B, Tk, seed=1)
    plan, seg, o = _blocked_vs_reference(q, k, v, c, do, key_mask, doc, -10.0, None, torch.float32)
    assert skipped_fraction(plan).mean() > 0.1, "meant to prune"
    empty = seg.anchor < 0                                              # (B, Tq) rows with no visible key
    if kind in ("left", "docs_left"):
        assert empty.any(), "left padding leaves rows with no visible key"
    assert (o.permute(0, 2, 1, 3)[empty] == 0).all(), "rows with no visible key return exactly 0"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_blocked_dtypes(dtype, poison):
    q, k, v, c, do = fox_inputs(2, 2, 1, 60, 60, 24, dtype=dtype, strength=1.5, qk_scale=0.5, seed=3, grad="after_gate")
    key_mask, doc = segment_inputs("docs_left", 2, 60, seed=2)
    _blocked_vs_reference(q, k, v, c, do, key_mask, doc, -10.0, None, dtype)


def test_right_padding_keeps_the_eps_bound_when_the_diagonal_is_masked(poison):
    """Right padding with a hard decay over the padded positions: a padded query row's diagonal key is
    masked and its newest visible key lies 40 nats back. Measured from the (masked) diagonal, every
    visible tile of such a row would look prunable; measured from the anchor, the row keeps its keys."""
    B, H, T, D = 1, 2, 64, 16
    q, k, v, c = fox_inputs(B, H, H, T, T, D, strength=0.01, seed=4)
    c[..., 40:] -= 40.0                                                  # a reset where the padding starts
    key_mask = torch.arange(T)[None, :] < 40
    scale = 1 / math.sqrt(D)
    seg = make_segments(key_mask, None, T, T)
    plan = make_plan(q, k, c, scale, -8.0, None, 16, 16, seg)
    o, _ = blocked.forward(q, k, v, c, scale, plan, seg)
    ro, _ = fox_attention_reference(q, k, v, c, key_mask=key_mask)
    vmax = v.double().norm(dim=-1).amax().item()
    _close(o, ro, 2 * math.exp(-8.0) * vmax + 2e-5, "o")
    diagonal_plan = make_plan(q, k, c, scale, -8.0, None, 16, 16)       # what the unmasked rule would keep
    assert (diagonal_plan.start[..., -1] > 0).all() and (plan.start[..., -1] == 0).all()


def test_cross_document_tiles_are_skipped_even_dense():
    B, H, T, D = 1, 2, 96, 8
    q, k, v, c = fox_inputs(B, H, H, T, T, D, seed=5)
    doc = torch.zeros(1, T, dtype=torch.long)
    doc[:, 48:] = 1
    plan = make_plan(q, k, c, 1 / math.sqrt(D), None, None, 16, 16, make_segments(None, doc, T, T))
    assert plan.start[0, :, 3:].eq(3).all(), "query blocks of document 1 start at its first key block"
    assert plan.start[0, :, :3].eq(0).all()


def test_packed_equals_separate_calls_and_cu_seqlens_equals_document_ids():
    lengths = [13, 30, 1, 20]
    T = sum(lengths)
    q, k, v, log_f = fox_inputs(1, 2, 1, T, T, 16, strength=0.3, seed=6, log_f=True)
    cu = cu_seqlens_of(lengths)
    o = acp_compile.fox_attention(q, k, v, log_f, cu_seqlens=cu)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    torch.testing.assert_close(o, acp_compile.fox_attention(q, k, v, log_f, document_ids=doc), rtol=0, atol=0)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = acp_compile.fox_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], log_f[..., a:b])
        torch.testing.assert_close(o[:, :, a:b], part, atol=2e-6, rtol=2e-5)


def test_left_padded_batch_equals_unpadded_rows():
    """Batched generation: each row left-padded to T; its valid part equals the unpadded call (the gate
    over the padding does not matter: only c_i - c_j inside the valid part enters)."""
    B, H, T, D = 3, 2, 40, 16
    q, k, v, log_f = fox_inputs(B, H, H, T, T, D, strength=0.5, seed=7, log_f=True)
    pads = [0, 9, 25]
    key_mask = torch.arange(T)[None, :] >= torch.tensor(pads)[:, None]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_f)]
    o = acp_compile.fox_attention(*leaves, key_padding_mask=key_mask.long())    # HF style 0/1 integers
    o.sum().backward()
    for b, pad in enumerate(pads):
        ref = acp_compile.fox_attention(q[b:b + 1, :, pad:], k[b:b + 1, :, pad:], v[b:b + 1, :, pad:],
                                        log_f[b:b + 1, :, pad:])
        torch.testing.assert_close(o[b:b + 1, :, pad:], ref, atol=2e-6, rtol=2e-5)
        assert (o[b, :, :pad] == 0).all()
        assert (leaves[0].grad[b, :, :pad] == 0).all(), "no gradient into rows with no visible key"
        assert (leaves[1].grad[b, :, :pad] == 0).all() and (leaves[2].grad[b, :, :pad] == 0).all()


def test_visible_mask_matches_the_reference_rule():
    key_mask, doc = segment_inputs("docs_left", 2, 50, seed=8)
    seg = make_segments(key_mask, doc, 30, 50)
    vis = visible_mask(seg, 30, 50)
    q, k, v, c = fox_inputs(2, 1, 1, 30, 50, 4, seed=8)
    from acp_compile.kernels.reference import logits
    assert torch.equal(vis, torch.isfinite(logits(q, k, c, key_mask=key_mask, doc=doc))[:, 0])
    anchor = torch.where(vis.any(-1), (vis * torch.arange(50)).amax(-1), -1)
    assert torch.equal(seg.anchor.long(), anchor)


@pytest.mark.parametrize("with_doc", [False, True])
def test_opcheck_with_segments(with_doc):
    q, k, v, c = fox_inputs(2, 4, 2, 20, 50, 8, strength=1.0, qk_scale=0.3, seed=1)
    key_mask, doc = segment_inputs("docs_left" if with_doc else "right", 2, 50, seed=3)
    q, k, v, c = (t.requires_grad_() for t in (q, k, v, c))
    args = (q, k, v, c, None, -10.0, None, key_mask, doc)
    torch.library.opcheck(torch.ops.acp.fox_attention_fwd.default, args)
    with torch.no_grad():
        o, lse, u, _ = torch.ops.acp.fox_attention_fwd(*args)
    torch.library.opcheck(torch.ops.acp.fox_attention_bwd.default,
                          (torch.randn_like(o), q.detach(), k.detach(), v.detach(), c.detach(), o, lse, None, -10.0, u,
                           key_mask, doc))


def test_gradcheck_fp64_padded_and_packed():
    q, k, v, log_f = fox_inputs(2, 2, 1, 9, 12, 3, dtype=torch.float64, strength=0.3, log_f=True,
                                gate_dtype=torch.float64, seed=2, Dv=2)
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[0, :4] = False
    key_mask[1, 10:] = False
    doc = torch.tensor([[0] * 7 + [1] * 5, [0] * 3 + [1] * 9])
    args = [t.requires_grad_() for t in (q, k, v, log_f)]
    assert torch.autograd.gradcheck(
        lambda *a: acp_compile.fox_attention(*a, log_eps=-10.0, key_padding_mask=key_mask, document_ids=doc), args,
        fast_mode=True)


def test_compiles_with_aot_eager():
    q, k, v, log_f = fox_inputs(2, 2, 2, 30, 30, 8, strength=0.3, log_f=True, seed=9)
    key_mask, doc = segment_inputs("docs_left", 2, 30, seed=9)

    def f(q, k, v, log_f, m, d):
        return acp_compile.fox_attention(q, k, v, log_f, key_padding_mask=m, document_ids=d)

    def g(q, k, v, log_f, cu):
        return acp_compile.fox_attention(q, k, v, log_f, cu_seqlens=cu)
    torch.compiler.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, log_f, key_mask, doc)
    torch.testing.assert_close(got, f(q, k, v, log_f, key_mask, doc))
    cu = cu_seqlens_of([7, 20, 3])
    got = torch.compile(g, backend="aot_eager", fullgraph=True)(q[:1], k[:1], v[:1], log_f[:1], cu)
    torch.testing.assert_close(got, g(q[:1], k[:1], v[:1], log_f[:1], cu))


def test_value_head_dim_with_padding_and_documents(poison):
    """Dv != D together with a key mask and packed documents (blocked path)."""
    q, k, v, c, do = fox_inputs(2, 4, 2, 40, 60, 24, Dv=9, strength=1.5, qk_scale=0.5, seed=12, grad="after_gate")
    key_mask, doc = segment_inputs("docs_left", 2, 60, seed=12)
    _blocked_vs_reference(q, k, v, c, do, key_mask, doc, -10.0, None, torch.float32)


BAD = [
    ("key_mask shape", dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError,
     r"key_mask must have shape \(B, Tk\) = \(1, 8\), got \(2, 7\)"),
    ("key_mask dtype", dict(key_padding_mask=torch.ones(1, 8)), TypeError,
     r"key_mask must be bool or integer \(True/1 = attend\), got torch.float32"),
    ("doc dtype", dict(document_ids=torch.zeros(1, 8)), TypeError, r"doc_ids must be integer document ids"),
    ("doc shape", dict(document_ids=torch.zeros(8, dtype=torch.long)), ValueError, r"doc_ids must have shape \(B, Tk\)"),
    ("cu_seqlens end", dict(cu_seqlens=torch.tensor([0, 3, 7])), ValueError, r"end at Tk = 8; got \[0, 3, 7\]"),
    ("cu_seqlens float", dict(cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, r"cu_seqlens must be an integer tensor"),
    ("both", dict(cu_seqlens=torch.tensor([0, 8]), document_ids=torch.zeros(1, 8, dtype=torch.long)), ValueError,
     r"document_ids or cu_seqlens, not both"),
]


@pytest.mark.parametrize("what,kwargs,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_segment_arguments(what, kwargs, exc, message):
    q, k, v, log_f = fox_inputs(1, 2, 2, 8, 8, 4, log_f=True)
    with pytest.raises(exc, match=message):
        acp_compile.fox_attention(q, k, v, log_f, **kwargs)


def test_cu_seqlens_needs_batch_one():
    q, k, v, log_f = fox_inputs(2, 2, 2, 8, 8, 4, log_f=True)
    with pytest.raises(ValueError, match=r"the batch must be 1; got B = 2"):
        acp_compile.fox_attention(q, k, v, log_f, cu_seqlens=torch.tensor([0, 8]))
