"""acp_compile.fox_decode on CPU without the Triton switch: the general op with the same threshold,
against the fp64 reference (the kernels themselves: tests/triton_interpret/test_decode.py and the GPU suite)."""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile
from acp_compile.kernels.reference import fox_attention_reference


def _inputs(Tq=2, Tk=77, Hq=4, Hkv=2, D=16, seed=0, rate=0.3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, Tq, D, generator=g)
    k, v = torch.randn(1, Hkv, Tk, D, generator=g), torch.randn(1, Hkv, Tk, D, generator=g)
    c = torch.cumsum(-rate * torch.rand(1, Hq, Tk, generator=g), dim=-1)
    return q, k, v, c


@pytest.mark.parametrize("log_eps", [None, -8.0])
def test_general_op_path_within_eps(log_eps):
    q, k, v, c = _inputs()
    got = acp_compile.fox_decode(q, k, v, c, log_eps=log_eps, k_norm_max=k.norm(dim=-1).amax(-1))
    want, _ = fox_attention_reference(q.double(), k.double(), v.double(), c.double())
    tol = 1e-5 + (0 if log_eps is None else 2 * math.exp(log_eps) * v.norm(dim=-1).max().item())
    assert (got.double() - want).abs().max().item() <= tol


def test_empty_batch_gives_an_empty_output():
    q, k, v, c = _inputs()
    out = acp_compile.fox_decode(q[:0], k[:0], v[:0], c[:0])
    assert out.shape == (0, 4, 2, 16)


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.randn(1, 4, 17, 16)), "at most 16"),
    (dict(k=torch.randn(1, 3, 77, 16)), "multiple of Hkv"),
    (dict(v=torch.randn(1, 2, 70, 16)), "must match k"),
    (dict(c=torch.randn(1, 4, 70)), "c must be"),
])
def test_bad_shapes_are_named(bad, match):
    args = dict(zip("qkvc", _inputs()))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        acp_compile.fox_decode(args["q"], args["k"], args["v"], args["c"])
