"""Padded and packed batches through the pass on the GPU (issue #12 items 2 and 3): the rewritten program (inductor,
Triton kernels, dynamic=True) equals eager, rows with no visible key included, and its forward makes no host sync."""
import os
import sys

import pytest
import torch

import acp_compile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "patterns"))
import segment_mask_cases as sc  # noqa: E402

B, H, D = 2, 4, 64


def _data(name, T, n, device):
    g = torch.Generator().manual_seed(n)
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[0, :5] = False                                       # left padding: rows 0..4 of batch 0 see nothing
    pad[1] = torch.rand(T, generator=g) > 0.2
    starts = torch.rand(B, T, generator=g) < 0.02
    starts[:, 0] = True
    doc = torch.cumsum(starts.long(), -1)
    doc[:, T // 2:] = torch.randint(0, 4, (B, T - T // 2), generator=g)   # ids that come back: equality, not runs
    out = {"doc_and_pad": (doc, pad), "doc_eq": doc}.get(name, pad)
    return tuple(x.to(device) for x in out) if isinstance(out, tuple) else out.to(device)


def test_padded_batch_on_gpu_is_left_alone_until_verified():
    """Without ACP_SEGMENT_REWRITE_ON_GPU the padded/packed rewrite refuses CUDA sites (a near-miss), so the
    compiled program is eager's."""
    fn = sc.pad_and_causal
    torch.compiler.reset()
    acp_compile.clear_compilations()
    compiled = torch.compile(fn, backend="acp", options={"log_eps": None})
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, 128, D, generator=g).cuda() for _ in range(3))
    fg = (torch.randn(B, H, 128, generator=g) + 3.0).cuda()
    data = _data("pad_and_causal", 128, 0, "cuda")
    got, want = compiled(q, k, v, fg, data), fn(q, k, v, fg, data)
    assert sum(len(r.sites) for r in acp_compile.compilations()) == 0
    assert any("not yet verified on GPUs" in str(m) for r in acp_compile.compilations() for m in r.near_misses)
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("name", ["pad_and_causal", "pad_finfo_min", "pad_safe_softmax", "doc_eq", "doc_and_pad"])
def test_padded_and_packed_on_gpu(name, monkeypatch):
    monkeypatch.setenv("ACP_SEGMENT_REWRITE_ON_GPU", "1")      # the rewrite is off on GPUs until this passes
    fn = getattr(sc, name)
    torch.compiler.reset()
    acp_compile.clear_compilations()
    compiled = torch.compile(fn, backend="acp", options={"log_eps": None}, dynamic=True)
    for n, T in enumerate((256, 384)):
        g = torch.Generator().manual_seed(10 + n)
        q, k, v = (torch.randn(B, H, T, D, generator=g).cuda() for _ in range(3))
        fg = (torch.randn(B, H, T, generator=g) + 3.0).cuda()
        data = _data(name, T, n, "cuda")
        got = compiled(q, k, v, fg, data)
        want = fn(q, k, v, fg, data)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        torch.testing.assert_close(got.nan_to_num(0), want.nan_to_num(0), rtol=2e-2, atol=2e-2)   # TF32 dots
    assert sum(len(r.sites) for r in acp_compile.compilations()) == 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compiled(q, k, v, fg, data)                         # no host sync in the rewritten forward
    finally:
        torch.cuda.set_sync_debug_mode("default")
