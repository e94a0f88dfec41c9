"""The online certificate in the Triton kernels (DESIGN.md 1.1), on CPU through the Triton interpreter.

The forward decides per query block while it runs and records where it stopped; truth is the fp64
reference: (1) o and lse equal the attention over exactly the recorded kept set, (2) the dense mass each
row dropped is at most eps (fp32/fp16 inputs: up to the rounding of the visited mass), (3) the backward,
given the recorded keep_from, equals the fp64 gradient of exactly that set, in tile partitions other than
the forward's. o, lse, start and the gradients are NaN-poisoned (start with -1) so an unwritten entry fails.
Odd sizes, GQA, Tq < Tk, non-monotone c and hard resets (the exact-c path of the kernel).
"""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile  # noqa: F401  (registers torch.ops.acp)
from acp_compile.kernels.certificate import cert_stats, keep_from_rows
from acp_compile.kernels.fox_triton.backward import BackwardConfig, backward
from acp_compile.kernels.fox_triton.configs import FwdConfig
from acp_compile.kernels.fox_triton.forward import launch_certified
from acp_compile.kernels.reference import fox_attention_reference, recorded_entries, row_dropped_mass
from helpers import default_scale, fox_inputs

SMALL = FwdConfig(32, 16, 4, 1)
TALL = FwdConfig(16, 32, 4, 1)
TMA = FwdConfig(32, 16, 4, 1, True)     # tensor descriptors (the Hopper D = 128 rows use them)
CHUNK = FwdConfig(32, 16, 4, 1, cert_chunk=2)     # stop test after every second key block
MIXED = BackwardConfig(16, 32, 32, 16, 4, 1, 4, 1, 32)     # neither kernel's partition is the forward's
TOL = {torch.float32: 3e-5, torch.float16: 4e-3}

CASES = [
    # B, Hq, Hkv, Tq, Tk, D, gate, resets
    (1, 2, 1, 100, 100, 16, "monotone", False),
    (2, 4, 2, 57, 131, 24, "walk", False),        # GQA, Tq < Tk, non-monotone c, odd sizes
    (1, 2, 2, 97, 97, 32, "monotone", True),      # hard resets: the exact-c path
    (1, 3, 1, 1, 77, 16, "monotone", False),      # one decode row, group 3
]


def inputs(B, Hq, Hkv, Tq, Tk, D, gate, resets, dtype, seed=0):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, gate=gate, strength=1.0, qk_scale=1.2, seed=seed)
    if resets:
        log_f = torch.diff(c, dim=-1, prepend=torch.zeros(B, Hq, 1))
        log_f[..., Tk // 3] = -1e4
        log_f[..., 2 * Tk // 3] = -40.0
        c = torch.cumsum(log_f, dim=-1)
    return q, k, v, c


def run_forward(q, k, v, c, log_eps, cfg):
    scale = default_scale(q.shape[-1])
    B, Hq, Tq, _ = q.shape
    Mq = -(-Tq // cfg.block_m)
    o = torch.full_like(q, float("nan"))
    lse = torch.full((B, Hq, Tq), float("nan"))
    start = torch.full((B, Hq, Mq), -1, dtype=torch.int32)
    stats = cert_stats(q, k, c, scale, cfg.block_n)
    o, lse, start = launch_certified(q, k, v, c, scale, log_eps, stats, cfg, o=o, lse=lse, start=start)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any() and (start >= 0).all(), "unwritten outputs"
    return scale, o, lse, keep_from_rows(start, Tq, cfg.block_m, cfg.block_n)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("cfg", [SMALL, TALL, TMA, CHUNK], ids=["32x16", "16x32", "tma", "chunk2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda s: "B{}Hq{}Hkv{}Tq{}Tk{}D{}-{}-{}".format(*s))
def test_forward_is_the_recorded_set_and_drops_at_most_eps(case, dtype, cfg):
    q, k, v, c = inputs(*case, dtype)
    log_eps = -6.0
    scale, o, lse, keep_from = run_forward(q, k, v, c, log_eps, cfg)
    keep = recorded_entries(keep_from, k.shape[2])
    ro, rl = fox_attention_reference(q, k, v, c, scale, keep=keep)
    assert (o.double() - ro).abs().max().item() <= TOL[dtype] * max(1.0, ro.abs().max().item())
    assert (lse.double() - rl).abs().max().item() <= TOL[dtype] * max(1.0, rl.abs().max().item())
    dropped = row_dropped_mass(q.double(), k.double(), c.double(), keep, scale)
    assert dropped.max().item() <= math.exp(log_eps) * 1.01
    if case[3] >= 57:
        assert (keep_from > 0).any(), "the case must prune"


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda s: "B{}Hq{}Hkv{}Tq{}Tk{}D{}-{}-{}".format(*s))
def test_backward_computes_exactly_the_recorded_set_in_other_partitions(case, dtype):
    q, k, v, c = inputs(*case, dtype)
    scale, o, lse, keep_from = run_forward(q, k, v, c, -6.0, SMALL)
    do = torch.randn_like(q)
    got = backward(do, q, k, v, c, o, lse, scale, -6.0, None, MIXED, keep_from=keep_from)
    for t in got:
        assert not torch.isnan(t).any(), "an output was not written (NaN poison survived)"
    leaves = [t.double().requires_grad_() for t in (q, k, v, c)]
    ro, _ = fox_attention_reference(*leaves, sm_scale=scale, keep=recorded_entries(keep_from, k.shape[2]))
    want = torch.autograd.grad(ro, leaves, do.double())
    tol = 3e-4 if dtype == torch.float32 else 3e-2
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        err = (g.double() - w).abs().max().item()
        assert err <= tol * max(1.0, w.abs().max().item()), f"{name}: {err:.3g}"


@pytest.mark.usefixtures("poison")
def test_op_default_is_online_and_autograd_uses_the_recorded_set():
    q, k, v, c = inputs(1, 4, 2, 70, 90, 32, "walk", False, torch.float32, seed=4)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, c)]
    o, lse, u, keep_from = torch.ops.acp.fox_attention_fwd(*leaves, None, -6.0, None)
    assert (u == 0).all() and (keep_from > 0).any()
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, c)]
    ro, _ = fox_attention_reference(*ref_leaves, keep=recorded_entries(keep_from, 90))
    want = torch.autograd.grad(ro, ref_leaves, do.double())
    for g, w in zip(grads, want):
        assert (g.double() - w).abs().max().item() <= 3e-4 * max(1.0, w.abs().max().item())


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("cfg", [MIXED, BackwardConfig(16, 16, 16, 16, 4, 1, 4, 1, 16)], ids=["mixed", "16x16"])
@pytest.mark.parametrize("case", [(1, 2, 1, 75, 75, 16), (2, 4, 2, 41, 99, 24)],
                         ids=lambda s: "B{}Hq{}Hkv{}Tq{}Tk{}D{}".format(*s))
def test_backward_exact_for_any_per_row_kept_set(case, cfg):
    """keep_from drawn per row anywhere in [0, p_i] (not constant over any block, boundaries inside tiles
    and on their edges): the per-entry mask runs only on the tiles the boundary crosses
    (recorded.whole_from), and the gradient is still that of exactly this set."""
    B, Hq, Hkv, Tq, Tk, D = case
    q, k, v, c = inputs(B, Hq, Hkv, Tq, Tk, D, "walk", False, torch.float32, seed=7)
    g = torch.Generator().manual_seed(3)
    pos = torch.arange(Tk - Tq, Tk)
    keep_from = (torch.rand(B, Hq, Tq, generator=g) * (pos + 1)).floor().to(torch.int32)
    keep_from[..., ::5] = (keep_from[..., ::5] // 16) * 16                 # some on tile edges
    scale = default_scale(D)
    keep = recorded_entries(keep_from, Tk)
    o, lse = fox_attention_reference(*(t.double() for t in (q, k, v, c)), sm_scale=scale, keep=keep)
    do = torch.randn(B, Hq, Tq, D, generator=g)
    got = backward(do, q, k, v, c, o.float(), lse.float(), scale, -6.0, None, cfg, keep_from=keep_from)
    for t in got:
        assert not torch.isnan(t).any(), "an output was not written (NaN poison survived)"
    leaves = [t.double().requires_grad_() for t in (q, k, v, c)]
    ro, _ = fox_attention_reference(*leaves, sm_scale=scale, keep=keep)
    want = torch.autograd.grad(ro, leaves, do.double())
    for gt, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        err = (gt.double() - w).abs().max().item()
        assert err <= 3e-4 * max(1.0, w.abs().max().item()), f"{name}: {err:.3g}"


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("case", CASES[:3], ids=lambda s: "B{}Hq{}Hkv{}Tq{}Tk{}D{}-{}-{}".format(*s))
def test_backward_of_a_nested_partition_runs_without_entry_masks_and_is_exact(case):
    """Backward tiles that nest in the forward's (16 x 16 in 32 x 16): the recorded set is aligned, the
    dk/dv launch without the per-entry mask runs (recorded_aligned = 1), and the gradient is still that
    of exactly the recorded set."""
    from acp_compile.kernels.recorded import recorded_aligned
    nested = BackwardConfig(16, 16, 32, 16, 4, 1, 4, 1, 16)
    q, k, v, c = inputs(*case, torch.float32)
    scale, o, lse, keep_from = run_forward(q, k, v, c, -6.0, SMALL)
    assert recorded_aligned(keep_from, nested.kv_block_m, nested.kv_block_n).item() == 1
    assert (keep_from > 0).any(), "the case must prune"
    do = torch.randn_like(q)
    got = backward(do, q, k, v, c, o, lse, scale, -6.0, None, nested, keep_from=keep_from)
    leaves = [t.double().requires_grad_() for t in (q, k, v, c)]
    ro, _ = fox_attention_reference(*leaves, sm_scale=scale, keep=recorded_entries(keep_from, k.shape[2]))
    want = torch.autograd.grad(ro, leaves, do.double())
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        assert not torch.isnan(g).any(), f"{name} not written"
        err = (g.double() - w).abs().max().item()
        assert err <= 3e-4 * max(1.0, w.abs().max().item()), f"{name}: {err:.3g}"
