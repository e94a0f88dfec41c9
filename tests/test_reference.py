"""The fp64 reference against an element-by-element evaluation of the FoX formula (DESIGN.md section 2)."""
from __future__ import annotations

import math

import pytest
import torch

from acp_compile.kernels.reference import (
    attention_probs, causal_mask, fox_attention_reference, logits, repeat_kv,
)
from helpers import fox_inputs


def loop_reference(q, k, v, c, scale):
    """o[b, h, i] by explicit loops over the visible keys: the formula, written as plainly as possible."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    o = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    lse = torch.zeros(B, Hq, Tq, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(Tq):
                p_i = Tk - Tq + i
                s = [scale * float(q[b, h, i].double() @ k[b, h // g, j].double()) + float(c[b, h, p_i]) - float(c[b, h, j])
                     for j in range(p_i + 1)]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                z = sum(w)
                lse[b, h, i] = m + math.log(z)
                for j, wj in enumerate(w):
                    o[b, h, i] += (wj / z) * v[b, h // g, j].double()
    return o, lse


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D", [(1, 1, 1, 5, 5, 3), (2, 4, 2, 3, 7, 4), (1, 3, 1, 6, 6, 2), (1, 2, 2, 1, 9, 5)])
def test_reference_matches_the_formula_entry_by_entry(B, Hq, Hkv, Tq, Tk, D):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, strength=0.7, seed=Tk)
    o, lse = fox_attention_reference(q, k, v, c, 0.37)
    o_loop, lse_loop = loop_reference(q, k, v, c, 0.37)
    torch.testing.assert_close(o, o_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_loop, rtol=1e-12, atol=1e-12)
    assert o.dtype == lse.dtype == torch.float64


def test_default_scale_is_one_over_sqrt_d():
    q, k, v, c = fox_inputs(1, 2, 2, 6, 6, 9, seed=1)
    o_default, _ = fox_attention_reference(q, k, v, c)
    o_explicit, _ = fox_attention_reference(q, k, v, c, 1 / 3)
    torch.testing.assert_close(o_default, o_explicit, rtol=0, atol=0)


def test_causal_mask_puts_queries_at_the_last_positions():
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())


def test_logits_mask_the_future_and_probs_sum_to_one():
    q, k, v, c = fox_inputs(1, 2, 1, 5, 8, 4, strength=1.0, seed=2)
    s = logits(q, k, c)
    assert torch.isneginf(s[~causal_mask(5, 8).expand_as(s)]).all()
    p = attention_probs(q, k, c)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 5, dtype=torch.float64))


def test_repeat_kv_maps_query_head_h_to_kv_head_h_over_group():
    x = torch.arange(2 * 3).view(1, 3, 2, 1).float()
    r = repeat_kv(x, 6)
    assert [int(r[0, h, 0, 0]) for h in range(6)] == [0, 0, 2, 2, 4, 4]
    assert repeat_kv(x, 3) is x


def test_keep_all_true_is_dense_and_keep_masks_entries():
    q, k, v, c = fox_inputs(1, 2, 2, 6, 6, 4, strength=0.5, seed=3)
    dense, _ = fox_attention_reference(q, k, v, c)
    keep = torch.ones(1, 2, 6, 6, dtype=torch.bool)
    torch.testing.assert_close(fox_attention_reference(q, k, v, c, keep=keep)[0], dense, rtol=0, atol=0)
    keep[..., 0] = False
    keep[..., 0, 0] = True                         # row 0 sees only key 0: keep its one entry
    o, _ = fox_attention_reference(q, k, v, c, keep=keep)
    # Row 3 without key 0: softmax over keys 1..3 only.
    p = torch.softmax(logits(q, k, c)[0, 1, 3, 1:4], -1)
    torch.testing.assert_close(o[0, 1, 3], p @ v[0, 1, 1:4].double())


def test_gate_gradient_row_term_vanishes():
    """dL/dc_i through the query side, sum_j dS_ij, is zero: the kernels use dc = -colsum(dS) only."""
    q, k, v, c = fox_inputs(2, 2, 1, 7, 11, 5, strength=0.3, gate="walk", seed=4)
    c = c.double().requires_grad_()
    s = logits(q, k, c)
    p = torch.softmax(s, -1)
    do = torch.randn(2, 2, 7, 5, dtype=torch.float64)
    o = p @ repeat_kv(v.double(), 2)
    (o * do).sum().backward()
    dp = do @ repeat_kv(v.double(), 2).transpose(-1, -2)
    ds = p * (dp - (do * o).sum(-1, keepdim=True))                 # (B, Hq, Tq, Tk)
    assert ds.sum(-1).abs().max() < 1e-12                          # row sums vanish
    torch.testing.assert_close(c.grad, -ds.sum(-2), rtol=1e-10, atol=1e-12)
