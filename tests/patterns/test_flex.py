"""flex_attention with a FoX score_mod and a causal mask is rewritten to the op; look-alikes are not.

Oracle: torch._dynamo.utils.counters["acp"] ("fox_attention": rewritten sites, "near_miss": attention
that was looked at and left alone); outputs are compared with eager flex_attention. CPU flex_attention
has no backward, so these tests run forward only (training through the op is tested elsewhere).
"""
import logging
import math
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

import acp_compile.backend  # noqa: F401  (sets up the acp_compile logger before a test attaches to it)
from acp_compile.patterns.flex_anchor import block_tables_are_causal

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def inputs(B=1, Hq=2, Hkv=None, Tq=37, Tk=None, D=16, seed=0, decay=1.0):
    Hkv = Hkv or Hq
    Tk = Tk or Tq
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g)
    k, v = torch.randn(B, Hkv, Tk, D, generator=g), torch.randn(B, Hkv, Tk, D, generator=g)
    c = torch.cumsum(torch.nn.functional.logsigmoid(torch.randn(B, Hq, Tk, generator=g) + 2.0) * decay, dim=-1)
    return q, k, v, c


def run(fn, args, **options):
    """(compiled output, eager output, acp counters) for fn under backend="acp"."""
    torch._dynamo.reset()
    counters.clear()
    options = {"inner_backend": "eager", "log_eps": None, **options}
    with torch.no_grad():
        out = torch.compile(fn, backend="acp", options=options)(*args)
        ref = fn(*args)
    return out, ref, dict(counters["acp"])


class LogLines(logging.Handler):
    """Collects the messages of one logger (torch's logging does not propagate them to pytest's caplog)."""

    def __init__(self, name):
        super().__init__(logging.DEBUG)
        self.logger, self.lines = logging.getLogger(name), []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        self.old_level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self.lines

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)


# ----------------------------------------------------------------------------------------- rewritten

def two_copies_in_graph_block_mask(q, k, v, c):
    B, H, T, _ = q.shape
    c2 = c.clone()                                           # flex reads each closure tensor once
    mask = create_block_mask(causal, B, H, T, T, device="cpu")
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, i] - c2[b, h, j],
                          block_mask=mask, scale=0.3)


def causal_inside_score_mod(q, k, v, c):
    def fox(score, b, h, i, j):
        return torch.where(i >= j, score + (c[b, h, i] - c[b, h, j]), -float("inf"))
    return flex_attention(q, k, v, score_mod=fox)


GLOBAL_MASK = create_block_mask(causal, 1, 2, 37, 37, device="cpu")         # built once, outside the graph
STRICT_MASK = create_block_mask(lambda b, h, i, j: i > j, 1, 2, 37, 37, device="cpu")


def time_major_gate_global_block_mask(q, k, v, c):
    c_bth = c.transpose(1, 2).contiguous()                   # (B, T, H)
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s - c_bth[b, j, h] + c_bth[b, i, h],
                          block_mask=GLOBAL_MASK)


def gqa_with_cache_offset(q, k, v, c):
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    off = Tk - Tq

    def cache_causal(b, h, i, j):
        return i + off >= j

    mask = create_block_mask(cache_causal, B, Hq, Tq, Tk, device="cpu")
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, i + off] - c[b, h, j],
                          block_mask=mask, enable_gqa=True)


REWRITTEN = {
    "two_copies_in_graph_block_mask": (two_copies_in_graph_block_mask, {}),
    "causal_inside_score_mod": (causal_inside_score_mod, {}),
    "time_major_gate_global_block_mask": (time_major_gate_global_block_mask, {}),
    "gqa_with_cache_offset": (gqa_with_cache_offset, dict(Hq=4, Hkv=2, Tq=21, Tk=45, D=32)),
}


@pytest.mark.parametrize("name", REWRITTEN)
def test_fox_flex_attention_is_rewritten(name):
    fn, shape = REWRITTEN[name]
    args = inputs(**shape, seed=len(name))
    out, ref, count = run(fn, args)
    assert count.get("fox_attention") == 1 and not count.get("near_miss"), count
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_pruned_rewrite_stays_within_the_eps_bound_under_inductor():
    q, k, v, c = inputs(Tq=70, D=16, seed=3, decay=6.0)       # strong decay: ACP skips tiles
    out, ref, count = run(two_copies_in_graph_block_mask, (q, k, v, c), inner_backend="inductor", log_eps=-10.0)
    assert count.get("fox_attention") == 1, count
    bound = 2 * math.exp(-10.0) * v.norm(dim=-1).max().item()
    assert (out - ref).abs().max().item() <= bound + 1e-5


# ----------------------------------------------------------------------------------------- left alone

def other_tensor_as_key_gate(q, k, v, c):
    other = c * 0.5                                           # not a copy of c: an arbitrary bias
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, i] - other[b, h, j],
                          block_mask=GLOBAL_MASK)


def alibi_bias(q, k, v, c):
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s - 0.1 * (h + 1) * (i - j),
                          block_mask=GLOBAL_MASK)


def reversed_bias(q, k, v, c):
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, j] - c[b, h, i],
                          block_mask=GLOBAL_MASK)


def no_mask(q, k, v, c):
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, i] - c[b, h, j])


def diagonal_hidden(q, k, v, c):
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, i] - c[b, h, j],
                          block_mask=STRICT_MASK)


def scaled_score(q, k, v, c):
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: 2.0 * s + c[b, h, i] - c[b, h, j],
                          block_mask=GLOBAL_MASK)


def lse_used(q, k, v, c):
    o, lse = flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, i] - c[b, h, j],
                            block_mask=GLOBAL_MASK, return_lse=True)
    return o * lse[..., None]


LOOK_ALIKES = {
    "other_tensor_as_key_gate": (other_tensor_as_key_gate, "must be a clone of the first"),
    "alibi_bias": (alibi_bias, "bias is not c[b, h, q_idx]"),
    "reversed_bias": (reversed_bias, "reversed"),
    "no_mask": (no_mask, "not causal"),
    "diagonal_hidden": (diagonal_hidden, "hides the diagonal"),
    "scaled_score": (scaled_score, "does not add a bias"),
    "lse_used": (lse_used, "logsumexp"),
}


@pytest.mark.parametrize("name", LOOK_ALIKES)
def test_look_alike_keeps_its_eager_result(name):
    fn, reason = LOOK_ALIKES[name]
    args = inputs(Tq=37, seed=len(name))
    with LogLines("acp_compile") as lines:
        out, ref, count = run(fn, args)
    assert not count.get("fox_attention") and count.get("near_miss", 0) >= 1, count
    assert any(reason in line for line in lines), lines
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def plain_causal(q, k, v, c):
    return flex_attention(q, k, v, block_mask=GLOBAL_MASK)


def test_plain_flex_attention_is_neither_rewritten_nor_a_near_miss():
    out, ref, count = run(plain_causal, inputs(Tq=37, seed=9), strict=True)
    assert not count.get("fox_attention") and not count.get("near_miss"), count
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_strict_mode_raises_on_a_flex_near_miss():
    with pytest.raises(Exception, match="reversed"):
        run(reversed_bias, inputs(Tq=37, seed=5), strict=True)


def test_dynamic_shapes_compile_once_for_several_lengths():
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(causal_inside_score_mod, backend="acp", dynamic=True,
                       options={"inner_backend": "eager", "log_eps": None})
    with torch.no_grad():
        for T in (20, 37, 50):
            args = inputs(Tq=T, seed=T)
            torch.testing.assert_close(fn(*args), causal_inside_score_mod(*args), atol=2e-5, rtol=2e-5)
    assert counters["acp"]["fox_attention"] == 1 and not counters["acp"]["near_miss"]


# ----------------------------------------------------------------------------------------- block tables

def tables(mask):
    return mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices


@pytest.mark.parametrize("Tq,Tk,mask_mod,want", [
    (37, 37, causal, True),
    (20, 45, lambda b, h, i, j: i + 25 >= j, True),              # cache offset Tk - Tq
    (20, 45, causal, False),                                      # offset missing: blocks of the cache dropped
    (37, 37, lambda b, h, i, j: (i >= j) & (i - j < 8), False),   # sliding window drops causal blocks
    (37, 37, lambda b, h, i, j: j >= 0, False),                   # everything full: future blocks unmasked
])
def test_block_table_check_against_create_block_mask(Tq, Tk, mask_mod, want):
    mask = create_block_mask(mask_mod, 1, 1, Tq, Tk, device="cpu", BLOCK_SIZE=(8, 16))
    assert block_tables_are_causal(*tables(mask), Tq, Tk, 8, 16) is want


WINDOW = create_block_mask(lambda b, h, i, j: (i >= j) & (i - j < 16), 1, 2, 37, 37, device="cpu", BLOCK_SIZE=8)
CAUSAL_MOD_WINDOW_TABLES = BlockMask.from_kv_blocks(*tables(WINDOW), BLOCK_SIZE=8, mask_mod=causal,
                                                    seq_lengths=(37, 37))


def causal_mask_mod_with_window_tables(q, k, v, c):
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, i] - c[b, h, j],
                          block_mask=CAUSAL_MOD_WINDOW_TABLES)


def test_block_tables_that_skip_causal_blocks_are_a_near_miss():
    out, ref, count = run(causal_mask_mod_with_window_tables, inputs(Tq=37, seed=11))
    assert not count.get("fox_attention") and count.get("near_miss") == 1, count
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_block_tables_changed_after_compiling_run_the_original_graph():
    """Eager flex_attention on CPU applies mask_mod everywhere and ignores the tables, while compiled
    flex_attention follows them; so the oracle here is the guard's log line, plus the eager output."""
    mask = create_block_mask(causal, 1, 2, 37, 37, device="cpu", BLOCK_SIZE=8)

    def fox(q, k, v, c):
        return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, i] - c[b, h, j], block_mask=mask)

    args = inputs(Tq=37, seed=12)
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(fox, backend="acp", options={"inner_backend": "eager", "log_eps": None})
    with torch.no_grad(), LogLines("acp_compile") as lines:
        torch.testing.assert_close(fn(*args), fox(*args), atol=2e-5, rtol=2e-5)
        assert counters["acp"]["fox_attention"] == 1
        assert not any("not causal for this call" in line for line in lines)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            getattr(mask, name).copy_(getattr(WINDOW, name))   # in place: Dynamo does not notice
        torch.testing.assert_close(fn(*args), fox(*args), atol=1e-6, rtol=1e-6)
        assert any("not causal for this call" in line for line in lines), lines


def test_bf16_inputs_and_bf16_gate():
    q, k, v, c = (t.bfloat16() for t in inputs(Tq=37, seed=13))
    out, _, count = run(time_major_gate_global_block_mask, (q, k, v, c))
    assert count.get("fox_attention") == 1 and out.dtype == torch.bfloat16, count
    with torch.no_grad():
        want = time_major_gate_global_block_mask(*(t.double() for t in (q, k, v, c)))
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


class _WindowFlex(torch.nn.Module):
    """A sliding window kept on the module: causal while T <= window, not beyond."""

    def __init__(self, window=24, one_row_off=None):
        super().__init__()
        self.window, self.one_row_off = window, one_row_off

    def forward(self, q, k, v, c):
        window, row = self.window, self.one_row_off

        def mask(b, h, i, j):
            keep = (i >= j) & (i - j < window)
            return keep if row is None else keep & ~((i == row) & (j == 0))

        B, H, T, _ = q.shape
        block_mask = create_block_mask(mask, B, H, T, T, device="cpu")
        return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + c[b, h, i] - c[b, h, j], block_mask=block_mask)


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
def test_window_on_the_module_is_decided_again_at_every_new_length(dynamic):
    module = _WindowFlex(window=24)
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(module, backend="acp", options={"inner_backend": "eager", "log_eps": None}, dynamic=dynamic)
    with torch.no_grad():
        for T in (16, 20, 40, 18, 33):
            args = inputs(Tq=T, seed=T)
            torch.testing.assert_close(fn(*args), module(*args), atol=2e-5, rtol=2e-5, msg=f"T={T}")
    assert counters["acp"]["fox_attention"] >= 1


def test_a_mask_that_differs_from_causal_in_one_entry_is_refused():
    """One hidden entry in row 77 of 100: found because every point is decided, not a sample of rows."""
    out, ref, count = run(_WindowFlex(window=1000, one_row_off=77), inputs(Tq=100, seed=3))
    assert count.get("fox_attention") is None and count.get("near_miss") == 1, count
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
