"""Third-party FoX functions are traced as our op under backend "acp", and only there.

The routing tests use a stand-in with fla's signature whose result carries a marker (+100), so the output
says which code ran: the op (no marker) or the function's own code (marker). The fla-core tests run when
fla is installed (`pip install fla-core==0.6.0 einops`) and compare with fla's own reference.
"""
import math

import pytest
import torch
from torch._dynamo.utils import counters

from acp_compile.kernels.reference import fox_attention_reference
from acp_compile.third_party import KnownFox, register_fox_function, register_known_fox_functions

MARK = 100.0


def reference_bthd(q, k, v, g, scale=None):
    """fp64 reference for (B, T, H, D) inputs and a per-token log gate g (B, T, Hq)."""
    c = torch.cumsum(g.double(), dim=1).transpose(1, 2)
    o, _ = fox_attention_reference(q.transpose(1, 2).double(), k.transpose(1, 2).double(),
                                v.transpose(1, 2).double(), c, sm_scale=scale)
    return o.transpose(1, 2).to(q.dtype)


def varlen_reference_bthd(q, k, v, g, cu_seqlens, scale=None):
    """fla's varlen semantics (B = 1): each document q[:, a:b] attends only within itself, its gate's
    cumsum restarting at a."""
    cs = cu_seqlens.tolist()
    return torch.cat([reference_bthd(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], scale) for a, b in zip(cs, cs[1:])],
                     dim=1)


def stand_in_fox(q, k, v, g, scale=None, window_size=None, cu_seqlens=None):
    """Mimics fla.ops.forgetting_attn.parallel_forgetting_attn's signature; its own code adds MARK."""
    if cu_seqlens is not None:
        return varlen_reference_bthd(q, k, v, g, cu_seqlens, scale) + MARK
    return reference_bthd(q, k, v, g, scale) + MARK


def stand_in_authors(q, k, v, log_fgate, *, head_first=False, seq_start=None, sm_scale=None):
    """Mimics the FoX authors' forgetting_attention; its own code adds MARK."""
    if head_first:
        q, k, v, log_fgate = (t.transpose(1, 2) for t in (q, k, v, log_fgate))
    o = reference_bthd(q, k, v, log_fgate, sm_scale) + MARK
    return o.transpose(1, 2) if head_first else o


assert register_fox_function(stand_in_fox, KnownFox(
    "tests", "stand_in_fox", gate="g", scale="scale", unsupported=("window_size",), same_length=True,
    varlen="cu_seqlens"))
assert register_fox_function(stand_in_authors, KnownFox(
    "tests", "stand_in_authors", gate="log_fgate", scale="sm_scale", unsupported=(), same_length=False,
    left_padding="seq_start"))


def bthd_inputs(B=1, Tq=29, Tk=None, Hq=2, Hkv=None, D=16, seed=0, requires_grad=False):
    Tk, Hkv = Tk or Tq, Hkv or Hq
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, Hq, D, generator=gen)
    k, v = torch.randn(B, Tk, Hkv, D, generator=gen), torch.randn(B, Tk, Hkv, D, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(B, Tk, Hq, generator=gen) + 2.0)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, g)]


def compiled(fn, backend="acp", **options):
    torch._dynamo.reset()
    counters.clear()
    if backend == "acp":
        return torch.compile(fn, backend="acp", options={"inner_backend": "eager", "log_eps": None, **options})
    return torch.compile(fn, backend=backend)


def test_call_is_the_op_under_acp():
    q, k, v, g = bthd_inputs(seed=1)
    out = compiled(lambda q, k, v, g: stand_in_fox(q, k, v, g, scale=0.3) * 2.0)(q, k, v, g)
    assert counters["acp"]["fox_substituted"] == 1
    torch.testing.assert_close(out, 2.0 * reference_bthd(q, k, v, g, 0.3), atol=1e-5, rtol=1e-5)


def test_other_backends_run_the_original_code():
    q, k, v, g = bthd_inputs(seed=2)
    out = compiled(lambda q, k, v, g: stand_in_fox(q, k, v, g), backend="aot_eager")(q, k, v, g)
    assert counters["acp"]["fox_substituted"] == 0
    torch.testing.assert_close(out, reference_bthd(q, k, v, g) + MARK, atol=1e-5, rtol=1e-5)


def test_eager_calls_are_untouched():
    q, k, v, g = bthd_inputs(seed=3)
    torch.testing.assert_close(stand_in_fox(q, k, v, g), reference_bthd(q, k, v, g) + MARK)


@pytest.mark.parametrize("batch,kwargs", [(1, dict(window_size=8)), (2, dict(cu_seqlens=torch.tensor([0, 10, 29])))])
def test_unsupported_arguments_keep_the_original(batch, kwargs):
    q, k, v, g = bthd_inputs(B=batch, seed=4)
    out = compiled(lambda q, k, v, g: stand_in_fox(q, k, v, g, **kwargs))(q, k, v, g)
    assert counters["acp"]["fox_substituted"] == 0 and counters["acp"]["near_miss"] == 1
    want = stand_in_fox(q, k, v, g, **kwargs)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_fla_varlen_cu_seqlens_is_the_op_with_documents():
    """fla's cu_seqlens (B = 1, documents packed in one row): substituted by the op's cu_seqlens."""
    q, k, v, g = bthd_inputs(seed=4, requires_grad=True)
    cu = torch.tensor([0, 10, 10, 23, 29])
    out = compiled(lambda q, k, v, g: stand_in_fox(q, k, v, g, scale=0.3, cu_seqlens=cu))(q, k, v, g)
    assert counters["acp"]["fox_substituted"] == 1
    want = varlen_reference_bthd(q, k, v, g, cu, 0.3)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, g), do), torch.autograd.grad(want, (q, k, v, g), do)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_longer_keys_than_queries_keep_the_original_for_fla_conventions():
    q, k, v, g = bthd_inputs(Tq=7, Tk=29, seed=5)
    out = compiled(lambda q, k, v, g: stand_in_fox(q, k, v, g))(q, k, v, g)
    assert counters["acp"]["fox_substituted"] == 0
    torch.testing.assert_close(out, reference_bthd(q, k, v, g) + MARK, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_first", [False, True])
def test_authors_signature_gqa_cache_and_head_first(head_first):
    q, k, v, g = bthd_inputs(Tq=11, Tk=37, Hq=4, Hkv=2, D=32, seed=6)
    want = reference_bthd(q, k, v, g, 0.2)
    if head_first:
        q, k, v, g = (t.transpose(1, 2) for t in (q, k, v, g))
        want = want.transpose(1, 2)
    fn = compiled(lambda q, k, v, g: stand_in_authors(q, k, v, g, head_first=head_first, sm_scale=0.2))
    out = fn(q, k, v, g)
    assert counters["acp"]["fox_substituted"] == 1
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Tq", [29, 5])
def test_seq_start_left_padding_is_the_op_with_a_key_padding_mask(Tq):
    """The authors' seq_start (left-padding keys per row, batched generation) is the op's key padding
    mask: every query row that sees a key equals the reference of its own unpadded sequence; rows before
    the first token return 0."""
    q, k, v, g = bthd_inputs(B=3, Tq=Tq, Tk=29, seed=7)
    start = torch.tensor([0, 4, 11])
    out = compiled(lambda q, k, v, g, s: stand_in_authors(q, k, v, g, seq_start=s, sm_scale=0.25))(q, k, v, g, start)
    assert counters["acp"]["fox_substituted"] == 1
    off = 29 - Tq
    for b, s0 in enumerate(start.tolist()):
        want = reference_bthd(q[b:b + 1, max(s0 - off, 0):], k[b:b + 1, s0:], v[b:b + 1, s0:], g[b:b + 1, s0:], 0.25)
        got = out[b:b + 1, max(s0 - off, 0):]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert bool((out[b, :max(s0 - off, 0)] == 0).all())


def test_gradients_flow_through_the_substituted_op_with_pruning():
    q, k, v, g = bthd_inputs(Tq=40, seed=8, requires_grad=True)
    out = compiled(lambda q, k, v, g: stand_in_fox(q, k, v, g), log_eps=-10.0)(q, k, v, g)
    assert counters["acp"]["fox_substituted"] == 1
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, g))
    q64, k64, v64, g64 = (t.detach().double().requires_grad_() for t in (q, k, v, g))
    want = torch.autograd.grad(reference_bthd(q64, k64, v64, g64).square().sum(), (q64, k64, v64, g64))
    bound = 2 * math.exp(-10.0) * v.norm(dim=-1).max().item()
    torch.testing.assert_close(out, reference_bthd(q, k, v, g), atol=bound + 1e-5, rtol=0)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref, atol=2e-3, rtol=2e-3)


def test_registration_is_idempotent_and_skips_what_is_not_imported():
    import sys
    first = register_known_fox_functions()
    assert register_known_fox_functions() == first
    assert ("fla.ops.forgetting_attn.parallel_forgetting_attn" in first) == ("fla.ops.forgetting_attn" in sys.modules)
    assert register_fox_function(stand_in_fox, KnownFox("tests", "x", "g", "scale", (), True))


# ------------------------------------------------------------------------------- fla-core, when installed

@pytest.fixture(scope="module")
def fla():
    fla_attn = pytest.importorskip("fla.ops.forgetting_attn", reason="fla-core is not installed")
    assert "fla.ops.forgetting_attn.parallel_forgetting_attn" in register_known_fox_functions()
    return fla_attn


@pytest.mark.parametrize("Hkv,scale", [(2, None), (1, 0.25)])
def test_fla_parallel_forgetting_attn_becomes_the_op(fla, Hkv, scale):
    q, k, v, g = bthd_inputs(Tq=45, Hq=2, Hkv=Hkv, D=32, seed=9)
    out = compiled(lambda q, k, v, g: fla.parallel_forgetting_attn(q, k, v, g, scale=scale))(q, k, v, g)
    assert counters["acp"]["fox_substituted"] == 1
    torch.testing.assert_close(out, fla.naive_forgetting_attn(q, k, v, g, scale=scale), atol=1e-5, rtol=1e-5)
