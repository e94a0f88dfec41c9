"""Padded and packed batches in the Triton kernels (interpreter): plan, forward, backward, op.

Tight against the fp64 reference of the pruned, masked attention (keep = the plan of the kernel's own
tiles); outputs NaN-poisoned before each launch; rows with no visible key must give o = 0, lse = -inf
and zero gradients. Kinds of masks: tests/segment_cases.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile
from acp_compile.kernels.fox_triton.backward import BackwardConfig, backward
from acp_compile.kernels.fox_triton.configs import FwdConfig
from acp_compile.kernels.fox_triton.forward import launch_forward
from acp_compile.kernels.fox_triton.plan import compute_plan
from acp_compile.kernels.plan import kept_entries, make_plan
from acp_compile.kernels.reference import fox_attention_reference
from acp_compile.kernels.segments import make_segments
from helpers import fox_inputs
from segment_cases import segment_inputs

FWD = FwdConfig(32, 16, 4, 1)
NEWEST = FwdConfig(16, 16, 4, 1, False, False, True)
BWD = BackwardConfig(16, 32, 16, 32, 4, 1, 4, 1, 16)
KINDS = ["left", "right", "holes", "docs", "docs_left"]
TOL = {torch.float32: 2e-4, torch.float16: 2e-2}


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    ref = max(1.0, want.double().abs().max().item())
    assert err <= tol * ref, f"{what}: max error {err:.3e} > {tol:.1e} * {ref:.3g}"


@pytest.mark.parametrize("kind,log_eps", [(k, 0.0) for k in KINDS] + [("docs", None)])
def test_device_plan_equals_torch_plan(kind, log_eps):
    q, k, v, c = fox_inputs(2, 2, 1, 50, 77, 16, gate="bump", strength=0.5, qk_scale=1.5, seed=4)
    key_mask, doc = segment_inputs(kind, 2, 77, seed=4)
    seg = make_segments(key_mask, doc, 50, 77)
    u = torch.tensor(0.0)
    start, end = compute_plan(q, k, c, 0.25, log_eps, u, 16, 8, seg=seg)
    plan = make_plan(q, k, c, 0.25, log_eps, u, 16, 8, seg)
    assert torch.equal(start, plan.start) and torch.equal(end, plan.end)


# every kind in fp32; fp16 on the combined kind only (CI time)
CASES = [(kind, torch.float32) for kind in KINDS] + [("docs_left", torch.float16)]


@pytest.mark.parametrize("kind,dtype", CASES, ids=[f"{k}-{str(d)[6:]}" for k, d in CASES])
def test_forward_and_backward_match_pruned_reference(kind, dtype, poison):
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 45, 70, 24
    q, k, v, c, do = fox_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, gate="uniform", strength=0.6, qk_scale=1.5,
                                seed=len(kind), grad="after_gate")
    key_mask, doc = segment_inputs(kind, B, Tk, seed=len(kind))
    seg = make_segments(key_mask, doc, Tq, Tk)
    scale, log_eps, u_bound = 1 / math.sqrt(D), 0.0, torch.tensor(0.0)     # U = 0: prunes hard on purpose
    leaves = [t.double().requires_grad_() for t in (q, k, v, c)]
    for cfg in (FWD, NEWEST):
        start, _ = compute_plan(q, k, c, scale, log_eps, u_bound, cfg.block_m, cfg.block_n, seg=seg)
        plan = make_plan(q, k, c, scale, log_eps, u_bound, cfg.block_m, cfg.block_n, seg)
        assert (plan.start > 0).any()
        o = torch.full((B, Hq, Tq, D), float("nan"), dtype=dtype)
        lse = torch.full((B, Hq, Tq), float("nan"))
        o, lse = launch_forward(q, k, v, c, scale, start, cfg, o=o, lse=lse, seg=seg)
        assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "unwritten output entries"
        ro, rl = fox_attention_reference(*leaves, sm_scale=scale, keep=kept_entries(plan, Tq, Tk),
                                         key_mask=key_mask, doc=doc)
        _close(o, ro.detach(), TOL[dtype], "o")
        finite = torch.isfinite(rl)
        assert torch.equal(torch.isfinite(lse), finite), "lse = -inf exactly on rows with no visible key"
        _close(lse[finite], rl.detach()[finite], TOL[dtype], "lse")
    bplan = make_plan(q, k, c, scale, log_eps, u_bound, BWD.kv_block_m, BWD.kv_block_n, seg)
    bro, brl = fox_attention_reference(*leaves, sm_scale=scale, keep=kept_entries(bplan, Tq, Tk),
                                       key_mask=key_mask, doc=doc)
    want = torch.autograd.grad(bro, leaves, do.double())
    got = backward(do, q, k, v, c, bro.detach().to(dtype), brl.detach().float(), scale, log_eps, u_bound, BWD, seg=seg)
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert not torch.isnan(g).any(), f"{name}: unwritten entries or NaN"
        _close(g, w, TOL[dtype], name)


@pytest.mark.parametrize("certificate", ["online", "paper"])
def test_op_eps_bound_and_gradients_padded_and_packed(poison, certificate):
    """Through the op (interpreter switch), valid U: within eps of the dense masked attention, under either
    certificate (the online one runs its stop test with the segment masks inside the Triton tiles)."""
    B, H, T, D = 2, 2, 60, 16
    q, k, v, c, do = fox_inputs(B, H, H, T, T, D, gate="uniform", strength=1.0, qk_scale=0.5, seed=9, grad="after_gate")
    key_mask, doc = segment_inputs("docs_left", B, T, seed=9)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros_like(c[..., :1]))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_f)]
    o = acp_compile.fox_attention(*leaves, log_eps=-8.0, key_padding_mask=key_mask, document_ids=doc,
                                  certificate=certificate)
    ref = [t.double().clone().requires_grad_() for t in (q, k, v, log_f)]
    ro, _ = fox_attention_reference(*ref[:3], torch.cumsum(ref[3], -1), key_mask=key_mask, doc=doc)
    vmax = v.double().norm(dim=-1).amax().item()
    _close(o, ro.detach(), 2e-4 + 2 * math.exp(-8.0) * vmax, "o")
    for g, w, name in zip(torch.autograd.grad(o, leaves, do), torch.autograd.grad(ro, ref, do.double()),
                          ("dq", "dk", "dv", "dlog_f")):
        _close(g, w, 2e-3, name)
