"""kernels/blocks.py: per-block max/min/spread over the last axis against a loop over the real entries, for floats
and integers, partial last blocks and NaN (the integer padding once rounded to the wrong sign through F.pad)."""
import pytest
import torch

from acp_compile.kernels.blocks import block_max, block_min, block_spread


def _loop(x, block, fn):
    T = x.shape[-1]
    return torch.stack([fn(x[..., s:s + block], dim=-1) for s in range(0, T, block)], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int64])
@pytest.mark.parametrize("T,block", [(16, 4), (17, 4), (5, 8), (1, 1)], ids=lambda v: str(v))
def test_matches_a_loop_over_the_real_entries(dtype, T, block):
    g = torch.Generator().manual_seed(T * block)
    x = (torch.randn(2, 3, T, generator=g) * 1000).to(dtype)
    mx = _loop(x, block, lambda t, dim: t.amax(dim=dim))
    mn = _loop(x, block, lambda t, dim: t.amin(dim=dim))
    assert torch.equal(block_max(x, block), mx)
    assert torch.equal(block_min(x, block), mn)
    assert torch.equal(block_spread(x, block), mx - mn)


def test_nan_stays_nan():
    x = torch.tensor([[0.0, float("nan"), 1.0, 2.0, 3.0]])
    assert torch.isnan(block_max(x, 2)[0, 0]) and torch.isnan(block_spread(x, 2)[0, 0])
    assert block_max(x, 2)[0, 2] == 3.0 and block_min(x, 2)[0, 1] == 1.0
