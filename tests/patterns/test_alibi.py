"""ALiBi, static linear decays and one-sided key biases (issue #12 item 1): every family in
alibi_cases.py is rewritten under dynamic=None and dynamic=True and served at several lengths after the
first compile, with output and gradients (q, k, v and learnable slopes) equal to eager; each look-alike
is left alone with a near-miss that says why. Oracle: acp_compile.compilations() and eager. Numerics:
bf16 against an fp64 eager reference, pruning on at a length where steep heads skip tiles, and c of a
few thousand nats through the op."""
import math

import pytest
import torch

import acp_compile
import alibi_cases as ac

REWRITTEN = ["TwoSided", "NegAbsDistance", "ClampedInactive", "SlopesInGraph", "BiasBuffer", "FutureMaskWithAlibi",
             "KeyOnly", "MptStyle", "MptBuffer", "BloomBaddbmm", "BloomHF", "SdpaMaskWithAlibi", "LearnableTwoSided",
             "LearnableKeyOnly", "SeparateSides", "FoxPlusKeyAlibi"]
DYNAMIC_TRUE = ["TwoSided", "BiasBuffer", "FutureMaskWithAlibi", "KeyOnly", "BloomBaddbmm", "BloomHF", "LearnableTwoSided"]
ROW_SHIFT = "not c_i - c_j on the causal region"
LEFT_ALONE = {
    "NotCausal": "not causal",
    "QueryOnly": "only on the query",
    "SlopePerQueryRow": "varies over the query or key positions",
    "ProductOfPositions": "varies over the query or key positions",
    "LogDistance": ROW_SHIFT,
    "BucketedDistance": ROW_SHIFT,
    "ClampActive": ROW_SHIFT,
    "DifferentSideSlopes": "sides differ",
    "KeyPaddingAsBias": "per call",
    "KeyBiasFromInput": "per call",
    "HugeKeyBias": "masking fill",
}
LENGTHS = (24, 40, 17)          # the first compiles; the others are served after it (dynamic=None recompiles once)


def make_inputs(T, seed=0, dtype=torch.float32, scale=1.0, B=2, D=8, pad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, ac.H, T, D, generator=g) for _ in range(3))
    out = [(q * scale).to(dtype), (k * scale).to(dtype), v.to(dtype)]
    out = [x.requires_grad_() for x in out]
    if pad:
        out.append(torch.ones(B, T, dtype=torch.bool))
    return out


def compile_module(m, dynamic, **options):
    torch.compiler.reset()
    acp_compile.clear_compilations()
    opts = {"inner_backend": "aot_eager", "log_eps": None, **options}
    return torch.compile(m, backend="acp", options=opts, dynamic=dynamic)


def outputs_and_grads(m, args):
    out = m(*args)
    params = [p for p in m.parameters()]
    diff = [a for a in args if a.requires_grad] + params
    grads = torch.autograd.grad(out.float().square().sum(), diff)
    return out, grads


def rewrites():
    records = acp_compile.compilations()
    return sum(len(r.sites) for r in records), [m for r in records for m in r.near_misses]


def run_lengths(name, dynamic, lengths=LENGTHS):
    """Compiles once, calls at every length; the report counts the calls the rewritten op served (a call
    refused by a guard runs the original graph and is not counted)."""
    m = getattr(ac, name)()
    compiled = compile_module(m, dynamic, report=True)
    acp_compile.report.reset()
    for n, T in enumerate(lengths):
        args = make_inputs(T, seed=n)
        got, got_grads = outputs_and_grads(compiled, args)
        want, want_grads = outputs_and_grads(m, [a.detach().clone().requires_grad_() for a in args])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} output at T={T}")
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{name} gradients at T={T}")
    served = sum(r.calls for r in acp_compile.report.sites())
    assert served == len(lengths), f"{name}: the op served {served} of {len(lengths)} calls"
    return rewrites()


@pytest.mark.parametrize("name", REWRITTEN)
def test_family_is_rewritten_at_every_length_dynamic_none(name):
    sites, misses = run_lengths(name, dynamic=None)
    assert sites >= 1 and not misses, (sites, [str(m) for m in misses])


@pytest.mark.parametrize("name", DYNAMIC_TRUE)
def test_family_is_rewritten_at_every_length_dynamic_true(name):
    sites, misses = run_lengths(name, dynamic=True)
    assert sites == 1 and not misses, (sites, [str(m) for m in misses])


@pytest.mark.parametrize("name", sorted(LEFT_ALONE))
def test_lookalike_is_left_alone_with_a_reason(name):
    m = getattr(ac, name)()
    pad = "pad" in type(m).forward.__code__.co_varnames
    args = make_inputs(24, pad=pad)
    got = compile_module(m, dynamic=False)(*args)
    sites, misses = rewrites()
    assert sites == 0 and misses, (sites, misses)
    assert any(LEFT_ALONE[name] in m.reason for m in misses), [m.reason for m in misses]
    torch.testing.assert_close(got, m(*args), rtol=1e-6, atol=1e-6)


def test_slope_gradient_flows_through_c():
    """The emitted c is computed from the slopes parameter in the graph: its gradient is the op's dc."""
    m = ac.LearnableTwoSided()
    compiled = compile_module(m, dynamic=False)
    args = make_inputs(32)
    out = compiled(*args)
    out.square().sum().backward()
    got = m.slopes.grad.clone()
    assert rewrites()[0] == 1
    m.slopes.grad = None
    m(*[a.detach() for a in args]).square().sum().backward()
    assert got.abs().max() > 0
    torch.testing.assert_close(got, m.slopes.grad, rtol=1e-4, atol=1e-5)


def test_a_clamp_that_acts_at_longer_lengths_is_refused_there():
    """(j - i).clamp(min=-window) is c_i - c_j while T <= window: the guard re-checks each new length and a
    call where the clamp acts runs the unrewritten graph (equal to eager)."""
    m = ac.ClampedWindowAttribute()
    compiled = compile_module(m, dynamic=True, report=True)
    acp_compile.report.reset()
    for T in (12, 32, 16):
        args = make_inputs(T, seed=T)
        torch.testing.assert_close(compiled(*args), m(*args), rtol=1e-4, atol=1e-5)
    assert rewrites()[0] == 1
    assert [r.calls for r in acp_compile.report.sites()] == [2]          # T = 32 ran the original graph


def test_a_bias_buffer_edited_in_place_is_checked_again():
    m = ac.BiasBuffer()
    compiled = compile_module(m, dynamic=None, report=True)
    acp_compile.report.reset()
    args = make_inputs(24)
    torch.testing.assert_close(compiled(*args), m(*args), rtol=1e-4, atol=1e-5)
    assert rewrites()[0] == 1
    with torch.no_grad():                          # now a log-distance bias: no longer c_i - c_j
        pos = torch.arange(m.max_len, dtype=torch.float32)
        m.alibi.copy_(-torch.log1p((pos[:, None] - pos[None, :]).abs()).expand_as(m.alibi))
    torch.testing.assert_close(compiled(*args), m(*args), rtol=1e-4, atol=1e-5)
    assert [r.calls for r in acp_compile.report.sites()] == [1]          # the edited buffer: the original graph


@pytest.mark.parametrize("name", ["TwoSided", "KeyOnly", "BloomBaddbmm", "BloomHF", "MptStyle"])
def test_bf16_is_as_close_to_fp64_as_eager_bf16(name):
    """bf16 compiled vs bf16 eager, both against fp64 eager: the rewrite is at least about as accurate
    (BLOOM's eager rounds slope * j to bf16 inside the logits; the op keeps c in fp32)."""
    m = getattr(ac, name)()
    compiled = compile_module(m, dynamic=False, inner_backend="eager")
    args = make_inputs(64, dtype=torch.bfloat16)
    got, got_grads = outputs_and_grads(compiled, args)
    eager, eager_grads = outputs_and_grads(m, [a.detach().clone().requires_grad_() for a in args])
    m64 = getattr(ac, name)().double()
    ref, ref_grads = outputs_and_grads(m64, [a.detach().double().requires_grad_() for a in args])
    assert rewrites()[0] == 1
    for a, e, r in zip((got, *got_grads), (eager, *eager_grads), (ref, *ref_grads)):
        err_got = (a.double() - r).abs().max().item()
        err_eager = (e.double() - r).abs().max().item()
        assert err_got <= 2 * err_eager + 2e-2 * max(1.0, r.abs().max().item()), (err_got, err_eager)


def test_pruning_on_stays_within_the_eps_bound():
    """Steep heads (slopes 1/4 ... 1/256) at T = 512 with small logits: ACP skips tiles; the output
    stays within 2 eps max|v| of eager (plus fp32 rounding)."""
    m = ac.KeyOnly()
    log_eps = -10.0
    compiled = compile_module(m, dynamic=False, log_eps=log_eps, report=True)
    acp_compile.report.reset()
    args = [a.detach() for a in make_inputs(512, B=1, D=16, scale=0.3)]
    got = compiled(*args)
    want = m(*args)
    (rec,) = acp_compile.report.sites()
    assert rec.skipped.max() > 0.2, rec.skipped                  # the steepest head skips tiles
    bound = 2 * math.exp(log_eps) * args[2].abs().max().item()
    assert (got - want).abs().max().item() <= bound + 1e-5


def test_large_c_through_the_op_matches_eager_alibi():
    """c = -slope * t reaches slope * T = 1024 nats: the op forms c_i - c_j per entry; forward and gradients
    against fp64 eager ALiBi."""
    T, D = 2048, 16
    slopes = torch.tensor([0.5, 2.0 ** -6])
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, T, D, generator=g, requires_grad=True) for _ in range(3))
    c = (-slopes[:, None] * torch.arange(T, dtype=torch.float32))[None].requires_grad_()
    o = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, None, None)[0]
    pos = torch.arange(T, dtype=torch.float64)
    bias = slopes.double()[:, None, None] * (pos[None, :] - pos[:, None])
    s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(D) + bias
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = s.softmax(-1) @ v.double()
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-4)
    go = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), go)
    want = torch.autograd.grad(ref, (q, k, v), go.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-3)
