"""The pass rewrites FoX attention whose value head dim Dv differs from the q/k head dim D (issue #12
item 4): the eager spelling and flex_attention's score_mod, forward and gradients against eager."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import acp_compile


def eager_fox(q, k, v, fg):
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    keep = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def flex_fox(q, k, v, fg):
    from torch.nn.attention.flex_attention import flex_attention
    c = torch.cumsum(F.logsigmoid(fg), -1)

    def score_mod(score, b, h, i, j):
        return torch.where(i >= j, score + c[b, h, i] - c[b, h, j], float("-inf"))
    return flex_attention(q, k, v, score_mod=score_mod)


@pytest.mark.parametrize("fn", [eager_fox, flex_fox], ids=["eager", "flex"])
@pytest.mark.parametrize("D,Dv", [(24, 10), (8, 24)])
def test_rewritten_and_matches_eager_with_gradients(fn, D, Dv):
    torch.compiler.reset()
    counters.clear()
    g = torch.Generator().manual_seed(D + Dv)
    q, k = (torch.randn(2, 2, 40, D, generator=g) for _ in range(2))
    v = torch.randn(2, 2, 40, Dv, generator=g)
    fg = torch.randn(2, 2, 40, generator=g) + 2.0
    grads = fn is eager_fox                     # flex_attention has no backward on CPU
    leaves = [t.clone().requires_grad_(grads) for t in (q, k, v, fg)]
    o = torch.compile(fn, backend="acp", fullgraph=True, options={"log_eps": None})(*leaves)
    assert counters["acp"]["fox_attention"] == 1, dict(counters["acp"])
    ref_leaves = [t.clone().requires_grad_(grads) for t in (q, k, v, fg)]
    ro = eager_fox(*ref_leaves)
    assert o.shape == (2, 2, 40, Dv)
    torch.testing.assert_close(o, ro, atol=2e-5, rtol=2e-5)
    if not grads:
        return
    do = torch.randn_like(ro)
    for a, b in zip(torch.autograd.grad(o, leaves, do), torch.autograd.grad(ro, ref_leaves, do)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
