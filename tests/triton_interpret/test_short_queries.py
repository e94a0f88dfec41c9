"""The op's short-query path (kernels/short_queries.py: Tq <= 16 against Tk >= 256 keys runs the split-key
decode kernels, dense) under the interpreter: against the fp64 reference for output, lse and gradients,
whatever log_eps asks; the op's NaN rule for v without a pass over v; output strides follow q's."""
from __future__ import annotations

import pytest
import torch

import acp_compile  # noqa: F401  (registers torch.ops.acp)
from acp_compile.kernels import short_queries
from acp_compile.kernels.reference import fox_attention_reference
from helpers import fox_inputs

CASES = {   # (B, Hq, Hkv, Tq, Tk, D, Dv)
    "one_token_gqa": (2, 4, 2, 1, 300, 32, None),
    "speculative_16_mqa": (1, 3, 1, 16, 257, 16, None),
    "odd_tq_dv": (1, 2, 2, 5, 389, 24, 40),
}


def inputs(case, strength=0.3, seed=0):
    B, Hq, Hkv, Tq, Tk, D, Dv = CASES[case]
    return fox_inputs(B, Hq, Hkv, Tq, Tk, D, Dv=Dv, gate="mixed", strength=strength, qk_scale=0.7, seed=seed)


def fwd(q, k, v, c, log_eps=-10.0):
    return torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None)


def test_the_path_is_taken_only_for_short_queries_against_many_keys():
    q, k, _, _ = inputs("one_token_gqa")
    assert short_queries.covers(q, k, None)
    assert not short_queries.covers(q, k[:, :, :200], None)
    assert not short_queries.covers(q.expand(-1, -1, 17, -1), k, None)
    assert not short_queries.covers(q, k, object())                      # padding / documents: general path


@pytest.mark.parametrize("log_eps", [None, -10.0])
@pytest.mark.parametrize("case", list(CASES))
def test_dense_output_and_lse_match_the_fp64_reference(case, log_eps):
    q, k, v, c = inputs(case)
    o, lse, u, keep_from = fwd(q, k, v, c, log_eps)
    want_o, want_lse = fox_attention_reference(q, k, v, c)
    assert not keep_from.any() and not u.any()                          # nothing skipped, no bound used
    torch.testing.assert_close(o.double(), want_o, atol=2e-3, rtol=2e-3)          # TF32 dots
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("case", ["one_token_gqa", "odd_tq_dv"])
def test_gradients_match_the_fp64_reference(case):
    q, k, v, c = (t.requires_grad_() for t in inputs(case, seed=4))
    o = fwd(q, k, v, c)[0]
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v, c), do)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, c)]
    want = torch.autograd.grad(fox_attention_reference(*ref)[0], ref, do.double())
    for name, g, w in zip("qkvc", got, want):
        torch.testing.assert_close(g.double(), w, atol=3e-3, rtol=3e-3, msg=f"d{name}")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_anywhere_makes_its_column_nan_in_every_row(value):
    """The op's NaN rule for v (acp_compile/ops.py), here without a pass over v: the kernel reads every v
    into every row's product (rows that cannot see that key included)."""
    q, k, v, c = inputs("odd_tq_dv")
    v = v.clone()
    v[0, 1, -1, 7] = value                          # the newest key: the first query rows cannot see it
    o = fwd(q, k, v, c)[0]
    assert torch.isnan(o[0, 1, :, 7]).all()
    others = torch.ones_like(o, dtype=torch.bool)
    others[0, 1, :, 7] = False
    assert torch.isfinite(o[others]).all()


def test_output_takes_the_dimension_order_of_q():
    q, k, v, c = inputs("odd_tq_dv")
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)                          # (B, T, H, D) storage
    o = fwd(qt, k, v, c)[0]
    assert o.stride(1) < o.stride(2)
    torch.testing.assert_close(o, fwd(q, k, v, c)[0])
