"""Soundness (issue #9): backend="acp" never changes a program's result beyond the eps bound.

Four families of programs that look like FoX attention but are not (or are only at some lengths), each
written several ways: (1) in-place writes to a mask, a view of it, an SDPA bias, the logits, c or q/k/v
after the value the pass would prove was built; (2) masks built from sizes and module attributes (windows,
prefixes, sinks) compiled where they look causal and called where they are not, under dynamic=False, None
(automatic dynamic: the second length recompiles with symbolic sizes) and True; (3) masks that are graph
inputs, fresh per call or edited between calls, and module buffers replaced or edited; (4) shapes the op
does not take (Dv != D, Tq > Tk, 3D inputs, head dims 1 or odd), which must never make the pass raise.

Property (tests/fuzz/harness.py): every output, and the gradient of a random projection of the outputs
w.r.t. q, k, v and the gate pre-activation where the program is differentiable, equals eager within
rtol 1e-4 / atol 1e-5 (log_eps=None: only rounding differs), plus 2 * exp(log_eps) * max ||v|| under the
default log_eps=-10. The positive controls (genuine FoX next to harmless writes) must still be rewritten,
so a pass that refuses everything does not pass this file.
A failing case appends its reproduction to .fuzz_findings.md (git-ignored) once per family.
"""
from __future__ import annotations

import inspect
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fuzz.harness import record_finding, run_and_compare  # noqa: E402

NEG = float("-inf")


def gate(fg):
    return torch.cumsum(F.logsigmoid(fg), dim=-1)


def inputs(T=24, B=2, Hq=2, Hkv=None, Tq=None, D=8, Dv=None, seed=0, decay=None):
    """q (B, Hq, Tq, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv), fg (B, Hq, T) gate pre-activations.

    The gate decays slowly in even heads (logsigmoid(3) = -0.05 per token: keys 24 back still weigh
    e^-1.2, so a wrong window or prefix shows as an O(1) error) and fast in odd heads (logsigmoid(-1) =
    -1.3 per token: tiles past ~30 tokens are pruned at the default log_eps). decay=x: every head at mean x.
    """
    Hkv = Hq if Hkv is None else Hkv
    Tq = T if Tq is None else Tq
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed * 1000 + T)
    q = torch.randn(B, Hq, Tq, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    mean = torch.tensor([3.0, -1.0] * Hq)[:Hq] if decay is None else torch.full((Hq,), float(decay))
    fg = torch.randn(B, Hq, T, generator=g) * 0.5 + mean[:, None]
    return [q, k, v, fg]


def check(out, family, name, obj, settings):
    if out.wrong:
        try:
            src = inspect.getsource(obj)
        except (OSError, TypeError):
            src = repr(obj)
        record_finding(family, (
            f"## {family}: `{name}` (tests/patterns/test_soundness.py)\n"
            f"settings: {settings}\n"
            f"result: rewritten={out.rewritten} near_miss={out.near_miss}\n"
            f"error: {out.error}\nmismatch: {out.mismatch}\n```python\n{src}```\n"))
    assert out.error is None, f"{name}: the pass raised or the compiled program failed: {out.error}"
    assert out.mismatch is None, f"{name}: compiled result differs from eager: {out.mismatch} (rewritten={out.rewritten})"


# =============================================================== family 1: in-place writes
def w_prefix_item(q, k, v, fg):                       # prefix-LM by item assignment on the keep mask
    c = gate(fg)
    T = q.shape[-2]
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    keep[:, :5] = True
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def w_masked_fill_inplace_on_mask(q, k, v, fg):       # keep.masked_fill_ with an arange condition
    c = gate(fg)
    T = q.shape[-2]
    j = torch.arange(T)
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    keep.masked_fill_(j[None, :] < 3, True)
    s = torch.matmul(q, k.mT) * q.shape[-1] ** -0.5 + (c.unsqueeze(-1) - c.unsqueeze(-2))
    return torch.where(keep, s, NEG).softmax(-1) @ v


def w_view_fill(q, k, v, fg):                         # fill_ on a row slice (a view) of the mask
    c = gate(fg)
    T = q.shape[-2]
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    keep[:3].fill_(True)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(keep.logical_not(), NEG).softmax(-1) @ v


def w_flat_view_setitem(q, k, v, fg):                 # write through keep.view(-1)
    c = gate(fg)
    T = q.shape[-2]
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    keep.view(-1)[: 2 * T] = True                     # rows 0 and 1 see every key
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def w_transpose_view_setitem(q, k, v, fg):            # write through keep.T
    c = gate(fg)
    T = q.shape[-2]
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    keep.T[:, 1] = True                               # row 1 sees every key
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def w_copy_(q, k, v, fg):                             # copy_ of a non-causal pattern into the causal mask
    c = gate(fg)
    T = q.shape[-2]
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    causal.copy_(torch.triu(torch.ones(T, T, dtype=torch.bool), 3))
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(causal, NEG).softmax(-1) @ v


def w_index_put_(q, k, v, fg):                        # index_put_ unmasks a few future keys
    c = gate(fg)
    T = q.shape[-2]
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    idx = torch.arange(T - 4)
    keep.index_put_((idx, idx + 4), torch.tensor(True))
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def w_ior(q, k, v, fg):                               # keep |= prefix (Tensor.__ior__)
    c = gate(fg)
    T = q.shape[-2]
    pos = torch.arange(T)
    keep = pos[:, None] >= pos[None, :]
    keep |= pos[None, :] < 4
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def w_logical_or_(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    keep.logical_or_(torch.eye(T, dtype=torch.bool).roll(1, dims=1))   # one key into the future
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def w_additive_matrix_setitem(q, k, v, fg):           # additive -inf matrix, two rows opened afterwards
    c = gate(fg)
    T = q.shape[-2]
    m = torch.full((T, T), NEG).triu(1)
    m[:2] = 0.0
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + m + c[..., :, None] - c[..., None, :]
    return s.softmax(-1) @ v


def w_sdpa_bias_sink_column(q, k, v, fg):             # SDPA bias: causal fill, then a sink column set to 0
    c = gate(fg)
    T = q.shape[-2]
    bias = (c[..., :, None] - c[..., None, :]).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), NEG)
    bias[..., 0] = 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def w_sdpa_bias_inplace_add(q, k, v, fg):             # SDPA bias: += on a slice after the fill
    c = gate(fg)
    T = q.shape[-2]
    mask = torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    bias = c.unsqueeze(-1) - c.unsqueeze(-2) + mask
    bias[..., :, :3] += 2.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def w_logits_column_zero(q, k, v, fg):                # logits written after the mask
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    s[..., 0] = 0.0
    return s.softmax(-1) @ v


def w_logits_slice_iadd(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    s[..., :, :4] += 1.0
    return s.softmax(-1) @ v


def w_logits_unmask_after(q, k, v, fg):               # logits: a masked entry rewritten to a finite value
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    s[..., 0, 1:3] = 0.5
    return s.softmax(-1) @ v


def w_c_between_ci_cj(q, k, v, fg):                   # c written between taking c_i (a view) and c_j
    c = gate(fg)
    T = q.shape[-2]
    ci = c[..., :, None]
    c.mul_(2)
    cj = c[..., None, :]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + ci - cj
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v


def w_c_clone_then_write(q, k, v, fg):                # c_i from a copy, c written before c_j: c_i - 2 c_j
    c = gate(fg)
    T = q.shape[-2]
    ci = c.clone()[..., :, None]
    c *= 2.0
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + ci - c[..., None, :]
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v


def w_c_tail_write(q, k, v, fg):                      # c edited at a few positions after c_i - c_j's operand
    c = gate(fg)
    T = q.shape[-2]
    ci = c.unsqueeze(-1)
    c[..., -3:] = 0.0
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + ci - c.unsqueeze(-2)
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v


def w_q_after_product(q, k, v, fg):                   # q written after q @ k^T (no effect on the result)
    q = q.clone()
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1)
    q.mul_(2)
    s = s / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v


def w_k_scaled_inplace_after_product(q, k, v, fg):
    k = k.clone()
    c = gate(fg)
    T = q.shape[-2]
    s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    k.mul_(0.5)
    s = s + c[..., :, None] - c[..., None, :]
    o = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v
    return o, k.sum()


def w_v_before_pv(q, k, v, fg):                       # v written before p @ v: the op must see v + 1
    v = v.clone()
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    p = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1)
    v.add_(1.0)
    return p @ v


def w_v_after_pv(q, k, v, fg):                       # v written after p @ v: the output must not see it
    v = v.clone()
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    o = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v
    v.add_(1.0)
    return o, v


def w_v_repeated_then_written(q, k, v, fg):          # GQA repeat copies v; the copy is written: the op reads v
    g = 2
    B, Hkv, T, D = v.shape
    k = k[:, :, None].expand(B, Hkv, g, T, D).reshape(B, Hkv * g, T, D)
    v = v[:, :, None].expand(B, Hkv, g, T, D).reshape(B, Hkv * g, T, D)
    c = gate(fg)
    s = q @ k.transpose(-2, -1) / math.sqrt(D) + c[..., :, None] - c[..., None, :]
    p = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), NEG).softmax(-1)
    v.add_(1.0)
    return p @ v


def w_k_interleaved_then_written(q, k, v, fg):        # repeat_interleave, then one head of the copy zeroed
    k = k.repeat_interleave(2, dim=1)
    v = v.repeat_interleave(2, dim=1)
    k[:, 0].zero_()
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), NEG).softmax(-1) @ v


def w_q_scaled_copy_written(q, k, v, fg):             # q * scale (a new tensor) edited before the product
    qs = q * (1.0 / math.sqrt(q.shape[-1]))
    qs[..., 0] = 0.0
    c = gate(fg)
    T = q.shape[-2]
    s = qs @ k.transpose(-2, -1) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), NEG).softmax(-1) @ v


def w_v_reshaped_copy_written(q, k, v, fg):           # (B*H, T, D) products; the flattened v copy is written
    B, H, T, D = q.shape
    c = gate(fg)
    s = (torch.bmm(q.reshape(B * H, T, D), k.transpose(-2, -1).reshape(B * H, D, T)) / math.sqrt(D)).view(B, H, T, T)
    s = s + c[..., :, None] - c[..., None, :]
    p = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), NEG).softmax(-1)
    v3 = v.transpose(-2, -1).contiguous().transpose(-2, -1).reshape(B * H, T, D)
    v3.mul_(2.0)
    return torch.bmm(p.reshape(B * H, T, T), v3).view(B, H, T, D)


SKIPPED_STEP_WRITES = [w_v_repeated_then_written, w_k_interleaved_then_written, w_q_scaled_copy_written,
                       w_v_reshaped_copy_written]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("fn", SKIPPED_STEP_WRITES, ids=lambda f: f.__name__)
def test_writes_into_a_step_the_op_redoes_keep_eager_result(fn, dynamic):
    """The op reads an operand a few steps before the original product (a GQA repeat, a scale, a reshape that
    copies) and redoes those steps itself; a write into such a step's result must not be skipped (found by the
    large fuzzer: `v.add_(1)` after Llama's repeat_kv changed the output)."""
    grouped = fn in (w_v_repeated_then_written, w_k_interleaved_then_written)
    calls = [inputs(T, Hq=4, Hkv=2 if grouped else None) for T in (24, 13)]
    out = run_and_compare(lambda: fn, calls, dynamic=dynamic, log_eps=None, grad_argnums=())
    check(out, "1-inplace-writes", fn.__name__, fn, f"dynamic={dynamic}, log_eps=None, T=24,13")


# (program, differentiable): programs that write a tensor autograd saved cannot be differentiated in eager
INPLACE = [
    (w_prefix_item, True), (w_masked_fill_inplace_on_mask, True), (w_view_fill, True),
    (w_flat_view_setitem, True), (w_transpose_view_setitem, True), (w_copy_, True), (w_index_put_, True),
    (w_ior, True), (w_logical_or_, True), (w_additive_matrix_setitem, True), (w_sdpa_bias_sink_column, True),
    (w_sdpa_bias_inplace_add, True), (w_logits_column_zero, True), (w_logits_slice_iadd, True),
    (w_logits_unmask_after, True), (w_c_between_ci_cj, False), (w_c_clone_then_write, False),
    (w_c_tail_write, False), (w_q_after_product, False), (w_k_scaled_inplace_after_product, False),
    (w_v_before_pv, True), (w_v_after_pv, False),
]


@pytest.mark.parametrize("dynamic", [False, None, True], ids=["static", "auto", "dynamic"])
@pytest.mark.parametrize("fn,diff", INPLACE, ids=[f.__name__ for f, _ in INPLACE])
def test_inplace_writes_keep_eager_result(fn, diff, dynamic):
    calls = [inputs(T) for T in (24, 37, 13)]
    grads = (0, 1, 2, 3) if diff else ()
    out = run_and_compare(lambda: fn, calls, dynamic=dynamic, log_eps=None, grad_argnums=grads)
    check(out, "1-inplace-writes", fn.__name__, fn, f"dynamic={dynamic}, log_eps=None, T=24,37,13")


@pytest.mark.parametrize("fn", [w_prefix_item, w_sdpa_bias_sink_column, w_logits_column_zero, w_c_between_ci_cj],
                         ids=lambda f: f.__name__)
def test_inplace_writes_keep_eager_result_pruned(fn):
    # default log_eps, lengths past one 64-tile with a fast decay, so that a wrongly proven site is also pruned
    calls = [inputs(T) for T in (80, 130)]
    out = run_and_compare(lambda: fn, calls, dynamic=None, log_eps=-10.0)
    check(out, "1-inplace-writes", fn.__name__, fn, "dynamic=None, log_eps=-10, T=80,130")


# ---- positive controls: genuine FoX next to harmless writes must still be rewritten
def ctrl_plain(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v


def ctrl_unrelated_write(q, k, v, fg):                # an in-place write to a tensor the attention never reads
    c = gate(fg)
    T = q.shape[-2]
    stats = torch.zeros(4)
    stats[0] = fg.mean()
    stats[1:3] += 1.0
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    return s.softmax(-1) @ v, stats


def ctrl_sdpa_unrelated_write(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    bias = (c[..., :, None] - c[..., None, :]).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), NEG)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    extra = fg.clone()
    extra[..., 0] = 0.0
    return o, extra


CONTROLS = [ctrl_plain, ctrl_unrelated_write, ctrl_sdpa_unrelated_write]


@pytest.mark.parametrize("dynamic", [False, None, True], ids=["static", "auto", "dynamic"])
@pytest.mark.parametrize("fn", CONTROLS, ids=lambda f: f.__name__)
def test_positive_controls_are_rewritten(fn, dynamic):
    calls = [inputs(T) for T in (24, 37, 13)]
    out = run_and_compare(lambda: fn, calls, dynamic=dynamic, log_eps=None, grad_argnums=(0, 1, 2, 3))
    check(out, "0-positive-controls", fn.__name__, fn, f"dynamic={dynamic}")
    assert out.rewritten >= 1, f"{fn.__name__}: genuine FoX attention was not rewritten (near_miss={out.near_miss})"


@pytest.mark.parametrize("fn", CONTROLS[:2], ids=lambda f: f.__name__)
def test_positive_controls_pruned_within_eps(fn):
    calls = [inputs(T) for T in (130, 80, 200)]
    out = run_and_compare(lambda: fn, calls, dynamic=None, log_eps=-10.0, grad_argnums=(0, 1, 2, 3))
    check(out, "0-positive-controls", fn.__name__, fn, "dynamic=None, log_eps=-10, T=130,80,200")
    assert out.rewritten >= 1


# =============================================================== family 2: masks from sizes and attributes
class WindowArange(torch.nn.Module):                  # window on the module, arange comparison, masked_fill
    def __init__(self, window=24):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, fg):
        c = gate(fg)
        T = q.shape[-2]
        i = torch.arange(T)
        keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
        return s.masked_fill(~keep, NEG).softmax(-1) @ v


class WindowWhereTril(torch.nn.Module):               # window as tril minus tril(-w), torch.where
    def __init__(self, window=24):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, fg):
        c = gate(fg)
        T = q.shape[-2]
        ones = torch.ones(T, T, dtype=torch.bool)
        keep = ones.tril() & ~ones.tril(-self.window)
        s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + c.unsqueeze(-1) - c.unsqueeze(-2)
        return torch.where(keep, s, NEG).softmax(-1) @ v


class WindowAdditive(torch.nn.Module):                # window as an additive -inf matrix
    def __init__(self, window=24):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, fg):
        c = gate(fg)
        T = q.shape[-2]
        m = torch.full((T, T), NEG).triu(1) + torch.full((T, T), NEG).tril(-self.window)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + m
        s = s + c[..., :, None] - c[..., None, :]
        return s.softmax(-1) @ v


class WindowSDPA(torch.nn.Module):                    # window in an SDPA float mask
    def __init__(self, window=24):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, fg):
        c = gate(fg)
        T = q.shape[-2]
        pos = torch.arange(T)
        d = pos[:, None] - pos[None, :]
        mask = torch.zeros(T, T).masked_fill((d < 0) | (d >= self.window), NEG)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=c[..., :, None] - c[..., None, :] + mask)


class WindowFinfoMin(torch.nn.Module):                # window, finfo.min fill, triu spelling
    def __init__(self, window=24):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, fg):
        c = gate(fg)
        T = q.shape[-2]
        ones = torch.ones(T, T, dtype=torch.bool)
        hide = ones.triu(1) | ones.tril(-self.window)
        s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
        return s.masked_fill(hide, torch.finfo(s.dtype).min).softmax(-1) @ v


class WindowConstant(torch.nn.Module):                # the window as a literal in the code
    def forward(self, q, k, v, fg):
        c = gate(fg)
        T = q.shape[-2]
        i = torch.arange(T)
        keep = (i[:, None] >= i[None, :]) & (i[:, None] < i[None, :] + 24)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
        return s.masked_fill(~keep, NEG).softmax(-1) @ v


class WindowWithSinks(torch.nn.Module):               # window plus attention sinks (first keys always seen)
    def __init__(self, window=24, sinks=2):
        super().__init__()
        self.window, self.sinks = window, sinks

    def forward(self, q, k, v, fg):
        c = gate(fg)
        T = q.shape[-2]
        i = torch.arange(T)
        keep = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < self.window) | (i[None, :] < self.sinks))
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
        return s.masked_fill(~keep, NEG).softmax(-1) @ v


class WindowSinkItem(torch.nn.Module):                # window, then the sink column set by item assignment
    def __init__(self, window=24):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, fg):
        c = gate(fg)
        T = q.shape[-2]
        keep = torch.ones(T, T, dtype=torch.bool).tril().triu(1 - self.window)
        keep[..., 0] = True
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
        return s.masked_fill(~keep, NEG).softmax(-1) @ v


class PrefixLM(torch.nn.Module):                      # prefix-LM: keys before self.prefix seen by every query
    def __init__(self, prefix=6):
        super().__init__()
        self.prefix = prefix

    def forward(self, q, k, v, fg):
        c = gate(fg)
        T = q.shape[-2]
        j = torch.arange(T)
        keep = torch.ones(T, T, dtype=torch.bool).tril() | (j[None, :] < self.prefix)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
        return s.masked_fill(~keep, NEG).softmax(-1) @ v


class PrefixFromLength(torch.nn.Module):              # prefix from the length: the first T // 4 keys bidirectional
    def forward(self, q, k, v, fg):
        c = gate(fg)
        T = q.shape[-2]
        keep = torch.ones(T, T, dtype=torch.bool).tril()
        keep[:, : T // 4] = True
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
        return s.masked_fill(~keep, NEG).softmax(-1) @ v


class WindowKVCache(torch.nn.Module):                 # window with a cache: Tq queries are the last of Tk
    def __init__(self, window=24):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, fg):
        c = gate(fg)
        Tq, Tk = q.shape[-2], k.shape[-2]
        i = torch.arange(Tq)[:, None] + (Tk - Tq)
        j = torch.arange(Tk)[None, :]
        keep = (j <= i) & (i - j < self.window)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., Tk - Tq:, None] - c[..., None, :]
        return s.masked_fill(~keep, NEG).softmax(-1) @ v


SIZE_MASKS = [WindowArange, WindowWhereTril, WindowAdditive, WindowSDPA, WindowFinfoMin, WindowConstant,
              WindowWithSinks, WindowSinkItem, PrefixLM, PrefixFromLength]
# (compile length, later lengths); the window is 24: the first lengths are at or below it, where it is causal
LENGTHS = {False: (16, 40, 9), None: (16, 20, 40, 64, 9, 24), True: (16, 24, 40, 70, 9)}


@pytest.mark.parametrize("dynamic", [False, None, True], ids=["static", "auto", "dynamic"])
@pytest.mark.parametrize("cls", SIZE_MASKS, ids=lambda c: c.__name__)
def test_size_dependent_masks_at_every_length(cls, dynamic):
    calls = [inputs(T) for T in LENGTHS[dynamic]]
    out = run_and_compare(cls, calls, dynamic=dynamic, log_eps=None, grad_argnums=(0, 1, 2, 3))
    check(out, "2-size-dependent-masks", cls.__name__, cls, f"dynamic={dynamic}, lengths={LENGTHS[dynamic]}")


@pytest.mark.parametrize("cls", [WindowArange, WindowSDPA, WindowWithSinks], ids=lambda c: c.__name__)
def test_size_dependent_masks_pruned(cls):
    lengths = (16, 20, 80, 150)
    calls = [inputs(T) for T in lengths]
    out = run_and_compare(cls, calls, dynamic=None, log_eps=-10.0)
    check(out, "2-size-dependent-masks", cls.__name__, cls, f"dynamic=None, log_eps=-10, lengths={lengths}")


@pytest.mark.parametrize("dynamic", [None, True], ids=["auto", "dynamic"])
def test_window_kv_cache_at_every_length(dynamic):
    shapes = [(12, 20), (6, 20), (10, 60), (1, 70), (30, 30)]      # (Tq, Tk)
    calls = [inputs(Tk, Tq=Tq) for Tq, Tk in shapes]
    out = run_and_compare(WindowKVCache, calls, dynamic=dynamic, log_eps=None, grad_argnums=(0, 1, 2, 3))
    check(out, "2-size-dependent-masks", "WindowKVCache", WindowKVCache, f"dynamic={dynamic}, (Tq,Tk)={shapes}")


@pytest.mark.parametrize("dynamic", [False, None, True], ids=["static", "auto", "dynamic"])
def test_window_attribute_changed_between_calls(dynamic):
    # the window is a module attribute edited between calls: first huge (causal at every length), then small
    def edit(eager_m, compiled_m, n):
        if n == 2:
            eager_m.window = compiled_m.window = 5
    calls = [inputs(T) for T in (16, 20, 20, 30)]
    out = run_and_compare(lambda: WindowArange(window=1000), calls, dynamic=dynamic, between_calls=edit)
    check(out, "2-size-dependent-masks", "WindowArange(window edited)", WindowArange, f"dynamic={dynamic}, window 1000 -> 5 before call 2")


# =============================================================== family 3: masks as inputs, buffers
def pad_causal(q, k, v, fg, pad):                     # pad: (B, T) bool key padding, a graph input
    c = gate(fg)
    T = q.shape[-2]
    keep = torch.ones(T, T, dtype=torch.bool).tril() & pad[:, None, None, :]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def pad_where_separate(q, k, v, fg, pad):
    c = gate(fg)
    T = q.shape[-2]
    s = torch.matmul(q, k.mT) * q.shape[-1] ** -0.5 + c.unsqueeze(-1) - c.unsqueeze(-2)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    s = torch.where(pad[:, None, None, :], s, NEG)
    return s.softmax(-1) @ v


def pad_sdpa_float(q, k, v, fg, pad):                 # padding as a float mask input added to the SDPA bias
    c = gate(fg)
    T = q.shape[-2]
    bias = (c[..., :, None] - c[..., None, :]).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    add = torch.zeros(pad.shape).masked_fill(~pad, NEG)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias + add[:, None, None, :])


def full_mask_input(q, k, v, fg, keep):               # the whole (T, T) keep mask is an input
    c = gate(fg)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def additive_mask_input(q, k, v, fg, m):              # an additive float (T, T) mask is an input
    c = gate(fg)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + m + c[..., :, None] - c[..., None, :]
    return s.softmax(-1) @ v


def _pad(B, T, n, seed):
    """All-ones on some calls, zeros at random key positions (never key 0, so every row sees a key) on others."""
    g = torch.Generator().manual_seed(seed + 7 * n)
    pad = torch.ones(B, T, dtype=torch.bool)
    if n % 3 != 0:
        pad[:, 1:] = torch.rand(B, T - 1, generator=g) > 0.35
    return pad


def _keep(T, n, seed, kind):
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    if n % 3 != 0:
        g = torch.Generator().manual_seed(seed + 11 * n)
        if kind == "padded":
            keep &= torch.rand(T, generator=g) > 0.3
            keep[:, 0] = True
        else:                                          # "future": a few keys past the diagonal opened
            keep |= torch.rand(T, T, generator=g) > 0.9
    return keep


PAD_PROGRAMS = [pad_causal, pad_where_separate, pad_sdpa_float]


@pytest.mark.parametrize("dynamic", [False, None, True], ids=["static", "auto", "dynamic"])
@pytest.mark.parametrize("fn", PAD_PROGRAMS, ids=lambda f: f.__name__)
def test_fresh_padding_mask_every_call(fn, dynamic):
    T0 = 24

    def make(n):
        T = T0 if dynamic is False or n < 14 else (31 if n % 2 else 17)
        return inputs(T, seed=n) + [_pad(2, T, n, seed=5)]
    out = run_and_compare(lambda: fn, (20, make), dynamic=dynamic, log_eps=None,
                          grad_argnums=(0, 1, 2, 3) if fn is pad_causal else ())
    check(out, "3-mask-inputs", fn.__name__, fn, f"dynamic={dynamic}, 20 calls, fresh pad each call (see _pad)")


@pytest.mark.parametrize("kind", ["padded", "future"])
@pytest.mark.parametrize("fn", [full_mask_input, additive_mask_input], ids=lambda f: f.__name__)
def test_fresh_full_mask_every_call(fn, kind):
    def make(n):
        keep = _keep(24, n, 3, kind)
        m = keep if fn is full_mask_input else torch.zeros(24, 24).masked_fill(~keep, NEG)
        return inputs(24, seed=n) + [m]
    out = run_and_compare(lambda: fn, (20, make), dynamic=None, log_eps=None)
    check(out, "3-mask-inputs", fn.__name__, fn, f"dynamic=None, 20 calls, fresh {kind} mask each call")


@pytest.mark.parametrize("fn", [pad_causal, full_mask_input], ids=lambda f: f.__name__)
def test_mask_input_edited_in_place_between_calls(fn):
    T = 24
    mask = torch.ones(2, T, dtype=torch.bool) if fn is pad_causal else torch.ones(T, T, dtype=torch.bool).tril()
    base = inputs(T)

    def make(n):
        if n == 2:
            if fn is pad_causal:
                mask[:, 5:9] = False
            else:
                mask[10:, 15] = True                   # open a future key for some rows
        if n == 4:
            mask.fill_(True) if fn is pad_causal else mask.copy_(torch.ones(T, T, dtype=torch.bool).tril())
        if n == 5:
            mask[:, 3] = False if fn is pad_causal else True
        return base + [mask]
    out = run_and_compare(lambda: fn, (7, make), dynamic=None, log_eps=None, clone_args=False)
    check(out, "3-mask-inputs", f"{fn.__name__} (edited in place)", fn, "dynamic=None, one mask tensor edited between calls")


class BufferMask(torch.nn.Module):                    # the causal mask as a module buffer
    def __init__(self, T=24):
        super().__init__()
        self.register_buffer("keep", torch.ones(T, T, dtype=torch.bool).tril())

    def forward(self, q, k, v, fg):
        c = gate(fg)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
        return s.masked_fill(~self.keep, NEG).softmax(-1) @ v


class AttrMask(torch.nn.Module):                      # a plain tensor attribute (not a buffer)
    def __init__(self, T=24):
        super().__init__()
        self.mask = torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)

    def forward(self, q, k, v, fg):
        c = gate(fg)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + self.mask + c[..., :, None] - c[..., None, :]
        return s.softmax(-1) @ v


def _edit_buffer(how):
    def edit(eager_m, compiled_m, n):
        for m in (eager_m, compiled_m):
            T = 24
            if isinstance(m, BufferMask):
                if how == "replace" and n == 2:
                    m.keep = torch.ones(T, T, dtype=torch.bool).tril() | (torch.arange(T)[None, :] < 4)
                elif how == "inplace" and n == 2:
                    m.keep[:, :4] = True
                elif how == "inplace" and n == 4:
                    m.keep.copy_(torch.ones(T, T, dtype=torch.bool).tril())
                elif how == "inplace" and n == 5:
                    m.keep.fill_(True)
            else:
                if how == "replace" and n == 2:
                    m.mask = torch.zeros(T, T)
                elif how == "inplace" and n == 2:
                    m.mask[:, :4] = 0.0
                elif how == "inplace" and n == 4:
                    m.mask.zero_()
    return edit


@pytest.mark.parametrize("how", ["replace", "inplace"])
@pytest.mark.parametrize("cls", [BufferMask, AttrMask], ids=lambda c: c.__name__)
def test_module_mask_replaced_or_edited(cls, how):
    calls = [inputs(24, seed=n) for n in range(7)]
    out = run_and_compare(cls, calls, dynamic=None, log_eps=None, between_calls=_edit_buffer(how))
    check(out, "3-mask-inputs", f"{cls.__name__} ({how})", cls, f"dynamic=None, mask {how} before calls 2/4/5")


# =============================================================== family 4: shapes; the pass never raises
def odd_fox(q, k, v, fg):                             # generic FoX over (..., Tq, D) / (..., Tk, D), any Tq <= Tk
    c = gate(fg)
    Tq, Tk = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., Tk - Tq:, None] - c[..., None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def sdpa_fox(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    bias = torch.where(torch.ones(T, T, dtype=torch.bool).tril(), c[..., :, None] - c[..., None, :], NEG)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def q_longer_than_k(q, k, v, fg):                     # Tq > Tk by slicing k and v: rows see keys j <= i
    T = q.shape[-2]
    k, v = k[:, :, : T // 2], v[:, :, : T // 2]
    c = gate(fg)
    Tk = k.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :Tk]
    keep = torch.ones(T, Tk, dtype=torch.bool).tril()
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def three_d(q, k, v, fg):                             # (B*H, T, D) inputs with torch.matmul, no 4D at all
    q, k, v, fg = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), fg.flatten(0, 1)
    c = gate(fg)
    T = q.shape[-2]
    s = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1]) + c[:, :, None] - c[:, None, :]
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v


def gqa_dv(q, k, v, fg):                              # GQA by repeat_interleave with Dv != D
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return odd_fox(q, k, v, fg)


SHAPES = [
    ("dv_gt_d", odd_fox, dict(D=8, Dv=12)),
    ("dv_lt_d", odd_fox, dict(D=16, Dv=4)),
    ("dv_1", odd_fox, dict(D=8, Dv=1)),
    ("d_1", odd_fox, dict(D=1)),
    ("d_odd_7_dv_3", odd_fox, dict(D=7, Dv=3)),
    ("d_odd_5", odd_fox, dict(D=5)),
    ("sdpa_dv_ne_d", sdpa_fox, dict(D=8, Dv=6)),
    ("kv_cache_dv_ne_d", odd_fox, dict(Tq=7, D=8, Dv=10)),
    ("gqa_dv_ne_d", gqa_dv, dict(Hq=4, Hkv=2, D=8, Dv=5)),
    ("q_longer_than_k", q_longer_than_k, dict()),
    ("three_d", three_d, dict()),
    ("three_d_dv_ne_d", three_d, dict(D=4, Dv=9)),
]


@pytest.mark.parametrize("dynamic", [False, None, True], ids=["static", "auto", "dynamic"])
@pytest.mark.parametrize("name,fn,shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_odd_shapes_never_raise(name, fn, shape, dynamic):
    lengths = (24, 37, 13)
    calls = []
    for T in lengths:
        sh = dict(shape)
        if "Tq" in sh:
            sh["Tq"] = min(sh["Tq"], T)
        calls.append(inputs(T, **sh))
    if fn is q_longer_than_k:                          # fg covers the queries (T); keys are the first T // 2
        pass
    out = run_and_compare(lambda: fn, calls, dynamic=dynamic, log_eps=None, grad_argnums=(0, 1, 2, 3))
    check(out, "4-exceptions-and-shapes", name, fn, f"dynamic={dynamic}, shape={shape}, T={lengths}")
