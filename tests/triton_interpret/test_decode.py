"""The Triton decode kernels (kernels/fox_triton/decode.py) under the interpreter, through
acp_compile.fox_decode: dense against the fp64 reference, the per-row eps bound with pruning, blocks
that the threshold must skip are really skipped (NaN planted in them is never read), GQA, Tq up to 16,
odd sizes and Dv != D."""
from __future__ import annotations

import math

import pytest
import torch

import acp_compile
from acp_compile.kernels.reference import fox_attention_reference

pytestmark = pytest.mark.skipif(not acp_compile.generation._triton_covers(
    torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16)), reason="needs the interpreter switch")


def cache(B=2, Hq=4, Hkv=2, Tq=1, Tk=203, D=32, Dv=None, rate=0.05, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, Dv or D, generator=g).to(dtype)
    rates = torch.full((Hq,), rate)
    rates[-1] = 1e-6                                                      # one global head
    c = torch.cumsum(-rates[None, :, None] * (0.5 + torch.rand(B, Hq, Tk, generator=g)), dim=-1)
    return q, k, v, c


def reference(q, k, v, c, scale=None):
    o, _ = fox_attention_reference(q.double(), k.double(), v.double(), c.double(), sm_scale=scale)
    return o


@pytest.mark.parametrize("Tq,Hq,Hkv,Tk,D,Dv", [
    (1, 4, 2, 203, 32, None), (1, 4, 4, 64, 16, None), (3, 6, 2, 150, 24, 40), (16, 2, 1, 97, 32, None),
    (5, 8, 2, 5, 16, None),
], ids=lambda x: str(x))
def test_dense_matches_the_fp64_reference(Tq, Hq, Hkv, Tk, D, Dv):
    q, k, v, c = cache(Tq=Tq, Hq=Hq, Hkv=Hkv, Tk=Tk, D=D, Dv=Dv, seed=Tk)
    got = acp_compile.fox_decode(q, k, v, c, log_eps=None, splits=3)
    want = reference(q, k, v, c)
    assert got.shape == want.shape and not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2e-3)      # TF32 dots


@pytest.mark.parametrize("splits", [None, 21])
def test_many_splits_merge_in_chunks(splits):
    """More splits than the combine kernel holds at once (16): the merge walks them in chunks."""
    q, k, v, c = cache(Tq=2, Hq=2, Hkv=1, Tk=1500, D=16, seed=6)
    got = acp_compile.fox_decode(q, k, v, c, log_eps=None, splits=splits)
    torch.testing.assert_close(got.double(), reference(q, k, v, c), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("splits", [1, 4])
def test_pruned_rows_keep_the_eps_bound(splits):
    q, k, v, c = cache(Tq=2, Tk=400, rate=0.5, seed=3)
    log_eps = -6.0
    got = acp_compile.fox_decode(q, k, v, c, log_eps=log_eps, splits=splits).double()
    want = reference(q, k, v, c)
    bound = 2 * math.exp(log_eps) * v.norm(dim=-1).max().item() + 2e-3
    assert (got - want).abs().max().item() <= bound


def test_skipped_blocks_are_never_read():
    """Steep decay: the old keys fall far below the threshold, so NaN planted there must not show."""
    q, k, v, c = cache(Hq=2, Hkv=1, Tk=512, rate=2.0, seed=4)
    c[:, -1] = c[:, 0]                                 # no global head here: every row decays steeply
    v[:, :, :256] = float("nan")
    k[:, :, :256] = float("nan")
    got = acp_compile.fox_decode(q, k, v, c, log_eps=-10.0, u_bound=10.0, splits=4)
    assert not torch.isnan(got).any()
    want = reference(q[..., :, :], k[:, :, 256:], v[:, :, 256:], c[..., 256:] )
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2e-3)


def test_a_global_head_keeps_every_block():
    q, k, v, c = cache(Hq=2, Hkv=1, Tk=300, rate=2.0, seed=5)            # head 1 is global
    v[:, :, :64] = float("nan")
    got = acp_compile.fox_decode(q, k, v, c, log_eps=-10.0)
    assert torch.isnan(got[:, 1]).all()                                   # the global head reads the NaN keys


def test_bad_arguments_say_what_is_expected():
    q, k, v, c = cache()
    with pytest.raises(ValueError, match="at most 16"):
        acp_compile.fox_decode(torch.randn(2, 4, 17, 32), k, v, c)
    with pytest.raises(ValueError, match="c must be"):
        acp_compile.fox_decode(q, k, v, c[:, :, 1:])
    with pytest.raises(ValueError, match="k_norm_max"):
        acp_compile.fox_decode(q, k, v, c, k_norm_max=torch.ones(3))


def test_an_old_kept_block_behind_skipped_ones():
    """c not monotone: a block far back rises to the query's c (its decay is 0) behind blocks far below the
    threshold. The walk computes every block down to the oldest kept one (the skippable ones between them too,
    which only lowers the dropped mass), so the result is the reference's within eps, and NaN planted in the
    blocks older than the kept one is never read."""
    q, k, v, c = cache(Hq=2, Hkv=1, Tk=640, rate=2.0, seed=7)
    c[:, -1] = c[:, 0]                                                    # both heads decay steeply
    c[:, :, 128:192] = c[:, :, -1:]                                       # keys 128..191: no decay at all
    v[:, :, :64] = float("nan")
    k[:, :, :64] = float("nan")
    got = acp_compile.fox_decode(q, k, v, c, log_eps=-10.0, u_bound=10.0, splits=2).double()
    assert not torch.isnan(got).any()
    want = reference(q, k[:, :, 64:], v[:, :, 64:], c[..., 64:])
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    far = reference(q, k[:, :, 192:], v[:, :, 192:], c[..., 192:])
    assert (far - want).abs().max() > 1e-2                                # the old block matters: it was kept
