"""The acp backend: options, strict mode and logging, dynamic shapes, guards, report, FX graph cache,
mode passing, compile-time overhead. Counters are the oracle for what the pass did."""
import importlib.metadata
import logging
import math
import os
import sys
import time

import pytest
import torch
from torch._dynamo.utils import counters

import acp_compile
import acp_compile.backend as backend
from acp_compile import _torch_private as tp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "patterns"))
import spelling_cases as sc  # noqa: E402
from fox_tiny_model import TinyFox  # noqa: E402
from helpers import fox_inputs  # noqa: E402


def inputs(B=1, Hq=2, Hkv=2, T=23, D=8, seed=0, decay=1.0):
    """q, k, v and forget-gate logits N(decay, 1) (the spellings apply logsigmoid)."""
    return fox_inputs(B, Hq, Hkv, T, T, D, gate="logit", strength=decay, log_f=True, seed=seed)


@pytest.fixture
def rewrites():
    """Every RewriteResult of the test, for looking at the emitted op's arguments."""
    torch.compiler.reset()
    counters.clear()
    acp_compile.clear_compilations()
    yield _Graphs()


class _Graphs:
    """The rewritten graphs of the test so far, through the public accessor."""

    def _all(self):
        return acp_compile.compilations()

    def __len__(self):
        return len(self._all())

    def __getitem__(self, i):
        return self._all()[i]

    def __iter__(self):
        return iter(self._all())


def op_calls(record):
    return [n for n in record.graph.graph.nodes if n.target is torch.ops.acp.fox_attention_fwd.default]


def test_backend_is_declared_as_entry_point():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "acp" and ep.value == "acp_compile.backend:acp" for ep in eps)
    assert "acp" in torch.compiler.list_backends(exclude_tags=())


def test_unknown_option_is_an_error_listing_valid_ones():
    f = torch.compile(sc.matmul_div_sqrt_triu, backend="acp", options={"log_epsilon": -3})
    with pytest.raises(Exception, match=r"unknown acp option\(s\) \['log_epsilon'\].*valid options are .*log_eps"):
        f(*inputs())


def test_strict_mode_raises_with_the_reason(rewrites):
    f = torch.compile(sc.reversed_bias, backend="acp", options={"strict": True, "inner_backend": "eager"})
    with pytest.raises(Exception, match="strict.*reversed"):
        f(*inputs())


def test_near_miss_is_counted_and_logged_with_reason(rewrites):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("acp_compile")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        torch.compile(sc.no_causal_mask, backend="acp", options={"inner_backend": "eager"})(*inputs())
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert counters["acp"]["near_miss"] == 1 and counters["acp"]["fox_attention"] == 0
    assert any("near-miss" in r.getMessage() and "no causal mask" in r.getMessage() for r in records)


def test_torch_logs_knows_acp_compile():
    tp.register_torch_log()
    assert tp.torch_log_registered()


def test_dynamic_true_compiles_once_and_lets_the_op_compute_the_scale(rewrites):
    f = torch.compile(sc.matmul_div_sqrt_triu, backend="acp", dynamic=True, fullgraph=True,
                      options={"inner_backend": "eager", "log_eps": None})
    for T, D in ((17, 8), (33, 8), (50, 8), (21, 16)):
        args = inputs(T=T, D=D)
        torch.testing.assert_close(f(*args), sc.matmul_div_sqrt_triu(*args), rtol=1e-4, atol=1e-5)
    assert len(rewrites) == 1, "dynamic=True must compile once"
    (call,) = op_calls(rewrites[0])
    assert call.args[4] is None, "1/sqrt(d) of a symbolic head dim must be proven equal to the op's default"


@pytest.mark.parametrize("fn", [sc.scale_on_q, sc.sdpa_masked_fill])
def test_default_dynamic_recompiles_at_most_once(rewrites, fn):
    f = torch.compile(fn, backend="acp", options={"inner_backend": "eager", "log_eps": None})
    for T in (17, 33, 50, 64):
        args = inputs(T=T)
        torch.testing.assert_close(f(*args), fn(*args), rtol=1e-4, atol=1e-5)
    assert len(rewrites) <= 2
    assert all(len(op_calls(r)) == 1 for r in rewrites)


def test_custom_scale_is_passed_as_a_float(rewrites):
    torch.compile(sc.scale_on_k_custom, backend="acp", options={"inner_backend": "eager"})(*inputs())
    (call,) = op_calls(rewrites[0])
    assert call.args[4] == pytest.approx(0.3)


@pytest.mark.parametrize("fn", [sc.gqa_repeat_interleave, sc.gqa_expand, sc.gqa_llama_repeat_kv])
def test_gqa_passes_the_unrepeated_kv(rewrites, fn):
    torch.compile(fn, backend="acp", options={"inner_backend": "eager"})(*inputs(Hq=4, Hkv=2))
    (call,) = op_calls(rewrites[0])
    k, v = call.args[1], call.args[2]
    assert tp.example_value(k).shape[1] == 2 and tp.example_value(v).shape[1] == 2


def test_buffer_mask_is_reverified_when_it_changes(rewrites):
    m = sc.NanoGPTBufferAttention(block_size=64)
    f = torch.compile(m, backend="acp", options={"inner_backend": "eager", "log_eps": None})
    args = inputs(T=20)
    torch.testing.assert_close(f(*args), m(*args), rtol=1e-4, atol=1e-5)
    assert counters["acp"]["fox_attention"] == 1
    with torch.no_grad():
        m.bias.fill_(1.0)                                     # no longer causal: every key visible
    assert torch.equal(f(*args), m(*args)), "a changed mask must run the unrewritten graph"
    with torch.no_grad():
        m.bias.copy_(torch.tril(torch.ones(64, 64)))
    torch.testing.assert_close(f(*args), m(*args), rtol=1e-4, atol=1e-5)


def test_pruned_output_within_the_eps_bound():
    torch.compiler.reset()
    args = inputs(T=300, D=8, decay=-3.0, seed=1)             # log f about -3: strongly prunable
    f = torch.compile(sc.matmul_div_sqrt_triu, backend="acp", options={"inner_backend": "eager", "report": True})
    acp_compile.report.reset()
    out = f(*args)
    (rec,) = acp_compile.report.sites()
    assert float(rec.skipped.min()) > 0
    ref = sc.matmul_div_sqrt_triu(*(a.double() for a in args))
    bound = 2 * math.exp(-10.0) * float(args[2].double().norm(dim=-1).max())
    assert float((out.double() - ref).abs().max()) <= bound + 1e-5


def test_report_records_sites_and_draws_the_map(tmp_path):
    torch.compiler.reset()
    acp_compile.report.reset()
    model = TinyFox(n_layer=2, block_size=128)
    f = torch.compile(model, backend="acp", options={"inner_backend": "eager", "report": True})
    idx = torch.randint(0, 64, (2, 100))
    f(idx, idx)
    f(idx, idx)
    recs = {r.site: r for r in acp_compile.report.sites()}
    assert set(recs) == {"layers.0.attn", "layers.1.attn"}
    rec = recs["layers.1.attn"]
    assert rec.calls == 2 and rec.skipped.shape == (2, 2) and rec.seq_q == 100
    assert rec.kept_tiles.shape[:2] == (2, 2) and rec.kept_tiles.dtype == torch.bool
    path = acp_compile.report.draw_pruning_map("layers.1.attn", head=1, batch=0, path=str(tmp_path / "m.png"))
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="recorded sites"):
        acp_compile.report.site("nope")


def test_mode_goes_to_inductor_and_report_refuses_cuda_graphs(monkeypatch):
    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen["patches"] = config_patches
        return gm.forward

    monkeypatch.setattr(tp, "compile_fx_inner_backend", lambda name: fake_compile_fx)
    torch.compiler.reset()
    torch.compile(sc.matmul_div_sqrt_triu, backend="acp", mode="reduce-overhead")(*inputs())
    assert seen["patches"].get("triton.cudagraphs") is True
    with pytest.raises(Exception, match="CUDA graphs"):
        backend.acp(torch.fx.symbolic_trace(lambda x: x + 1), [torch.ones(1)], {"report": True}, "reduce-overhead")


def test_fx_graph_cache_key_follows_the_rewrite(tmp_path, monkeypatch):
    """The rewritten graph (with the op and its log_eps) is what inductor hashes: same config hits,
    another log_eps misses."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    inductor_config = tp.inductor_config()
    args = inputs(T=20)
    events = []
    with inductor_config.patch(fx_graph_cache=True):
        for opts in ({"log_eps": -10.0}, {"log_eps": -10.0}, {"log_eps": -5.0}):
            torch.compiler.reset()
            counters.clear()
            out = torch.compile(sc.matmul_div_sqrt_triu, backend="acp", options=opts)(*args)
            torch.testing.assert_close(out, sc.matmul_div_sqrt_triu(*args), rtol=1e-4, atol=1e-5)
            assert counters["acp"]["fox_attention"] == 1
            events.append((counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]))
    assert events == [(0, 1), (1, 0), (0, 1)], events


def test_pass_overhead_for_24_attention_layers(rewrites):
    """Measures the rewrite's own time on a 24-layer model (printed; regression guard at 5 s)."""
    model = TinyFox(n_layer=24)
    idx = torch.randint(0, 64, (1, 16))
    torch.compile(model, backend="acp", options={"inner_backend": "eager"})(idx, idx)
    assert counters["acp"]["fox_attention"] == 24
    assert sum(len(r.sites) for r in rewrites) == 24
    seconds = [r.pass_seconds for r in rewrites]
    print(f"acp pass on 24 attention layers: {1e3 * sum(seconds):.0f} ms")
    assert sum(seconds) < 5.0


@pytest.mark.parametrize("options,expected", [({}, -10.0), ({"log_eps": -7.5}, -7.5), ({"prune": False}, None),
                                              ({"log_eps": None}, None)])
def test_options_reach_the_op(rewrites, options, expected):
    torch.compile(sc.matmul_div_sqrt_triu, backend="acp", options={"inner_backend": "eager", **options})(*inputs())
    (call,) = op_calls(rewrites[0])
    assert call.args[5] == expected


def test_compilations_say_what_was_rewritten_and_what_was_left_alone_without_dynamo_counters():
    acp_compile.clear_compilations()
    torch.compiler.reset()
    torch.compile(sc.matmul_div_sqrt_triu, backend="acp", options={"inner_backend": "eager"})(*inputs())
    torch.compile(sc.no_causal_mask, backend="acp", options={"inner_backend": "eager"})(*inputs())
    first, second = acp_compile.compilations()
    assert len(first.sites) == 1 and not first.near_misses and first.fell_back is None
    assert not second.sites and len(second.near_misses) == 1
    assert "no causal mask" in second.near_misses[0].reason
    acp_compile.clear_compilations()
    assert acp_compile.compilations() == []


@pytest.mark.parametrize("certificate", ["online", "paper"])
def test_certificate_option_reaches_the_op_with_norm_statistics_for_online(rewrites, certificate):
    torch.compile(sc.matmul_div_sqrt_triu, backend="acp",
                  options={"inner_backend": "eager", "certificate": certificate})(*inputs())
    (call,) = op_calls(rewrites[0])
    assert call.kwargs["certificate"] == certificate
    q_norm, k_norm = call.kwargs["q_norm"], call.kwargs["k_norm"]
    if certificate == "paper":
        assert q_norm is None and k_norm is None
    else:
        assert q_norm.target is acp_compile.ops.row_norms and k_norm.target is acp_compile.ops.row_norms
        assert q_norm.args[0].args[0] is call.args[0] and k_norm.args[0].args[0] is call.args[1]


def test_unknown_certificate_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"acp option certificate must be one of \('online', 'paper'\)"):
        acp_compile.config.ACPConfig(certificate="tight")


def test_online_certificate_compiles_with_inductor_and_trains(rewrites):
    """The norm nodes go through inductor and autograd (no gradient flows into them); output and
    gradients equal the eager op with the same certificate up to rounding, and the site prunes."""
    args = [a.requires_grad_() for a in inputs(T=200, D=8, decay=-3.0, seed=2)]
    f = torch.compile(sc.matmul_div_sqrt_triu, backend="acp", options={"inner_backend": "inductor"})
    out = f(*args)
    grads = torch.autograd.grad(out.sum(), args)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    ref = sc.matmul_div_sqrt_triu(*ref_args)
    ref_grads = torch.autograd.grad(ref.sum(), ref_args)
    bound = 2 * math.exp(-10.0) * float(args[2].detach().norm(dim=-1).max())
    assert float((out - ref).detach().abs().max()) <= bound + 1e-4
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3)
    assert len(op_calls(rewrites[0])) == 1
