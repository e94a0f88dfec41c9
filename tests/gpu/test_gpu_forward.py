"""The Triton plan and forward on the GPU: bf16/fp16 up to T = 32k against an fp64 reference on sampled rows.

Checks per case: NaN-poisoned outputs are fully written; on sampled rows the result equals the
exact pruned attention of the kernel's own plan (tight), and the dense attention within the eps
bound; the device plan equals the torch plan. Covers GQA, Tq < Tk, head dims 64..256 including 80
and 96, transposed (B, T, H, D) inputs, and a k/v of more than 2^31 elements (64-bit offsets).
"""
from __future__ import annotations

import math

import pytest
import torch

from acp_compile.kernels.fox_triton.configs import FwdConfig, forward_config
from acp_compile.kernels.fox_triton.forward import forward, launch_forward
from acp_compile.kernels.fox_triton.plan import compute_plan
from acp_compile.kernels.plan import make_plan
from helpers import W1_ON_CUDA, fox_inputs
from sampled_reference import eps_bound, rows_reference, sample_rows

TOL = {torch.bfloat16: 2.5e-2, torch.float16: 4e-3, torch.float32: 5e-3}


def run_poisoned(q, k, v, c, scale, log_eps, u_bound, cfg=None):
    cfg = forward_config(q) if cfg is None else cfg
    start = None
    if log_eps is not None:
        start, _ = compute_plan(q, k, c, scale, log_eps, u_bound, cfg.block_m, cfg.block_n)
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    o, lse = launch_forward(q, k, v, c, scale, start, cfg, o=o, lse=lse)
    assert not torch.isnan(o).any(), "unwritten output entries"
    assert not torch.isnan(lse).any(), "unwritten lse entries"
    return o, lse, start, cfg


def check_rows(q, k, v, c, scale, o, lse, start, cfg, log_eps):
    rows = sample_rows(q.shape[2])
    tol = TOL[q.dtype]
    ro, rl = rows_reference(q, k, v, c, scale, rows, start, cfg.block_m, cfg.block_n)
    got_o, got_l = o[:, :, rows.to(q.device)].double(), lse[:, :, rows.to(q.device)].double()
    assert (got_o - ro).abs().max().item() <= tol, "pruned output differs from the exact pruned attention"
    assert (got_l - rl).abs().max().item() <= 1e-2 * max(1.0, rl.abs().max().item()) * (tol / 2.5e-2) + 1e-3
    if start is not None:
        dense_o, _ = rows_reference(q, k, v, c, scale, rows)
        assert (got_o - dense_o).abs().max().item() <= tol + eps_bound(v, log_eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1000, 4096, 16384, 32768])
@pytest.mark.parametrize("log_eps", [None, -10.0])
def test_w1_like_heads(T, dtype, log_eps):
    B = max(1, 8192 // T)
    q, k, v, c = fox_inputs(B, 8, 8, T, T, 128, dtype=dtype, n_global=2, seed=T, **W1_ON_CUDA)
    scale = 128 ** -0.5
    u = None if log_eps is None else torch.tensor(4.0, device="cuda")    # delta = -10 - log T - 8
    o, lse, start, cfg = run_poisoned(q, k, v, c, scale, log_eps, u)
    if start is not None and T >= 4096:
        assert start.float().mean() > 0, "local heads at this decay must prune"
    check_rows(q, k, v, c, scale, o, lse, start, cfg, log_eps)


@pytest.mark.parametrize("D", [64, 80, 96, 128, 256, 32, 16])
def test_head_dims(D):
    q, k, v, c = fox_inputs(2, 4, 2, 1500, 1500, D, dtype=torch.bfloat16, strength=0.05, **W1_ON_CUDA)
    o, lse, start, cfg = run_poisoned(q, k, v, c, D ** -0.5, -10.0, None)
    check_rows(q, k, v, c, D ** -0.5, o, lse, start, cfg, -10.0)


@pytest.mark.parametrize("Tq", [1, 7, 300, 2049])
def test_fewer_queries_than_keys_and_gqa(Tq):
    q, k, v, c = fox_inputs(2, 8, 2, Tq, 5000, 128, dtype=torch.bfloat16, strength=0.05, **W1_ON_CUDA)
    for log_eps in (None, -10.0):
        o, lse, start, cfg = run_poisoned(q, k, v, c, 0.1, log_eps, None)
        check_rows(q, k, v, c, 0.1, o, lse, start, cfg, log_eps)


def test_transposed_layout_and_output_strides():
    q, k, v, c = fox_inputs(2, 8, 4, 3000, 3000, 128, dtype=torch.bfloat16, strength=0.05, layout="bthd", **W1_ON_CUDA)
    assert not q.is_contiguous()
    o, lse, start, cfg = run_poisoned(q, k, v, c, 0.09, -10.0, None)
    check_rows(q, k, v, c, 0.09, o, lse, start, cfg, -10.0)
    o2, _ = forward(q, k, v, c, 0.09, -10.0, None)
    assert o2.stride() == q.stride()
    assert torch.equal(o2, o)


def test_fp32_inputs_run_in_tf32():
    q, k, v, c = fox_inputs(1, 4, 4, 2000, 2000, 64, dtype=torch.float32, strength=0.05, **W1_ON_CUDA)
    o, lse, start, cfg = run_poisoned(q, k, v, c, 0.125, -10.0, None)
    check_rows(q, k, v, c, 0.125, o, lse, start, cfg, -10.0)


@pytest.mark.parametrize("T", [4096, 32768])
def test_device_plan_equals_torch_plan(T):
    q, k, v, c = fox_inputs(1, 16, 16, T, T, 128, dtype=torch.bfloat16, n_global=4, seed=1, **W1_ON_CUDA)
    cfg = forward_config(q)
    u = torch.full((16,), (-10.0 - math.log(T) + 30) / 2, device="cuda")         # delta = -30
    start, end = compute_plan(q, k, c, 128 ** -0.5, -10.0, u, cfg.block_m, cfg.block_n)
    ref = make_plan(q, k, c, 128 ** -0.5, -10.0, u, cfg.block_m, cfg.block_n)
    assert torch.equal(start, ref.start) and torch.equal(end, ref.end)
    assert start.float().mean() > 0
    # Bound from the data: norms summed in another order may move delta by an ulp; allow a handful.
    start, end = compute_plan(q, k, c, 128 ** -0.5, -10.0, None, cfg.block_m, cfg.block_n)
    ref = make_plan(q, k, c, 128 ** -0.5, -10.0, None, cfg.block_m, cfg.block_n)
    assert (start != ref.start).sum().item() <= 2 and (end != ref.end).sum().item() <= 2


def test_more_than_2_31_elements_in_k_and_v():
    Hkv, Tk, D = 4, 2 ** 31 // (4 * 128) + 300, 128          # k and v hold just over 2^31 elements each
    q = torch.randn(1, 8, 64, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, Tk, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, Tk, D, device="cuda", dtype=torch.bfloat16)
    assert k.numel() > 2 ** 31
    c = torch.cumsum(torch.full((1, 8, Tk), -1e-3, device="cuda"), dim=-1)
    o, lse, start, cfg = run_poisoned(q, k, v, c, D ** -0.5, -10.0, None)
    # Check the last heads, whose k/v rows sit past 2^31 elements, against the reference.
    sl = slice(6, 8)
    qs, ks, vs = q[:, sl], k[:, 3:4].expand(1, 2, Tk, D), v[:, 3:4].expand(1, 2, Tk, D)
    rows = torch.tensor([0, 31, 63])
    ro, rl = rows_reference(qs, ks.contiguous(), vs.contiguous(), c[:, sl], D ** -0.5, rows,
                            start[:, sl], cfg.block_m, cfg.block_n)
    assert (o[:, sl][:, :, rows.cuda()].double() - ro).abs().max().item() <= TOL[torch.bfloat16]


@pytest.mark.parametrize("cfg", [FwdConfig(128, 128, 8, 3, True), FwdConfig(128, 64, 8, 3, True), FwdConfig(64, 64, 4, 3),
                                 FwdConfig(128, 128, 8, 3, True, False, True)],
                         ids=["tma128x128", "tma128x64", "plain64x64", "tma128x128-newest-first"])
@pytest.mark.parametrize("Tq,Tk,D", [(1000, 1500, 128), (4096, 4096, 128), (777, 777, 80), (300, 2000, 64)])
def test_configs_including_tensor_descriptors(cfg, Tq, Tk, D):
    q, k, v, c = fox_inputs(2, 8, 4, Tq, Tk, D, dtype=torch.bfloat16, strength=0.05, seed=Tq + D, **W1_ON_CUDA)
    for log_eps in (None, -10.0):
        o, lse, start, _ = run_poisoned(q, k, v, c, D ** -0.5, log_eps, None, cfg)
        check_rows(q, k, v, c, D ** -0.5, o, lse, start, cfg, log_eps)
