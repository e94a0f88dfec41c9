"""The online certificate on the GPU (DESIGN.md 1.1): W1-like bf16 heads up to T = 16k.

Checks: outputs fully written (NaN poison); on sampled rows the output equals the exact attention over
the recorded kept set (keep_from) and each sampled row dropped at most eps of its dense mass; the
online rule prunes at least as much as the paper rule on W1's data; the Triton backward with the
recorded set equals the blocked backward with the same set; keep_from is reproducible. Each test < 20 s.
"""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile  # noqa: F401  (registers torch.ops.acp)
from acp_compile.kernels import blocked
from acp_compile.kernels.fox_triton.configs import forward_config
from acp_compile.kernels.fox_triton.plan import compute_plan
from acp_compile.kernels.plan import recorded_plan
from helpers import W1_ON_CUDA, fox_inputs
from sampled_reference import rows_reference, sample_rows


@pytest.mark.parametrize("T", [4096, 16384])
def test_online_forward_w1_recorded_set_eps_and_pruning(T):
    B = max(1, 8192 // T)
    q, k, v, c = fox_inputs(B, 8, 8, T, T, 128, dtype=torch.bfloat16, n_global=2, seed=T, **W1_ON_CUDA)
    scale, log_eps = 128 ** -0.5, -10.0
    o, lse, u, keep_from = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None, certificate="online")
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    rows = sample_rows(T)
    ro, rl = rows_reference(q, k, v, c, scale, rows, keep_from, 1, 1)     # keep_from as per-row starts
    _, rl_dense = rows_reference(q, k, v, c, scale, rows)
    got_o = o[:, :, rows.to(q.device)].double()
    assert (got_o - ro).abs().max().item() <= 2.5e-2
    dropped = 1 - torch.exp(rl - rl_dense)                                  # per sampled row
    assert dropped.max().item() <= math.exp(log_eps) * 1.1
    cfg = forward_config(q)
    start_paper, _ = compute_plan(q, k, c, scale, log_eps, None, cfg.block_m, cfg.block_n)
    start_online = keep_from[..., ::cfg.block_m].long() // cfg.block_n
    assert start_online.float().mean() >= start_paper.float().mean()
    assert start_online[:, :6].float().mean() > 0, "W1's local heads must prune"
    again = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None, certificate="online")[3]
    assert torch.equal(again, keep_from), "the recorded set must be reproducible"


def test_online_backward_equals_blocked_backward_on_the_recorded_set():
    q, k, v, c = fox_inputs(2, 4, 2, 1500, 2048, 64, dtype=torch.float32, gate="walk", strength=0.3, seed=1,
                            device="cuda")
    scale = 64 ** -0.5
    o, lse, _, keep_from = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -8.0, None, certificate="online")
    assert (keep_from > 0).any()
    do = torch.randn_like(o)
    got = torch.ops.acp.fox_attention_bwd(do, q, k, v, c, o, lse, None, -8.0, None, keep_from=keep_from)
    plan = recorded_plan(keep_from, 2048, blocked.BLOCK_M, blocked.BLOCK_N)
    want = blocked.backward(do, q, k, v, c, o, lse, scale, plan, keep_from=keep_from)
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        err = (g.double() - w.double()).abs().max().item()
        assert err <= 5e-3 * max(1.0, w.abs().max().item()), f"{name}: {err:.3g}"


def test_online_training_step_bf16_16k_runs_and_is_finite():
    q, k, v, c = fox_inputs(1, 8, 8, 16384, 16384, 128, dtype=torch.bfloat16, n_global=2, seed=2, **W1_ON_CUDA)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, c)]
    o = torch.ops.acp.fox_attention_fwd(*leaves, None, -10.0, None, certificate="online")[0]
    o.backward(torch.randn_like(o))
    for t in leaves:
        assert torch.isfinite(t.grad).all()
