"""acp_compile.fox_decode on the GPU (kernels/fox_triton/decode.py) at real cache sizes: dense against an
fp32 reference, the per-row eps bound with W1-like gates, GQA, bf16."""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile


def _cache(B, Hq, Hkv, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, device="cuda", generator=g).to(dtype)
    rate = torch.full((Hq,), 30.0 / 1024, device="cuda")
    rate[Hq - Hq // 4:] = 1e-6                                            # a quarter of the heads global
    c = torch.cumsum(-rate[None, :, None] * (0.5 + torch.rand(B, Hq, Tk, device="cuda", generator=g)), dim=-1)
    return q, k, v, c


def _reference(q, k, v, c, scale):
    G = q.shape[1] // k.shape[1]
    kk, vv = (t.float().repeat_interleave(G, dim=1) for t in (k, v))
    Tq, Tk = q.shape[2], k.shape[2]
    s = scale * q.float() @ kk.transpose(-1, -2) + c[..., Tk - Tq:, None] - c[..., None, :]
    pos = torch.arange(Tk - Tq, Tk, device="cuda")
    s = s.masked_fill(torch.arange(Tk, device="cuda")[None, :] > pos[:, None], float("-inf"))
    return s.softmax(-1) @ vv


@pytest.mark.parametrize("Hkv,Tq,Tk", [(16, 1, 32768), (4, 1, 32768), (4, 4, 8191), (2, 16, 4096)])
def test_decode_matches_the_reference_and_the_eps_bound(Hkv, Tq, Tk):
    q, k, v, c = _cache(2, 16, Hkv, Tq, Tk, 128, torch.bfloat16)
    scale = 128 ** -0.5
    want = _reference(q, k, v, c, scale)
    dense = acp_compile.fox_decode(q, k, v, c, log_eps=None)
    assert not torch.isnan(dense).any()
    assert (dense.float() - want).abs().max().item() < 2e-2                # bf16 output
    kmax = torch.linalg.vector_norm(k.float(), dim=-1).amax(-1)
    pruned = acp_compile.fox_decode(q, k, v, c, log_eps=-10.0, k_norm_max=kmax)
    bound = 2 * math.exp(-10.0) * v.float().norm(dim=-1).max().item()
    assert (pruned.float() - want).abs().max().item() < 2e-2 + bound
