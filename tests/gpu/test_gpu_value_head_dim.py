"""Dv != D on the GPU (skipped without CUDA): the op's Triton forward and backward at T = 2048 with the
shipped tile tables, pruning on (steep W1-like gates), against fp64 autograd through the dense reference.

Tolerance: the dtype's rounding (relative to the largest reference value) plus the eps bound
2 eps max ||v|| (log_eps = -10), so the check holds whatever tiles the plan keeps. Each case takes a
few seconds (one fp64 reference of 4 x 2048 x 2048).
"""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile
from acp_compile.kernels import dispatch
from acp_compile.kernels.plan import make_plan, skipped_fraction
from acp_compile.kernels.reference import fox_attention_reference
from helpers import W1_ON_CUDA, fox_inputs

TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-2}   # fp32 runs its dots in TF32
CASES = [(192, 128), (64, 128), (128, 64), (100, 40)]


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    ref = max(1.0, want.double().abs().max().item())
    assert err <= tol * ref, f"{what}: max error {err:.3e} > {tol:.1e} * {ref:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("D,Dv", CASES, ids=[f"D{d}-Dv{e}" for d, e in CASES])
def test_op_forward_and_backward_against_fp64(D, Dv, dtype):
    B, Hq, Hkv, T = 1, 4, 2, 2048
    # W1-like gates, 4x steeper (0.12 nats per token) so that the plan prunes most tiles at 2k
    q, k, v, c, do = fox_inputs(B, Hq, Hkv, T, T, D, Dv=Dv, dtype=dtype, seed=D + Dv, grad="after_gate",
                                strength=0.12, **W1_ON_CUDA)
    assert dispatch.forward_implementation(q, k, v, c) == "triton"
    bm, bn = dispatch.forward_tile_sizes(q, k, v, c)
    plan = make_plan(q, k, c, 1 / math.sqrt(D), -10.0, None, bm, bn)
    assert skipped_fraction(plan).max() > 0.3, "the gates must prune at 2k"
    leaves = [t.clone().requires_grad_() for t in (q, k, v, c)]
    o, _, _, _ = torch.ops.acp.fox_attention_fwd(*leaves, None, -10.0, None)
    assert o.shape == (B, Hq, T, Dv) and not torch.isnan(o).any()
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, c)]
    ro, _ = fox_attention_reference(*ref_leaves)                        # scale 1/sqrt(D)
    want = torch.autograd.grad(ro, ref_leaves, do.double())
    eps_term = 2 * math.exp(-10.0) * v.double().norm(dim=-1).amax().item()
    _close(o, ro.detach(), TOL[dtype] + eps_term, "o")
    for g, w, name in zip(grads, want, ("dq", "dk", "dv", "dc")):
        assert g.shape == w.shape and not torch.isnan(g).any(), name
        _close(g, w, TOL[dtype] + 10 * eps_term, name)


def test_api_bthd_layout_mla_shapes():
    """The API in (B, T, H, D) layout with D = 192, Dv = 128, bf16: o (B, T, H, Dv), within tolerance."""
    B, H, T, D, Dv = 2, 4, 1024, 192, 128
    q, k, v, c = fox_inputs(B, H, H, T, T, D, Dv=Dv, dtype=torch.bfloat16, layout="bthd", strength=0.12, **W1_ON_CUDA)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros_like(c[..., :1])).transpose(1, 2)   # (B, T, H)
    o = acp_compile.fox_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_f, layout="bthd")
    assert o.shape == (B, T, H, Dv) and o.is_contiguous()
    ro, _ = fox_attention_reference(q, k, v, torch.cumsum(log_f.double(), dim=1).transpose(1, 2))
    _close(o.transpose(1, 2), ro, TOL[torch.bfloat16], "o")
