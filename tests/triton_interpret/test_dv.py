"""A value head dim Dv unlike the q/k head dim D in the Triton kernels (interpreter), with pruning on.

Tight against the fp64 reference of the pruned attention (keep = the plan of the kernel's own tiles),
outputs NaN-poisoned before each launch. (D, Dv): 192/128 (MLA-style, D padded to 256), 16/64 (Dv
larger), 24/7 (both odd-sized, Dv below the 16-wide padding). The default scale is 1/sqrt(D).
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
from helpers import fox_inputs

FWD = FwdConfig(32, 16, 4, 1)
BWD = BackwardConfig(16, 32, 16, 32, 4, 1, 4, 1, 16)
CASES = [
    # B, Hq, Hkv, Tq, Tk, D, Dv
    (1, 2, 1, 40, 40, 192, 128),
    (1, 2, 2, 37, 70, 16, 64),
    (2, 4, 2, 45, 45, 24, 7),
]
IDS = [f"D{c[5]}-Dv{c[6]}" for c in CASES]
TOL = {torch.float32: 2e-4, torch.float16: 2e-2}


def _inputs(case, dtype, seed=0):
    B, Hq, Hkv, Tq, Tk, D, Dv = case
    return fox_inputs(B, Hq, Hkv, Tq, Tk, D, Dv=Dv, dtype=dtype, gate="uniform", strength=0.6, qk_scale=1.5,
                      seed=seed + D, grad="after_gate")


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    ref = max(1.0, want.double().abs().max().item())
    assert err <= tol * ref, f"{what}: max error {err:.3e} > {tol:.1e} * {ref:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_backward_pruned_match_pruned_reference(case, dtype, poison):
    q, k, v, c, do = _inputs(case, dtype)
    B, Hq, Hkv, Tq, Tk, D, Dv = case
    scale, log_eps, u_bound = 1.0 / math.sqrt(D), 0.0, torch.tensor(0.0)    # u = 0: prunes hard on purpose
    # forward, on the plan of its own tiles
    start, _ = compute_plan(q, k, c, scale, log_eps, u_bound, FWD.block_m, FWD.block_n)
    plan = make_plan(q, k, c, scale, log_eps, u_bound, FWD.block_m, FWD.block_n)
    assert (plan.start > 0).any(), "the case must skip tiles"
    o = torch.full((B, Hq, Tq, Dv), float("nan"), dtype=dtype)
    lse = torch.full((B, Hq, Tq), float("nan"))
    o, lse = launch_forward(q, k, v, c, scale, start, FWD, o=o, lse=lse)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "unwritten output entries"
    keep = kept_entries(plan, Tq, Tk)
    leaves = [t.double().requires_grad_() for t in (q, k, v, c)]
    ro, rl = fox_attention_reference(*leaves, sm_scale=scale, keep=keep)
    _close(o, ro.detach(), TOL[dtype], "o")
    _close(lse, rl.detach(), TOL[dtype], "lse")
    # backward, on the plan of the dk/dv kernel's tiles
    bplan = make_plan(q, k, c, scale, log_eps, u_bound, BWD.kv_block_m, BWD.kv_block_n)
    bro, brl = fox_attention_reference(*leaves, sm_scale=scale, keep=kept_entries(bplan, Tq, Tk))
    want = torch.autograd.grad(bro, leaves, do.double())
    got = backward(do, q, k, v, c, bro.detach().to(dtype), brl.detach().float(), scale, log_eps, u_bound, BWD)
    assert [tuple(g.shape) for g in got] == [tuple(t.shape) for t in (q, k, v, c)]
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert not torch.isnan(g).any(), f"{name}: unwritten entries"
        _close(g, w, TOL[dtype], name)


def test_op_default_scale_is_one_over_sqrt_dqk_and_eps_bound_holds(poison):
    """Through the op (interpreter switch): output (B, Hq, Tq, Dv), scale 1/sqrt(D), within eps of dense."""
    case = (1, 2, 1, 50, 50, 192, 128)
    q, k, v, c, do = _inputs(case, torch.float32, seed=3)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros_like(c[..., :1]))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_f)]
    log_eps = -8.0
    o = acp_compile.fox_attention(*leaves, log_eps=log_eps)
    assert o.shape == (1, 2, 50, 128)
    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v, log_f)]
    ro, _ = fox_attention_reference(*ref_leaves[:3], torch.cumsum(ref_leaves[3], -1), sm_scale=1 / math.sqrt(192))
    vmax = v.double().norm(dim=-1).amax().item()
    _close(o, ro.detach(), 2e-4 + 2 * math.exp(log_eps) * vmax, "o")
    got = torch.autograd.grad(o, leaves, do)
    want = torch.autograd.grad(ro, ref_leaves, do.double())
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dlog_f")):
        _close(g, w, 2e-3, name)
