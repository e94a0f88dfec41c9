"""acp_compile.decorator.acp on a class, an instance and a function; options and torch.compile arguments.

Oracle: counters["acp"]["fox_attention"] (sites rewritten, once per compiled graph) and outputs vs eager.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from acp_compile import backend as acp_backend_module
from acp_compile.decorator import ACPBackend, acp

FAST = dict(inner_backend="eager", log_eps=None)       # skip inductor: these tests are about the wiring


def fox_attention_eager(q, k, v, log_f):
    """Plain-torch FoX attention in (B, H, T, D), the spelling people write."""
    T = q.shape[-2]
    c = torch.cumsum(log_f, dim=-1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


class Attention(torch.nn.Module):
    def __init__(self, d_model=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.gate = torch.nn.Linear(d_model, heads)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        log_f = F.logsigmoid(self.gate(x) + 2.0).transpose(1, 2)                 # (B, H, T)
        return fox_attention_eager(q, k, v, log_f).transpose(1, 2).reshape(B, T, C)


def fresh():
    torch._dynamo.reset()
    counters.clear()


def x_of(T=21, seed=0):
    return torch.randn(2, T, 32, generator=torch.Generator().manual_seed(seed))


def test_bare_decorator_on_a_class_compiles_every_instance():
    fresh()

    @acp
    class Bare(Attention):
        pass

    torch.manual_seed(0)
    model = Bare()
    assert isinstance(model, Bare) and isinstance(model, Attention)
    x = x_of()
    out = model(x)                                             # default options: inductor, log_eps -10
    assert counters["acp"]["fox_attention"] == 1
    bound = 2 * math.exp(-10.0) * 10.0
    torch.testing.assert_close(out, Attention.forward(model, x), atol=bound, rtol=1e-4)


def test_decorator_with_options_on_a_class_and_training_step():
    fresh()

    @acp(fullgraph=True, **FAST)
    class WithOptions(Attention):
        pass

    torch.manual_seed(1)
    model = WithOptions()
    x = x_of(seed=1)
    loss = model(x).square().mean()
    loss.backward()
    assert counters["acp"]["fox_attention"] == 1
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    Attention.forward(model, x).square().mean().backward()               # eager, same parameters
    for got, want in zip(compiled_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_on_an_instance_returns_the_compiled_module_and_leaves_the_original_eager():
    fresh()
    torch.manual_seed(2)
    model = Attention()
    fast = acp(**FAST)(model)
    x = x_of(seed=2)
    assert fast is not model and fast.qkv.weight is model.qkv.weight
    want = model(x)                                              # the original stays eager
    assert counters["acp"]["fox_attention"] == 0
    torch.testing.assert_close(fast(x), want, atol=1e-5, rtol=1e-5)
    assert counters["acp"]["fox_attention"] == 1


def test_on_a_function_with_dynamic_shapes_compiles_once_for_many_lengths():
    fresh()
    fn = acp(dynamic=True, **FAST)(fox_attention_eager)
    for T in (19, 33, 40):
        gen = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(1, 2, T, 16, generator=gen) for _ in range(3))
        log_f = F.logsigmoid(torch.randn(1, 2, T, generator=gen) + 2.0)
        torch.testing.assert_close(fn(q, k, v, log_f), fox_attention_eager(q, k, v, log_f), atol=1e-5, rtol=1e-5)
    assert counters["acp"]["fox_attention"] == 1                     # one graph for the three lengths


def test_bare_decorator_on_a_function():
    fresh()
    fn = acp(fox_attention_eager)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(3))
    log_f = F.logsigmoid(torch.randn(1, 2, 24, generator=gen) + 2.0)
    fn(q, k, v, log_f)
    assert counters["acp"]["fox_attention"] == 1


def test_mode_and_options_both_reach_the_backend(monkeypatch):
    fresh()
    seen = {}

    def spy(gm, example_inputs, options=None, mode=None):
        seen.update(options=options, mode=mode)
        return gm.forward

    monkeypatch.setattr(acp_backend_module, "acp", spy)
    fn = acp(mode="max-autotune-no-cudagraphs", log_eps=-7.0, report=False)(lambda x: x * 2)
    fn(torch.ones(3))
    assert seen["mode"] == "max-autotune-no-cudagraphs"
    assert seen["options"].log_eps == -7.0 and seen["options"].report is False


def marked_fox(q, k, v, log_fgate, *, head_first=False, seq_start=None, sm_scale=None):
    """A stand-in with the FoX authors' signature; its own code adds 100, the op does not."""
    assert head_first
    return fox_attention_eager(q, k, v, log_fgate) + 100.0


def test_known_fox_functions_are_substituted_under_the_decorator():
    from acp_compile.third_party import KnownFox, register_fox_function
    assert register_fox_function(marked_fox, KnownFox("tests", "marked_fox", "log_fgate", "sm_scale",
                                                      ("seq_start",), same_length=False))
    fresh()
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(3))
    log_f = F.logsigmoid(torch.randn(1, 2, 24, generator=gen) + 2.0)
    out = acp(mode="default", **FAST)(lambda *a: marked_fox(*a, head_first=True))(q, k, v, log_f)
    assert counters["acp"]["fox_substituted"] == 1
    torch.testing.assert_close(out, fox_attention_eager(q, k, v, log_f), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(log_epsilon=-3.0), "unknown acp option"),
    (dict(log_eps=3.0), "log_eps must be <= 0"),
])
def test_bad_options_fail_early_with_the_valid_names(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        acp(**bad)
    if "unknown" in match:
        assert "log_eps" in str(info.value) and "fullgraph" in str(info.value)


def test_decorating_something_else_says_what_to_do():
    class NotAModule:
        pass

    with pytest.raises(TypeError, match="subclass torch.nn.Module"):
        acp(NotAModule)
    with pytest.raises(TypeError, match="keywords"):
        acp(log_eps=-10.0)(3)


def test_backend_object_carries_the_config():
    from acp_compile.config import ACPConfig
    backend = ACPBackend(ACPConfig.from_options({"log_eps": -5.0}), mode="default")
    assert backend.acp_config.log_eps == -5.0 and "mode='default'" in repr(backend)
