"""A value head dim Dv unlike the q/k head dim D: the blocked path, the op and the API (CPU).

Truth is the fp64 reference with the plan's kept entries (pruning on); outputs NaN-poisoned. (D, Dv):
192/128 (MLA-style), 64/128, 24/7 and 5/33 (odd sizes). The default scale is 1/sqrt(D), never 1/sqrt(Dv).
"""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile
from acp_compile.kernels import blocked
from acp_compile.kernels.plan import kept_entries, make_plan, skipped_fraction
from acp_compile.kernels.reference import fox_attention_reference
from helpers import fox_inputs

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CASES = [
    # B, Hq, Hkv, Tq, Tk, D, Dv
    (1, 2, 1, 70, 70, 192, 128),
    (2, 2, 2, 40, 90, 64, 128),
    (1, 4, 2, 45, 45, 24, 7),
    (1, 2, 2, 33, 50, 5, 33),
]
IDS = [f"D{c[5]}-Dv{c[6]}" for c in CASES]


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    ref = max(1.0, want.double().abs().max().item())
    assert err <= tol * ref, f"{what}: max error {err:.3e} > {tol:.1e} * {ref:.3g}"


# every case in fp32; the other dtypes on the MLA-style case only (CI time)
DTYPE_CASES = [(c, torch.float32) for c in CASES] + [(CASES[0], d) for d in (torch.float64, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", DTYPE_CASES, ids=[f"D{c[5]}-Dv{c[6]}-{str(d)[6:]}" for c, d in DTYPE_CASES])
def test_blocked_forward_and_backward_match_pruned_reference(case, dtype, poison):
    B, Hq, Hkv, Tq, Tk, D, Dv = case
    q, k, v, c, do = fox_inputs(B, Hq, Hkv, Tq, Tk, D, Dv=Dv, dtype=dtype, strength=2.0, qk_scale=0.4, seed=D + Dv,
                                grad="after_gate")
    scale = 1 / math.sqrt(D)
    plan = make_plan(q, k, c, scale, -10.0, None, 16, 16)
    assert skipped_fraction(plan).mean() > 0.1, "meant to prune"
    o, lse = blocked.forward(q, k, v, c, scale, plan)
    assert o.shape == (B, Hq, Tq, Dv) and o.dtype == dtype
    keep = kept_entries(plan, Tq, Tk)
    leaves = [t.double().requires_grad_() for t in (q, k, v, c)]
    ro, rl = fox_attention_reference(*leaves, sm_scale=scale, keep=keep)
    _close(o, ro.detach(), TOL[dtype], "o")
    _close(lse, rl.detach(), max(TOL[dtype], 2e-5), "lse")
    grads = blocked.backward(do, q, k, v, c, o, lse, scale, plan)
    want = torch.autograd.grad(ro, leaves, do.double())
    for g, w, name in zip(grads, want, ("dq", "dk", "dv", "dc")):
        assert g.shape == w.shape, name
        _close(g, w, max(8 * TOL[dtype], 1e-6), name)


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_api_output_shape_layout_default_scale_and_eps_bound(layout):
    B, Hq, Hkv, Tq, Tk, D, Dv = 2, 4, 2, 60, 60, 64, 128
    # (B, H, T, .) views; with layout "bthd" of (B, T, H, .) memory
    q, k, v, log_f = fox_inputs(B, Hq, Hkv, Tq, Tk, D, Dv=Dv, strength=0.5, seed=5, log_f=True, layout=layout)
    log_eps = -8.0
    if layout == "bhtd":
        o = acp_compile.fox_attention(q, k, v, log_f, log_eps=log_eps)
    else:
        o = acp_compile.fox_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_f.transpose(1, 2),
                                      log_eps=log_eps, layout="bthd")
        assert o.shape == (B, Tq, Hq, Dv) and o.is_contiguous(), "o follows q's (B, T, H) layout"
        o = o.transpose(1, 2)
    assert o.shape == (B, Hq, Tq, Dv)
    ro, _ = fox_attention_reference(q, k, v, torch.cumsum(log_f.double(), -1), sm_scale=1 / math.sqrt(D))
    vmax = v.double().norm(dim=-1).amax().item()
    _close(o, ro, 2e-5 + 2 * math.exp(log_eps) * vmax, "o")


@pytest.mark.parametrize("log_eps", [-10.0, None])
def test_opcheck_forward_and_backward(log_eps):
    q, k, v, c = fox_inputs(1, 4, 2, 20, 50, 12, Dv=20, strength=1.0, qk_scale=0.3, seed=1)
    q, k, v, c = (t.requires_grad_() for t in (q, k, v, c))
    torch.library.opcheck(torch.ops.acp.fox_attention_fwd.default, (q, k, v, c, None, log_eps, None))
    with torch.no_grad():
        o, lse, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None)
    assert o.shape == (1, 4, 20, 20)
    torch.library.opcheck(torch.ops.acp.fox_attention_bwd.default,
                          (torch.randn_like(o), q.detach(), k.detach(), v.detach(), c.detach(), o, lse, None, log_eps, None))


def test_gradcheck_fp64_with_pruning():
    q, k, v, log_f = fox_inputs(1, 2, 1, 9, 12, 3, Dv=5, dtype=torch.float64, strength=0.3, log_f=True,
                                gate_dtype=torch.float64, seed=2)
    args = [t.requires_grad_() for t in (q, k, v, log_f)]
    assert torch.autograd.gradcheck(lambda *a: acp_compile.fox_attention(*a, log_eps=-10.0), args, fast_mode=True)


def test_empty_batch_gives_dv_output():
    q, k, v, c = fox_inputs(1, 2, 2, 4, 4, 8, Dv=3)
    o, lse, u, _ = torch.ops.acp.fox_attention_fwd(q[:0], k[:0], v[:0], c[:0], None, -10.0, None)
    assert o.shape == (0, 2, 4, 3)
