"""Padded and packed batches on the GPU (skipped without CUDA): the op's Triton forward and backward at
T = 2048 with the shipped tile tables and pruning on, against fp64 autograd through the dense masked
reference (tolerance: the dtype's rounding plus the eps bound, so it holds whatever tiles are kept).

Rows with no visible key must give exactly 0 and zero gradients. Each case takes a few seconds (one fp64
reference of 2 x 4 x 2048 x 2048).
"""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile
from acp_compile.api import cu_seqlens_to_document_ids
from acp_compile.kernels import dispatch
from acp_compile.kernels.plan import make_plan, skipped_fraction
from acp_compile.kernels.reference import fox_attention_reference
from acp_compile.kernels.segments import make_segments
from helpers import W1_ON_CUDA, fox_inputs
from segment_cases import cu_seqlens_of, segment_inputs

TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-2}   # fp32 runs its dots in TF32
KINDS = ["left", "right", "holes", "docs", "docs_left"]


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    ref = max(1.0, want.double().abs().max().item())
    assert err <= tol * ref, f"{what}: max error {err:.3e} > {tol:.1e} * {ref:.3g}"


CASES = [(kind, torch.bfloat16) for kind in KINDS] + [("docs_left", torch.float16), ("docs_left", torch.float32)]


@pytest.mark.parametrize("kind,dtype", CASES, ids=[f"{k}-{str(d)[6:]}" for k, d in CASES])
def test_op_forward_and_backward_against_fp64(kind, dtype):
    B, Hq, Hkv, T, D = 2, 4, 2, 2048, 128
    q, k, v, c, do = fox_inputs(B, Hq, Hkv, T, T, D, dtype=dtype, seed=len(kind), grad="after_gate", strength=0.12,
                                **W1_ON_CUDA)
    key_mask, doc = segment_inputs(kind, B, T, seed=len(kind), device="cuda")
    assert dispatch.forward_implementation(q, k, v, c) == "triton"
    bm, bn = dispatch.forward_tile_sizes(q, k, v, c)
    seg = make_segments(key_mask, doc, T, T)
    plan = make_plan(q, k, c, 1 / math.sqrt(D), -10.0, None, bm, bn, seg)
    assert skipped_fraction(plan).max() > 0.3, "the gates must prune at 2k"
    leaves = [t.clone().requires_grad_() for t in (q, k, v, c)]
    o = torch.ops.acp.fox_attention_fwd(*leaves, None, -10.0, None, key_mask, doc)[0]
    assert not torch.isnan(o).any()
    empty = seg.anchor < 0                                                  # (B, T) rows with no visible key
    assert (o.transpose(1, 2)[empty] == 0).all()
    grads = torch.autograd.grad(o, leaves, do)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, c)]
    ro, _ = fox_attention_reference(*ref, key_mask=key_mask, doc=doc)
    want = torch.autograd.grad(ro, ref, do.double())
    eps_term = 2 * math.exp(-10.0) * v.double().norm(dim=-1).amax().item()
    _close(o, ro.detach(), TOL[dtype] + eps_term, "o")
    for g, w, name in zip(grads, want, ("dq", "dk", "dv", "dc")):
        assert not torch.isnan(g).any(), name
        _close(g, w, TOL[dtype] + 10 * eps_term, name)
    assert (grads[0].transpose(1, 2)[empty] == 0).all(), "dq of rows with no visible key is 0"


def test_packed_documents_equal_separate_calls_and_skip_other_documents():
    """8 documents of 256 packed into one row of 2048 (cu_seqlens), bf16: each document's output equals
    its own call, and the dense plan keeps only the tiles of each document's diagonal block."""
    lengths = [256] * 8
    T, H, D = sum(lengths), 8, 128
    q, k, v, c = fox_inputs(1, H, H, T, T, D, dtype=torch.bfloat16, **W1_ON_CUDA)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros_like(c[..., :1]))
    cu = cu_seqlens_of(lengths, device="cuda")
    o = acp_compile.fox_attention(q, k, v, log_f, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = acp_compile.fox_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], log_f[..., a:b])
        _close(o[:, :, a:b], part, 2e-2, f"document {a}:{b}")
    doc = cu_seqlens_to_document_ids(cu, 1, T)
    bm, bn = dispatch.forward_tile_sizes(q, k, v, c)
    plan = make_plan(q, k, c, 1 / math.sqrt(D), None, None, bm, bn, make_segments(None, doc, T, T))
    causal_tiles = (plan.n_hi.float() + 1).sum().item()
    kept = (plan.n_hi[None, None].float() + 1 - plan.start.float()).sum(-1) / causal_tiles     # (1, H)
    assert kept.max().item() <= 2 / 8, f"packed plan keeps {kept.max().item():.3f} of the causal tiles"


def test_forward_with_segments_does_not_sync():
    q, k, v, c = fox_inputs(2, 4, 2, 1024, 1024, 64, dtype=torch.bfloat16, **W1_ON_CUDA)
    key_mask, doc = segment_inputs("docs_left", 2, 1024, seed=1, device="cuda")
    torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None, key_mask, doc)     # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None, key_mask, doc)
    finally:
        torch.cuda.set_sync_debug_mode(0)
