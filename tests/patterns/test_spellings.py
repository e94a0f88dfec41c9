"""Every supported spelling of FoX attention is rewritten; every look-alike keeps its eager result.

Oracle: torch._dynamo.utils.counters["acp"] ("fox_attention": rewritten sites, "near_miss": sites
looked at and left alone). Rewritten outputs are compared with eager at log_eps=None (dense, so
only rounding differs); look-alikes must equal eager exactly (inner_backend="eager" runs the
unrewritten graph op by op). Shapes are tiny and odd (T = 37 crosses no block boundary evenly).
"""
import pytest
import torch
from torch._dynamo.utils import counters

import spelling_cases as sc

B, H, T, D = 2, 2, 37, 8


def make_inputs(Hq=H, Hkv=H, Tq=T, Tk=T, d=D, seed=0, layout="bhtd"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, d, generator=g)
    k = torch.randn(B, Hkv, Tk, d, generator=g)
    v = torch.randn(B, Hkv, Tk, d, generator=g)
    fg = torch.randn(B, Hq, Tk, generator=g) + 1.0
    if layout == "bthd":
        q, k, v, fg = (x.transpose(1, 2).contiguous() for x in (q, k, v, fg))
    return q, k, v, fg


def compile_and_run(fn, args, dynamic=False, **options):
    torch.compiler.reset()
    counters.clear()
    opts = {"inner_backend": "eager", "log_eps": None, **options}
    compiled = torch.compile(fn, backend="acp", options=opts, dynamic=dynamic, fullgraph=True)
    return compiled(*args), dict(counters["acp"])


MATCH = [
    ("matmul_div_sqrt_triu", {}),
    ("torch_matmul_mul_where_tril", {}),
    ("bmm_reshaped", {}),
    ("einsum_bhtd", {}),
    ("einsum_bthd", {"layout": "bthd"}),
    ("scale_on_q", {}),
    ("scale_on_k_custom", {}),
    ("inplace_separate_steps", {}),
    ("fp32_softmax_cast_back", {}),
    ("softplus_gate", {}),
    ("any_tensor_as_c", {}),
    ("arange_compare", {}),
    ("additive_inf_matrix", {}),
    ("dropout_p0", {}),
    ("dropout_eval", {}),
    ("sdpa_masked_fill", {}),
    ("sdpa_added_mask_scale", {}),
    ("gqa_repeat_interleave", {"Hq": 4, "Hkv": 2}),
    ("gqa_expand", {"Hq": 4, "Hkv": 2}),
    ("kv_cache_offset", {"Tq": 11, "Tk": 37}),
    ("sdpa_enable_gqa", {"Hq": 4, "Hkv": 2}),
    ("gqa_llama_repeat_kv", {"Hq": 4, "Hkv": 2}),
    ("decode_step_no_mask", {"Tq": 1, "Tk": 37}),
    ("sdpa_kv_cache", {"Tq": 5, "Tk": 37}),
    ("tril_eq_zero_views_mT", {}),
    ("where_two_aranges", {}),
    ("bf16_fp32_softmax", {}),
]
TOLERANCE = {"bf16_fp32_softmax": dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("name,shape", MATCH, ids=[m[0] for m in MATCH])
def test_spelling_is_rewritten(name, shape):
    fn = getattr(sc, name)
    args = make_inputs(**shape)
    out, c = compile_and_run(fn, args)
    assert c.get("fox_attention") == 1, f"{name} was not rewritten: {c}"
    assert c.get("near_miss", 0) == 0
    ref = fn(*args)
    torch.testing.assert_close(out, ref, **TOLERANCE.get(name, dict(rtol=1e-4, atol=1e-5)))


def test_nanogpt_buffer_mask_is_rewritten_and_guarded():
    m = sc.NanoGPTBufferAttention(block_size=64)
    args = make_inputs()
    out, c = compile_and_run(m, args)
    assert c.get("fox_attention") == 1
    torch.testing.assert_close(out, m(*args), rtol=1e-4, atol=1e-5)


LOOKALIKES = [
    ("arbitrary_bias", True),
    ("data_bias", True),
    ("no_causal_mask", True),
    ("mask_hides_diagonal", True),
    ("reversed_bias", True),
    ("probs_used_elsewhere", True),
    ("dropout_training", True),
    ("sliding_window", True),
    ("query_side_bias_only", True),
    ("unbalanced_bias", True),
    ("plain_causal", False),          # ordinary causal attention: not FoX, not even a near-miss
]


@pytest.mark.parametrize("name,near_miss", LOOKALIKES, ids=[m[0] for m in LOOKALIKES])
def test_lookalike_is_left_alone(name, near_miss):
    fn = getattr(sc, name)
    args = make_inputs()
    torch.manual_seed(0)
    out, c = compile_and_run(fn, args)
    assert c.get("fox_attention", 0) == 0, f"{name} was rewritten"
    assert (c.get("near_miss", 0) >= 1) == near_miss, c
    torch.manual_seed(0)
    ref = fn(*args)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert torch.equal(o, r), f"{name}: the compiled result differs from eager"
