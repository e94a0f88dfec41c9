"""The FoX authors' (and fla's) fused helper layers are traced as plain PyTorch under backend "acp", and only there.

Their Triton kernels do not run on CPU, so the tests put stand-ins with the same signatures into sys.modules
under the real module paths of the authors' repository (forgetting_transformer.model.forgetting_transformer.*)
and register them as acp_compile does. A stand-in's own result carries a marker (+MARK), so the output says
which code ran. The references here are independent of acp_compile's equivalents (torch.nn.functional where
it has the operation). With fla-core installed, fla's real functions are compiled on CPU under "acp"
(their kernels never run) and compared with the same references.
"""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from acp_compile.kernels.reference import fox_attention_reference
from acp_compile.third_party import KnownFox, _threshold_as_bound, register_fox_function
from acp_compile.third_party_layers import (AUTHORS, KNOWN_LAYER_FUNCTIONS, register_known_layer_functions)

MARK = 100.0


# ---- independent references ------------------------------------------------------------------------

def ref_norm(x, weight, bias, residual=None, eps=1e-5, rms=False, groups=1, g=None, act="swish"):
    h = x.float() + (residual.float() if residual is not None else 0.0)
    D = h.shape[-1] // groups
    hg = h.unflatten(-1, (groups, D))
    y = (F.rms_norm(hg, (D,), None, eps) if rms else F.layer_norm(hg, (D,), None, None, eps)).flatten(-2)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    if g is not None:
        y = y * (g.float() * torch.sigmoid(g.float()) if act in ("swish", "silu") else torch.sigmoid(g.float()))
    return y.to(x.dtype), h


def ref_token_shift(x, prev_w, curr_w):
    out = x.double() * curr_w.double()[..., None]
    out[:, 1:] += x.double()[:, :-1] * prev_w.double()[:, 1:, :, None]
    return out.to(x.dtype)


def ref_glu_linear(x, y, weight, bias, swish):
    a = F.silu(x.float()) if swish else torch.sigmoid(x.float())
    return F.linear((a * y.float()).to(x.dtype).to(weight.dtype), weight, bias)


def ref_cross_entropy(logits, target, ls=0.0, scale=1.0, zscale=0.0, ignore_index=-100):
    s = logits.float() * scale
    loss = F.cross_entropy(s, target, reduction="none", label_smoothing=ls, ignore_index=ignore_index)
    lse = torch.logsumexp(s, -1)
    z = torch.where(target == ignore_index, 0.0, zscale * lse * lse)
    return loss + z, z.detach()          # the z-loss output is for logging: no gradient, as in the fused kernel


# ---- stand-ins with the authors' signatures, in fake modules under the real paths -------------------

def stand_in_layer_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                        is_rms_norm=False):
    y, h = ref_norm(x, weight, bias, residual, eps, is_rms_norm)
    return (y + MARK, h) if prenorm else y + MARK


def stand_in_group_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                        is_rms_norm=False, num_groups=1):
    y, h = ref_norm(x, weight, bias, residual, eps, is_rms_norm, num_groups)
    return (y + MARK, h) if prenorm else y + MARK


def stand_in_rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    y, h = ref_norm(x, weight, bias, residual, eps, True)
    return (y + MARK, h.to(residual.dtype if residual is not None else x.dtype)) if prenorm else y + MARK


def stand_in_group_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                              residual_in_fp32=False, is_rms_norm=False, num_groups=1, eps=1e-6):
    y, h = ref_norm(x, weight, bias, residual, eps, is_rms_norm, num_groups, g, activation)
    return (y + MARK, h) if prenorm else y + MARK


def stand_in_rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                            residual_in_fp32=False, eps=1e-6):
    y, h = ref_norm(x, weight, bias, residual, eps, True, 1, g, activation)
    return (y + MARK, h) if prenorm else y + MARK


def stand_in_token_shift(x, prev_weight, curr_weight):
    return ref_token_shift(x, prev_weight, curr_weight) + MARK


def stand_in_cross_entropy_loss(logits, target, label_smoothing=0.0, logit_scale=1.0, lse_square_scale=0.0,
                                ignore_index=-100, inplace_backward=False, process_group=None):
    loss, z = ref_cross_entropy(logits, target, label_smoothing, logit_scale, lse_square_scale, ignore_index)
    return loss + MARK, z


class StandInGLULinear(torch.autograd.Function):
    """Like the authors' GLULinearFunction (whose `glu_linear` is this class's `apply`)."""
    swish = False

    @staticmethod
    def forward(ctx, x, y, weight, bias):
        ctx.save_for_backward(x, y, weight)
        return ref_glu_linear(x, y, weight, bias, swish=False) + MARK

    @staticmethod
    def backward(ctx, dout, *args):
        x, y, weight = ctx.saved_tensors
        return torch.zeros_like(x), torch.zeros_like(y), torch.zeros_like(weight), None   # marker: zero grads


class StandInSwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight, bias):
        ctx.save_for_backward(x, y, weight)
        return ref_glu_linear(x, y, weight, bias, swish=True) + MARK

    @staticmethod
    def backward(ctx, dout, *args):
        x, y, weight = ctx.saved_tensors
        return torch.zeros_like(x), torch.zeros_like(y), torch.zeros_like(weight), None


def stand_in_forgetting_attention(q, k, v, log_fgate, *, head_first=False, seq_start=None, sm_scale=None,
                                  adaptive_threshold=None):
    """The authors' attention signature; its own code adds MARK (head_first=True only, as their model calls it)."""
    o, _ = fox_attention_reference(q.double(), k.double(), v.double(), torch.cumsum(log_fgate.double(), -1),
                                   sm_scale=sm_scale)
    return o.to(q.dtype) + MARK


def _install_fake_modules():
    fakes = {
        "layernorm": dict(layer_norm=stand_in_layer_norm, group_norm=stand_in_group_norm, rms_norm=stand_in_rms_norm),
        "fuse_norm_gate": dict(group_norm_gated=stand_in_group_norm_gated, rms_norm_gated=stand_in_rms_norm_gated),
        "token_shift": dict(token_shift=stand_in_token_shift),
        "glu_linear": dict(glu_linear=StandInGLULinear.apply, swiglu_linear=StandInSwiGLULinear.apply),
        "fused_cross_entropy": dict(cross_entropy_loss=stand_in_cross_entropy_loss),
    }
    installed = []
    for leaf, attrs in fakes.items():
        name = f"{AUTHORS}.{leaf}"
        if name in sys.modules:          # the real package is installed: leave it alone
            continue
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        installed.append(name)
    try:
        return register_known_layer_functions()
    finally:
        for name in installed:          # registration is by function object; the fake modules can go
            del sys.modules[name]


REGISTERED = _install_fake_modules()
assert register_fox_function(stand_in_forgetting_attention, KnownFox(
    "tests", "stand_in_forgetting_attention", gate="log_fgate", scale="sm_scale", unsupported=("seq_start",),
    same_length=False, threshold="adaptive_threshold"))


def compiled(fn, backend="acp", **options):
    torch._dynamo.reset()
    counters.clear()
    if backend == "acp":
        return torch.compile(fn, backend="acp", fullgraph=True,
                             options={"inner_backend": "aot_eager", "log_eps": None, **options})
    return torch.compile(fn, backend=backend)


def test_the_authors_functions_are_registered():
    expected = {f"{AUTHORS}.{n}" for n in ("layernorm.layer_norm", "layernorm.group_norm", "layernorm.rms_norm",
                                           "fuse_norm_gate.group_norm_gated", "fuse_norm_gate.rms_norm_gated",
                                           "token_shift.token_shift", "glu_linear.glu_linear",
                                           "glu_linear.swiglu_linear", "fused_cross_entropy.cross_entropy_loss")}
    assert expected <= set(REGISTERED)


# ---- one case per function: (call, reference) ------------------------------------------------------

def _cases():
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, res, g, w, b = r(2, 5, 24), r(2, 5, 24), r(2, 5, 24), r(24) + 1.0, r(24)
    xs, pw = r(2, 6, 3, 8), torch.rand(2, 6, 3, generator=gen)
    gx, gy, W, B = r(2, 5, 16), r(2, 5, 16), r(12, 16), r(12)
    logits, target = r(7, 11), torch.tensor([1, 0, -100, 10, 3, -100, 5])
    return {
        "layer_norm": (lambda x, w, b: stand_in_layer_norm(x, w, b, eps=1e-5), (x, w, b),
                       lambda x, w, b: ref_norm(x, w, b)[0]),
        "rms_norm_prenorm": (lambda x, r_, w: stand_in_rms_norm(x, w, None, r_, 1e-6, True), (x, res, w),
                             lambda x, r_, w: ref_norm(x, w, None, r_, 1e-6, True)),
        "group_norm_rms": (lambda x, w: stand_in_group_norm(x, w, None, is_rms_norm=True, num_groups=4), (x, w),
                           lambda x, w: ref_norm(x, w, None, rms=True, groups=4)[0]),
        "group_norm_gated": (lambda x, g, w: stand_in_group_norm_gated(x, g, w, None, "sigmoid", is_rms_norm=True,
                                                                       num_groups=3, eps=1e-6), (x, g, w),
                             lambda x, g, w: ref_norm(x, w, None, None, 1e-6, True, 3, g, "sigmoid")[0]),
        "rms_norm_gated_swish": (lambda x, g, w: stand_in_rms_norm_gated(x, g, w, None), (x, g, w),
                                 lambda x, g, w: ref_norm(x, w, None, None, 1e-6, True, 1, g, "swish")[0]),
        "token_shift": (lambda x, p: stand_in_token_shift(x, p, 1.0 - p), (xs, pw),
                        lambda x, p: ref_token_shift(x, p, 1.0 - p)),
        "glu_linear": (lambda x, y, W, B: StandInGLULinear.apply(x, y, W, B), (gx, gy, W, B),
                       lambda x, y, W, B: ref_glu_linear(x, y, W, B, False)),
        "swiglu_linear": (lambda x, y, W: StandInSwiGLULinear.apply(x, y, W, None), (gx, gy, W),
                          lambda x, y, W: ref_glu_linear(x, y, W, None, True)),
        "cross_entropy": (lambda l: stand_in_cross_entropy_loss(l, target, 0.1, 0.5, 1e-2), (logits,),
                          lambda l: ref_cross_entropy(l, target, 0.1, 0.5, 1e-2)),
    }


CASES = _cases()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _sum(out):
    return sum(o.float().sum() * (i + 1) for i, o in enumerate(out if isinstance(out, tuple) else (out,))
               if o.requires_grad)


@pytest.mark.parametrize("name", list(CASES))
def test_traced_as_plain_pytorch_under_acp_with_equal_gradients(name):
    call, inputs, reference = CASES[name]
    a = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    e = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = compiled(call)(*a)
    assert counters["acp"]["layer_substituted"] >= 1
    expected = reference(*e)
    for o, x in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(o.float(), x.float(), atol=2e-5, rtol=2e-5)   # no MARK: the stand-in did not run
    _sum(out).backward()
    _sum(expected).backward()
    for ga, ge in zip(a, e):
        if ge.grad is not None:
            torch.testing.assert_close(ga.grad, ge.grad, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm_prenorm", "token_shift", "glu_linear", "cross_entropy"])
def test_eager_calls_run_the_original(name):
    call, inputs, reference = CASES[name]
    torch.testing.assert_close(_first(call(*inputs)), _first(reference(*inputs)) + MARK)


@pytest.mark.parametrize("name", ["layer_norm", "group_norm_gated", "token_shift", "swiglu_linear", "cross_entropy"])
def test_other_backends_run_the_original(name):
    call, inputs, reference = CASES[name]
    out = compiled(call, backend="aot_eager")(*inputs)
    assert counters["acp"]["layer_substituted"] == 0
    torch.testing.assert_close(_first(out), _first(reference(*inputs)) + MARK)


def test_half_precision_follows_the_fused_dtypes():
    x, w = torch.randn(3, 32).bfloat16(), (torch.randn(32) + 1).bfloat16()
    r = torch.randn(3, 32).bfloat16()
    y, h = compiled(lambda x, r, w: stand_in_rms_norm(x, w, None, r, 1e-6, True, True))(x, r, w)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16     # residual given: its dtype
    y2, h2 = compiled(lambda x, w: stand_in_layer_norm(x, w, None, None, 1e-6, True, True))(x, w)
    assert y2.dtype == torch.bfloat16 and h2.dtype == torch.float32    # residual_in_fp32 without a residual
    torch.testing.assert_close(y.float(), ref_norm(x, w, None, r, 1e-6, True)[0].float(), atol=1e-2, rtol=1e-2)


def test_a_call_the_equivalent_does_not_cover_runs_the_original():
    logits, target = torch.randn(4, 9), torch.tensor([1, 2, 3, 4])
    group = object()
    out = compiled(lambda l: stand_in_cross_entropy_loss(l, target, process_group=group)[0],
                   inner_backend="eager")(logits)
    assert counters["acp"]["near_miss"] >= 1 and counters["acp"]["layer_substituted"] == 0
    torch.testing.assert_close(out, ref_cross_entropy(logits, target)[0] + MARK)


# ---- the authors' attention threshold (log_pruning_tolerance) -------------------------------------

def test_threshold_maps_onto_the_ops_bound():
    thr = torch.tensor([[-30.0, -12.5]])
    log_eps, u = _threshold_as_bound(thr, 300, torch.zeros(1))
    torch.testing.assert_close(log_eps - math.log(300) - 2 * u, thr)
    assert _threshold_as_bound("auto", 300, torch.zeros(1)) == (-10.0, None)


def test_attention_with_the_authors_threshold_is_the_op():
    gen = torch.Generator().manual_seed(4)
    B, H, T, D = 1, 2, 200, 16
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    log_f = F.logsigmoid(torch.randn(B, H, T, generator=gen) - 1.0)
    U = (q.norm(dim=-1).amax(-1) * k.norm(dim=-1).amax(-1)) / math.sqrt(D)
    thr = -(2 * U + math.log(T)) - 10.0        # what the authors' model computes for log_pruning_tolerance=-10
    f = lambda q, k, v, g, t: stand_in_forgetting_attention(q, k, v, g, head_first=True,   # noqa: E731
                                                            sm_scale=D ** -0.5, adaptive_threshold=t)
    out = compiled(f, log_eps=-10.0)(q, k, v, log_f, thr)
    assert counters["acp"]["fox_substituted"] == 1
    dense, _ = fox_attention_reference(q.double(), k.double(), v.double(), torch.cumsum(log_f.double(), -1))
    bound = 2 * math.exp(-10.0) * v.norm(dim=-1).max()
    assert (out.double() - dense).abs().max() <= bound + 1e-5


# ---- a small FoX-Pro-like block built from the stand-ins: trains and decodes under acp -------------

class TinyFoxBlock(torch.nn.Module):
    """Shaped like the authors' block: RMSNorm, k/v token shift, output-gated group RMSNorm, SwiGLU MLP."""

    def __init__(self, d=32, h=2):
        super().__init__()
        self.h = h
        self.norm_w = torch.nn.Parameter(torch.ones(d))
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.shift = torch.nn.Linear(d, 2 * h)
        self.fgate = torch.nn.Linear(d, h)
        self.ogate = torch.nn.Linear(d, d, bias=False)
        self.onorm_w = torch.nn.Parameter(torch.ones(d))
        self.o = torch.nn.Linear(d, d, bias=False)
        self.mlp_w = torch.nn.Parameter(torch.ones(d))
        self.up = torch.nn.Linear(d, 4 * d, bias=False)
        self.down = torch.nn.Linear(2 * d, d, bias=False)

    def forward(self, x, threshold=None):
        B, T, d = x.shape
        hs = stand_in_rms_norm(x, self.norm_w, None, eps=1e-6)
        q, k, v = self.qkv(hs).chunk(3, -1)
        alpha = torch.sigmoid(self.shift(hs).float())
        k = stand_in_token_shift(k.unflatten(-1, (self.h, -1)), alpha[..., :self.h], 1 - alpha[..., :self.h])
        v = stand_in_token_shift(v.unflatten(-1, (self.h, -1)), alpha[..., self.h:], 1 - alpha[..., self.h:])
        q = q.unflatten(-1, (self.h, -1)).transpose(1, 2)
        log_f = F.logsigmoid(self.fgate(hs).float()).transpose(1, 2)
        o = stand_in_forgetting_attention(q, k.transpose(1, 2), v.transpose(1, 2), log_f, head_first=True,
                                          sm_scale=q.shape[-1] ** -0.5, adaptive_threshold=threshold)
        o = o.transpose(1, 2).reshape(B, T, d)
        o = stand_in_group_norm_gated(o, self.ogate(hs), self.onorm_w, None, "sigmoid", is_rms_norm=True,
                                      num_groups=self.h)
        hs, residual = stand_in_rms_norm(self.o(o), self.mlp_w, None, x, 1e-6, True)
        gate, y = self.up(hs).chunk(2, -1)
        return residual + StandInSwiGLULinear.apply(gate, y, self.down.weight, None)


def _reference_block(block, x):
    """The same block with the references (no stand-ins): what the compiled block must compute."""
    B, T, d = x.shape
    h = block.h
    hs = ref_norm(x, block.norm_w, None, eps=1e-6, rms=True)[0]
    q, k, v = block.qkv(hs).chunk(3, -1)
    alpha = torch.sigmoid(block.shift(hs).float())
    k = ref_token_shift(k.unflatten(-1, (h, -1)), alpha[..., :h], 1 - alpha[..., :h])
    v = ref_token_shift(v.unflatten(-1, (h, -1)), alpha[..., h:], 1 - alpha[..., h:])
    q = q.unflatten(-1, (h, -1)).transpose(1, 2)
    log_f = F.logsigmoid(block.fgate(hs).float()).transpose(1, 2)
    o, _ = fox_attention_reference(q.double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
                                   torch.cumsum(log_f.double(), -1), sm_scale=q.shape[-1] ** -0.5)
    o = o.float().transpose(1, 2).reshape(B, T, d)
    o = ref_norm(o, block.onorm_w, None, None, 1e-6, True, h, block.ogate(hs), "sigmoid")[0]
    hs, residual = ref_norm(block.o(o), block.mlp_w, None, x, 1e-6, True)
    gate, y = block.up(hs).chunk(2, -1)
    return residual + ref_glu_linear(gate, y, block.down.weight, None, True)


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_fox_block_of_stand_ins_compiles_whole_and_trains_under_acp(dynamic):
    torch.manual_seed(0)
    block = TinyFoxBlock()
    x = torch.randn(2, 70, 32)
    torch._dynamo.reset()
    counters.clear()
    fast = torch.compile(block, backend="acp", fullgraph=True, dynamic=dynamic,
                         options={"inner_backend": "aot_eager", "log_eps": None})
    out = fast(x)
    assert counters["acp"]["fox_substituted"] == 1
    expected = _reference_block(block, x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(out.square().mean(), list(block.parameters()))
    ref_grads = torch.autograd.grad(expected.square().mean(), list(block.parameters()))
    for ga, ge in zip(grads, ref_grads):
        torch.testing.assert_close(ga, ge, atol=1e-4, rtol=1e-3)


def test_a_decode_step_with_a_threshold_is_the_op():
    """One query against a longer key cache (Tq < Tk) with the authors' threshold, as their decoding calls it."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 1, 16, generator=gen)
    k, v = torch.randn(1, 2, 90, 16, generator=gen), torch.randn(1, 2, 90, 16, generator=gen)
    log_f = F.logsigmoid(torch.randn(1, 2, 90, generator=gen) + 2.0)
    thr = torch.full((2,), -40.0)
    f = lambda q, k, v, g, t: stand_in_forgetting_attention(q, k, v, g, head_first=True, adaptive_threshold=t)  # noqa: E731
    out = compiled(f, log_eps=-10.0)(q, k, v, log_f, thr)
    assert counters["acp"]["fox_substituted"] == 1
    dense, _ = fox_attention_reference(q.double(), k.double(), v.double(), torch.cumsum(log_f.double(), -1))
    torch.testing.assert_close(out.double(), dense, atol=1e-5, rtol=1e-5)


# ---- fla-core: the functions exist with the signatures we redirect, and compile on CPU under acp ----

def _fla(module):
    pytest.importorskip("fla")
    try:
        return __import__(module, fromlist=["_"])
    except Exception as err:   # noqa: BLE001 - fla imports fail on some machines without a GPU
        pytest.skip(f"{module} does not import here: {err}")


@pytest.mark.parametrize("known", [k for k in KNOWN_LAYER_FUNCTIONS if k.module.startswith("fla.")],
                         ids=lambda k: f"{k.module}.{k.attr}")
def test_fla_functions_exist_with_a_covered_signature(known):
    import inspect
    fn = getattr(_fla(known.module), known.attr, None)
    if fn is None:
        pytest.skip(f"{known.module}.{known.attr} is not in this fla-core version")
    assert set(inspect.signature(fn).parameters) <= set(inspect.signature(known.equivalent).parameters)
    from acp_compile.third_party_layers import register_layer_function
    assert register_layer_function(fn, known)


def test_fla_norms_and_swiglu_compile_on_cpu_under_acp():
    layernorm = _fla("fla.modules.layernorm")
    norm_gate = _fla("fla.modules.fused_norm_gate")
    activations = _fla("fla.modules.activations")
    from acp_compile.third_party_layers import register_known_layer_functions as register
    register()
    x, g, w, r = torch.randn(3, 5, 24), torch.randn(3, 5, 24), torch.randn(24) + 1, torch.randn(3, 5, 24)
    W = torch.randn(8, 12)

    def f(x, g, w, r, W):
        y, h = layernorm.rms_norm(x, w, None, r, 1e-6, True)
        z = norm_gate.rms_norm_gated(y, g, w, None, "swish")
        a, b = z.chunk(2, -1)
        return activations.swiglu_linear(a, b, W, None), h

    out, h = compiled(f)(x, g, w, r, W)
    y, h_ref = ref_norm(x, w, None, r, 1e-6, True)
    z = ref_norm(y, w, None, None, 1e-6, True, 1, g, "swish")[0]
    a, b = z.chunk(2, -1)
    torch.testing.assert_close(out, ref_glu_linear(a, b, W, None, True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref)


def test_a_library_imported_after_acp_compile_is_traced_as_the_equivalent_from_the_first_frame(tmp_path):
    """acp_compile imported first, the model's library imported after it, then torch.compile: the functions are
    registered when their module is imported (acp_compile/import_hook.py), so the first frame Dynamo traces
    already sees the equivalent (registering in the backend entry alone came after that frame was traced, and
    its fused norms graph-broke into their own kernels). A real import of a stand-in package from a folder."""
    name = f"{AUTHORS}.layernorm"
    if any(m == "forgetting_transformer" or m.startswith("forgetting_transformer.") for m in sys.modules):
        pytest.skip("the authors' package (or a stand-in) is imported already")
    folder = tmp_path.joinpath(*name.split(".")[:-1])
    folder.mkdir(parents=True)
    for level in range(len(name.split(".")) - 1):
        tmp_path.joinpath(*name.split(".")[:level + 1], "__init__.py").write_text("")
    folder.joinpath("layernorm.py").write_text(
        "def rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):\n"
        "    return x * 0.0 + 100.0   # not a norm: shows when this code runs\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib
        module = importlib.import_module(name)
        fn = compiled(lambda x, w: module.rms_norm(x, w, None, eps=1e-6) * 2.0)
        x, w = torch.randn(3, 16), torch.rand(16) + 0.5
        got = fn(x, w)
        torch.testing.assert_close(got, ref_norm(x, w, None, None, 1e-6, True)[0] * 2.0)
        assert counters["acp"]["layer_substituted"] >= 1
        torch.testing.assert_close(module.rms_norm(x, w, None), torch.full_like(x, 100.0))   # eager: its own code
    finally:
        sys.path.remove(str(tmp_path))
        for m in [m for m in sys.modules if m == "forgetting_transformer" or m.startswith("forgetting_transformer.")]:
            del sys.modules[m]
