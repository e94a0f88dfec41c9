"""The op end to end on the GPU: routing to Triton, gradients, CUDA-graph capture (no host sync),
bitwise-reproducible backward, and a Triton forward mixed with the blocked backward."""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile
from acp_compile.kernels import blocked, dispatch
from acp_compile.kernels.reference import fox_attention_reference
from helpers import W1_ON_CUDA, fox_inputs
from sampled_reference import eps_bound, rows_reference, sample_rows


def test_cuda_bf16_routes_to_triton_forward_and_backward():
    q, k, v, c = fox_inputs(1, 4, 2, 256, 256, 64, dtype=torch.bfloat16, **W1_ON_CUDA)
    assert dispatch.forward_implementation(q, k, v, c) == "triton"
    assert dispatch.forward_implementation(q, k, v, c) in ("triton", "blocked")   # the backward follows the same rule
    q64, k64, v64, c64 = (t.double() for t in (q, k, v, c))
    assert dispatch.forward_implementation(q64, k64, v64, c64) == "blocked"


def test_functional_api_bthd_long_sequence_inside_eps_bound():
    B, T, H, D = 1, 16384, 8, 128
    q, k, v, c = fox_inputs(B, H, H, T, T, D, dtype=torch.bfloat16, n_global=2, layout="bthd", **W1_ON_CUDA)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros_like(c[..., :1])).transpose(1, 2)   # (B, T, H)
    o = acp_compile.fox_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_f, layout="bthd")
    assert o.shape == (B, T, H, D)
    rows = sample_rows(T)
    c_api = torch.cumsum(log_f.float(), dim=1).transpose(1, 2)
    ro, _ = rows_reference(q, k, v, c_api, D ** -0.5, rows)
    got = o.transpose(1, 2)[:, :, rows.cuda()].double()
    assert (got - ro).abs().max().item() <= 2.5e-2 + eps_bound(v, -10.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("log_eps", [None, -10.0])
def test_gradients_match_fp64_reference(dtype, log_eps):
    q, k, v, c = fox_inputs(2, 4, 2, 700, 900, 64, dtype=dtype, strength=0.02, seed=5, **W1_ON_CUDA)
    do = torch.randn_like(q)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, c)]
    o, _, _, _ = torch.ops.acp.fox_attention_fwd(*leaves, None, log_eps, None)
    o.backward(do)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, c)]
    ro, _ = fox_attention_reference(*ref)
    ro.backward(do.double())
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert (o.double() - ro).abs().max().item() <= tol
    for name, got, want in zip("qkvc", leaves, ref):
        scale = want.grad.abs().max().item()
        err = (got.grad.double() - want.grad).abs().max().item()
        assert err <= tol * max(1.0, scale), f"d{name}: max error {err} (grad max {scale})"


def test_forward_captures_in_a_cuda_graph_without_host_sync():
    q, k, v, c = fox_inputs(2, 8, 8, 4096, 4096, 128, dtype=torch.bfloat16, **W1_ON_CUDA)
    eager, _, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None)      # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def test_backward_is_bitwise_reproducible():
    q, k, v, c = fox_inputs(1, 8, 4, 3000, 3000, 128, dtype=torch.bfloat16, seed=2, **W1_ON_CUDA)
    do = torch.randn_like(q)
    o, lse, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None)
    g1 = torch.ops.acp.fox_attention_bwd(do, q, k, v, c, o, lse, None, -10.0, None)
    g2 = torch.ops.acp.fox_attention_bwd(do, q, k, v, c, o, lse, None, -10.0, None)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_triton_forward_with_blocked_backward_stays_close():
    q, k, v, c = fox_inputs(1, 4, 2, 1000, 1000, 64, dtype=torch.bfloat16, strength=0.05, seed=3, **W1_ON_CUDA)
    do = torch.randn_like(q)
    scale = 64 ** -0.5
    o, lse, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, scale, -10.0, None)
    fast = torch.ops.acp.fox_attention_bwd(do, q, k, v, c, o, lse, scale, -10.0, None)
    plan = dispatch.blocked_plan(q, k, c, scale, -10.0, None)
    slow = blocked.backward(do, q, k, v, c, o, lse, scale, plan)
    for name, a, b in zip(("dq", "dk", "dv", "dc"), fast, slow):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= 3e-2 * max(1.0, b.double().abs().max().item()), f"{name}: {err}"
    assert math.isfinite(lse.sum().item())
