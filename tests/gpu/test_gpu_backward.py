"""The Triton backward (kernels/fox_triton/backward*.py) on the GPU (skipped without CUDA).

Long sequences (up to 32k) are checked on sampled query rows (dq) and sampled key columns (dk, dv,
dc) against an fp32 reference computed in row chunks (never T x T at once); short ones against
fp64 autograd through the full reference, tightly with the kernels' own plan. Outputs are
NaN-poison (every torch.empty / empty_like in the launcher), so an unwritten tile fails.
"""
from __future__ import annotations

import math

import pytest
import torch

from acp_compile.kernels.fox_triton.backward import BackwardConfig, backward
from acp_compile.kernels.fox_triton.forward import forward
from acp_compile.kernels.fox_triton.sampled_reference import gated_inputs
from acp_compile.kernels.plan import kept_entries, make_plan
from acp_compile.kernels.reference import fox_attention_reference


def sample_indices(T: int, n: int = 40, seed: int = 0) -> torch.Tensor:
    """First, last, block edges and random positions, sorted."""
    g = torch.Generator().manual_seed(seed)
    fixed = {0, 1, T - 1, T - 2, T // 2} | {min(T - 1, e + d) for e in (31, 63, 127, 4095) for d in (0, 1)}
    return torch.tensor(sorted(fixed | set(torch.randint(0, T, (n,), generator=g).tolist())), dtype=torch.long)


def chunked_reference_grads(q, k, v, c, do, scale, rows, cols, chunk=1024):
    """fp32 reference of dense FoX attention, computed in query-row chunks.

    Returns dq[:, :, rows] (B, Hq, R, D), dk/dv[:, :, cols] (B, Hkv, J, D), dc[:, :, cols] (B, Hq, J).
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qf, dof, cf = q.float(), do.float(), c.float()
    kf = k.float().repeat_interleave(G, dim=1)                             # (B, Hq, Tk, D)
    vf = v.float().repeat_interleave(G, dim=1)
    rows, cols = rows.to(q.device), cols.to(q.device)
    kJ, vJ = kf[:, :, cols], vf[:, :, cols]                                # (B, Hq, J, D)
    dq_rows = torch.zeros(B, Hq, len(rows), D, device=q.device)
    dkJ = torch.zeros(B, Hq, len(cols), D, device=q.device)
    dvJ = torch.zeros_like(dkJ)
    dcJ = torch.zeros(B, Hq, len(cols), device=q.device)
    key_pos = torch.arange(Tk, device=q.device)
    for lo in range(0, Tq, chunk):
        hi = min(Tq, lo + chunk)
        pos = torch.arange(lo, hi, device=q.device) + (Tk - Tq)            # (R,)
        s = scale * (qf[:, :, lo:hi] @ kf.transpose(-1, -2))               # (B, Hq, R, Tk)
        s = s + cf[..., pos][..., :, None] - cf[..., None, :]
        s = s.masked_fill(key_pos[None, :] > pos[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        del s
        o = p @ vf
        delta = (dof[:, :, lo:hi] * o).sum(-1)                             # (B, Hq, R)
        pJ = p[..., cols]                                                  # (B, Hq, R, J)
        dpJ = dof[:, :, lo:hi] @ vJ.transpose(-1, -2)
        dsJ = pJ * (dpJ - delta[..., None])
        dvJ += pJ.transpose(-1, -2) @ dof[:, :, lo:hi]
        dkJ += scale * dsJ.transpose(-1, -2) @ qf[:, :, lo:hi]
        dcJ -= dsJ.sum(-2)
        here = (rows >= lo) & (rows < hi)
        if here.any():
            r = rows[here] - lo
            dp = dof[:, :, lo:hi][:, :, r] @ vf.transpose(-1, -2)          # (B, Hq, r, Tk)
            ds = p[:, :, r] * (dp - delta[:, :, r][..., None])
            dq_rows[:, :, here] = scale * ds @ kf
        del p, o
    dkJ = dkJ.view(B, Hkv, G, len(cols), D).sum(2)
    dvJ = dvJ.view(B, Hkv, G, len(cols), D).sum(2)
    return dq_rows, dkJ, dvJ, dcJ


def assert_close(got, want, max_tol, rms_tol, what):
    got, want = got.float(), want.float()
    err = (got - want)
    scale = want.abs().max().item()
    rel_rms = (err.norm() / want.norm().clamp_min(1e-30)).item()
    assert err.abs().max().item() <= max_tol * max(scale, 1e-6), f"{what}: max err {err.abs().max().item():.3e}, ref max {scale:.3e}"
    assert rel_rms <= rms_tol, f"{what}: relative rms error {rel_rms:.3e}"


LONG_CASES = [
    # B, Hq, Hkv, Tq, Tk, D, dtype, log_eps
    (1, 8, 4, 16384, 16384, 128, torch.bfloat16, -10.0),
    (1, 4, 4, 32768, 32768, 64, torch.float16, None),
    (1, 4, 1, 3000, 20000, 96, torch.bfloat16, -10.0),     # Tq < Tk, GQA 4, head dim not a power of two
]


@pytest.mark.parametrize("case", LONG_CASES, ids=lambda c: f"Hq{c[1]}Hkv{c[2]}Tq{c[3]}Tk{c[4]}D{c[5]}-{str(c[6])[6:]}-eps{c[7]}")
def test_long_sequences_on_sampled_rows_and_columns(case, poison):
    B, Hq, Hkv, Tq, Tk, D, dtype, log_eps = case
    q, k, v, c = gated_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, seed=Tk + D)
    do = torch.randn_like(q)
    scale = D ** -0.5
    o, lse = forward(q, k, v, c, scale, log_eps, None)
    dq, dk, dv, dc = backward(do, q, k, v, c, o, lse, scale, log_eps, None)
    for t in (dq, dk, dv, dc):
        assert not torch.isnan(t).any(), "an output was not written (NaN poison survived)"
    rows, cols = sample_indices(Tq), sample_indices(Tk, seed=1)
    want = chunked_reference_grads(q, k, v, c, do, scale, rows, cols)
    got = (dq[:, :, rows.cuda()], dk[:, :, cols.cuda()], dv[:, :, cols.cuda()], dc[:, :, cols.cuda()])
    max_tol, rms_tol = (6e-2, 2e-2) if dtype == torch.bfloat16 else (2e-2, 6e-3)
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert_close(g, w, max_tol, rms_tol, name)


SHORT_CASES = [
    # Hq, Hkv, T, D, dtype
    (2, 1, 300, 16, torch.bfloat16),
    (2, 2, 257, 80, torch.bfloat16),
    (4, 2, 300, 96, torch.float16),
    (2, 1, 200, 256, torch.bfloat16),
    (2, 2, 333, 128, torch.float32),
    (4, 4, 256, 64, torch.float16),
]


@pytest.mark.parametrize("case", SHORT_CASES, ids=lambda c: f"Hq{c[0]}Hkv{c[1]}T{c[2]}D{c[3]}-{str(c[4])[6:]}")
@pytest.mark.parametrize("log_eps", [None, -10.0])
def test_head_dims_and_dtypes_vs_fp64_autograd(case, log_eps, poison):
    Hq, Hkv, T, D, dtype = case
    q, k, v, c = gated_inputs(1, Hq, Hkv, T, T, D, dtype=dtype, local_decay=0.05, seed=D)
    do = torch.randn_like(q)
    scale = D ** -0.5
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, c)]
    ro, rl = fox_attention_reference(*ref, sm_scale=scale)
    want = torch.autograd.grad(ro, ref, do.double())
    dq, dk, dv, dc = backward(do, q, k, v, c, ro.to(dtype).detach(), rl.float().detach(), scale, log_eps, None)
    # fp32 runs its dots in TF32 (10 mantissa bits), like the forward
    tol = {torch.bfloat16: (3e-2, 1e-2), torch.float16: (6e-3, 2e-3), torch.float32: (1e-2, 5e-3)}[dtype]
    for g, w, name in zip((dq, dk, dv, dc), want, ("dq", "dk", "dv", "dc")):
        assert not torch.isnan(g).any(), f"{name} not written"
        assert_close(g, w, *tol, name)


def test_pruned_is_exact_for_the_kernels_own_plan(poison, monkeypatch):
    """fp32 with exact dots, equal partitions, a bound small enough that many tiles are skipped."""
    monkeypatch.setenv("ACP_TRITON_FP32_DOT", "ieee")
    cfg = BackwardConfig(64, 64, 64, 64, 4, 2, 4, 2)
    q, k, v, c = gated_inputs(2, 4, 2, 700, 1000, 64, dtype=torch.float32, local_decay=0.05, seed=9)
    do = torch.randn_like(q)
    scale, log_eps, u_bound = 0.125, -6.0, torch.tensor(1.0, device="cuda")
    plan = make_plan(q, k, c, scale, log_eps, u_bound, 64, 64)
    assert (plan.start > 0).any()
    keep = kept_entries(plan, 700, 1000)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, c)]
    ro, rl = fox_attention_reference(*ref, sm_scale=scale, keep=keep)
    want = torch.autograd.grad(ro, ref, do.double())
    got = backward(do, q, k, v, c, ro.float().detach(), rl.float().detach(), scale, log_eps, u_bound, cfg)
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert_close(g, w, 1e-4, 1e-5, name)


def test_two_runs_give_identical_bits():
    q, k, v, c = gated_inputs(2, 8, 2, 6000, 8192, 128, seed=4)
    do = torch.randn_like(q)
    o, lse = forward(q, k, v, c, 128 ** -0.5, -10.0, None)
    first = backward(do, q, k, v, c, o, lse, 128 ** -0.5, -10.0, None)
    second = backward(do, q, k, v, c, o, lse, 128 ** -0.5, -10.0, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_offsets_past_2_pow_31_elements():
    """k, v, dk, dv hold just over 2^31 elements; the last kv head's rows sit past 2^31."""
    Hq, Hkv, Tq, D = 8, 4, 64, 128
    Tk = 2 ** 31 // (Hkv * D) + 300
    g = torch.Generator(device="cuda").manual_seed(0)
    q, do = (torch.randn(1, Hq, Tq, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    k, v = (torch.randn(1, Hkv, Tk, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    assert k.numel() > 2 ** 31
    c = torch.cumsum(torch.full((1, Hq, Tk), -1e-3, device="cuda"), dim=-1)
    scale = D ** -0.5
    o, lse = forward(q, k, v, c, scale, None, None)
    dq, dk, dv, dc = backward(do, q, k, v, c, o, lse, scale, None, None)
    rows = torch.tensor([0, 1, 31, 32, 62, 63])
    cols = torch.cat([torch.tensor([0, 12345, Tk // 2]), torch.arange(Tk - 200, Tk)])
    want = chunked_reference_grads(q[:, 6:8], k[:, 3:4], v[:, 3:4], c[:, 6:8], do[:, 6:8], scale, rows, cols)
    cc = cols.cuda()
    got = (dq[:, 6:8][:, :, rows.cuda()], dk[:, 3:4][:, :, cc], dv[:, 3:4][:, :, cc], dc[:, 6:8][:, :, cc])
    for gt, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert_close(gt, w, 6e-2, 2e-2, name)
