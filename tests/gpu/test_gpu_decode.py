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


@pytest.mark.parametrize("Hkv,Tq,Tk", [(16, 1, 32768), (4, 1, 40000), (4, 7, 8191)], ids=lambda x: str(x))
def test_op_short_queries_forward_and_backward_match_the_reference(Hkv, Tq, Tk):
    """The op at Tq <= 16 (kernels/short_queries.py, as a compiled model calls it while decoding): the
    split-key decode kernels, dense whatever log_eps asks, and a dense backward."""
    from acp_compile.kernels.reference import fox_attention_reference
    q, k, v, c = _cache(2, 16, Hkv, Tq, Tk, 128, torch.bfloat16, seed=3)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o, lse, _, keep_from = torch.ops.acp.fox_attention_fwd(*leaves, c, None, -10.0, None)
    assert not keep_from.any()
    do = torch.randn_like(o)
    o.backward(do)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rlse = fox_attention_reference(*ref, c.double())
    ro.backward(do.double())
    assert (o.double() - ro).abs().max().item() <= 2e-2
    assert (lse.double() - rlse).abs().max().item() <= 2e-2
    for name, got, want in zip("qkv", leaves, ref):
        err = (got.grad.double() - want.grad).abs().max().item()
        assert err <= 3e-2 * max(1.0, want.grad.abs().max().item()), f"d{name}: {err}"


def test_op_short_queries_capture_in_a_cuda_graph():
    q, k, v, c = _cache(2, 16, 4, 1, 20000, 128, torch.bfloat16, seed=4)
    eager = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None)[0]
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None)[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
