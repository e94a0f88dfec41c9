"""Padded and packed batches through the pass on the GPU (issue #12 items 2 and 3): every program the CPU tests
rewrite (tests/patterns/test_padding_masks.py) is rewritten on CUDA too, under inductor with the Triton kernels and
dynamic=True, and gives eager's output and gradients, rows with no visible key included (NaN, the mean of v, or
0, as eager); the look-alikes stay eager's; the rewritten forward makes no host sync.

(Session 5's version of this test failed on the H200 because the case programs built their causal masks on the
CPU: eager fails the same way. The programs now build them on q's device.)"""
import os
import sys

import pytest
import torch

import acp_compile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "patterns"))
import segment_mask_cases as sc  # noqa: E402
import test_padding_masks as cpu_cases  # noqa: E402

B, H, D = 2, 4, 64
LENGTHS = (256, 383)


def _inputs(name, T, n, Hkv=H):
    g = torch.Generator().manual_seed(10 * n + T)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = (torch.randn(B, Hkv, T, D, generator=g) for _ in range(2))
    fg = torch.randn(B, H, T, generator=g) + torch.tensor([3.0, -1.0, 6.0, 0.0])[:, None]
    data = cpu_cases.DATA[name](T, n)
    data = tuple(x.cuda() for x in data) if isinstance(data, tuple) else data.cuda()
    return [x.cuda() for x in (q, k, v, fg)], data


def _call(fn, args, data):
    args = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*args, data)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).cuda()
    grads = torch.autograd.grad((out.nan_to_num(0.0) * w).sum(), args)
    return out, grads


def _same(a, b, what, tol):
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb), f"{what}: NaN at other places ({int(na.sum())} against eager's {int(nb.sum())})"
    err = (a.masked_fill(na, 0) - b.masked_fill(nb, 0)).float()
    ref = b.masked_fill(nb, 0).float()
    rel = float((err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-6)).detach())
    assert rel < tol, f"{what}: relative RMS error {rel:.2e} (tolerance {tol})"


@pytest.mark.parametrize("name", cpu_cases.REWRITTEN)
def test_padded_and_packed_on_gpu(name):
    fn = getattr(sc, name)
    torch.compiler.reset()
    acp_compile.clear_compilations()
    compiled = torch.compile(fn, backend="acp", options={"log_eps": None}, dynamic=True)
    Hkv = 2 if name == "pad_gqa_repeat" else H
    for n, T in enumerate(LENGTHS):
        args, data = _inputs(name, T, n, Hkv)
        got, got_g = _call(compiled, args, data)
        want, want_g = _call(fn, args, data)
        _same(got, want, f"{name} output at T={T}", 1e-2)      # TF32 dots in eager and in the kernels
        for i, (a, b) in enumerate(zip(got_g, want_g)):
            _same(a, b, f"{name} gradient of argument {i} at T={T}", 2e-2)
    records = acp_compile.compilations()
    assert sum(len(r.sites) for r in records) == 1, [str(m) for r in records for m in r.near_misses]
    with torch.no_grad():
        compiled(*args, data)                              # compiles the inference graph (its proofs read masks)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            compiled(*args, data)                          # no host sync in the rewritten forward
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", sorted(cpu_cases.LEFT_ALONE))
def test_look_alikes_left_alone_on_gpu(name):
    fn = getattr(sc, name)
    torch.compiler.reset()
    acp_compile.clear_compilations()
    compiled = torch.compile(fn, backend="acp", options={"log_eps": None})
    args, _ = _inputs("pad_and_causal", 128, 0)
    T = 128
    data = cpu_cases._doc(T, 0, contiguous=False) if name.startswith("doc") else \
        cpu_cases._pad(T, 0, left=False, dtype=torch.int64 if name == "pad_hf_additive" else torch.bool)
    data = data.cuda()
    got, want = compiled(*args, data), fn(*args, data)
    _same(got, want, name, 1e-3)
    assert sum(len(r.sites) for r in acp_compile.compilations()) == 0, f"{name} was rewritten"
