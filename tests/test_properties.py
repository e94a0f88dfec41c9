"""Property tests of the ACP guarantee (DESIGN.md section 2) over random shapes, gates and scales.

  (a) the dense attention mass that the plan skips in each row is at most eps = exp(log_eps)
  (b) the op's output differs from dense fp64 attention by at most 2 * eps * max_j ||v_j|| + rounding
  (c) log_eps None and -inf skip nothing, agree bitwise, and equal dense attention up to rounding
  (d) a stricter threshold (smaller log_eps) never skips a tile that a looser one kept
  (e) gradients for q, k, v and the log forget gate through the API match the fp64 reference
Gates are monotone (c = cumsum of negative log f), a random walk (not monotone) or mixed
local/global heads; the tests that must prune check the skipped fraction, not only the output.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import acp_compile
from acp_compile.kernels import blocked
from acp_compile.kernels.plan import kept_entries, kept_tiles, make_plan, skipped_fraction
from acp_compile.kernels.reference import (
    attention_probs, causal_mask, fox_attention_reference, recorded_entries, row_dropped_mass,
)
from helpers import fox_inputs

ROUNDING = {torch.float32: 3e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@st.composite
def problems(draw, max_t=200, dtypes=(torch.float32,)):
    """A random FoX problem: shapes with odd T, D in 1..128, GQA groups, Tq <= Tk; gate and scales."""
    Hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    Tk = draw(st.integers(1, max_t))
    Tq = draw(st.one_of(st.just(Tk), st.integers(1, Tk)))
    D = draw(st.one_of(st.sampled_from([16, 32, 64, 80, 96, 128]), st.integers(1, 128)))
    return dict(
        B=draw(st.integers(1, 2)), Hq=Hkv * group, Hkv=Hkv, Tq=Tq, Tk=Tk, D=D,
        dtype=draw(st.sampled_from(dtypes)),
        strength=draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0, 3.0])),
        qk_scale=draw(st.sampled_from([0.1, 0.5, 1.0, 2.0])),
        gate=draw(st.sampled_from(["monotone", "walk", "mixed"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def row_skipped_mass(q, k, c, plan, scale):
    """Dense fp64 probability mass of the causal entries the plan skips, per row: (B, Hq, Tq)."""
    Tq, Tk = q.shape[2], k.shape[2]
    p = attention_probs(q, k, c, scale)
    skipped = causal_mask(Tq, Tk) & ~kept_entries(plan, Tq, Tk)
    return (p * skipped).sum(-1)


def max_v_norm_per_head(v, Hq):
    """max_j ||v_j|| for each (batch, query head): (B, Hq, 1, 1)."""
    norms = v.double().norm(dim=-1).amax(-1)                                  # (B, Hkv)
    return norms.repeat_interleave(Hq // v.shape[1], dim=1)[..., None, None]


@settings(max_examples=40)
@given(problems(), st.floats(-12.0, -0.5), st.sampled_from([4, 8, 16, 64]), st.sampled_from([4, 8, 16, 64]))
def test_a_skipped_mass_of_every_row_is_at_most_eps(prob, log_eps, bm, bn):
    q, k, v, c = fox_inputs(**prob)
    scale = 1 / math.sqrt(prob["D"])
    plan = make_plan(q, k, c, scale, log_eps, None, bm, bn)
    mass = row_skipped_mass(q, k, c, plan, scale)
    assert mass.max() <= math.exp(log_eps) * (1 + 1e-5)


def in_storage(q, k, v, c, storage):
    """The same values in (B, T, H, D) / (B, T, H) storage seen as (B, H, T, D) / (B, H, T), if asked."""
    if storage == "bhtd":
        return q, k, v, c
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v, c.transpose(1, 2).contiguous().transpose(1, 2)


@settings(max_examples=30)
@given(problems(dtypes=(torch.float32, torch.float16, torch.bfloat16)), st.floats(-12.0, -1.0),
       st.sampled_from(["bhtd", "bthd"]))
def test_b_op_output_within_eps_bound_of_dense(prob, log_eps, storage):
    q, k, v, c = in_storage(*fox_inputs(**prob), storage)
    o, lse, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None)
    o_dense, _ = fox_attention_reference(q, k, v, c)
    vmax = max_v_norm_per_head(v, prob["Hq"])
    bound = 2 * math.exp(log_eps) * vmax + ROUNDING[prob["dtype"]] * torch.clamp(vmax, min=1.0)
    err = (o.double() - o_dense).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@settings(max_examples=30)
@given(problems(max_t=120), st.floats(-8.0, -1.0), st.sampled_from([4, 8, 16]))
def test_b_blocked_small_tiles_within_eps_bound_and_equal_to_pruned_reference(prob, log_eps, block):
    """Small tiles make pruning frequent even at short T: check against dense (bound) and pruned (tight)."""
    q, k, v, c = fox_inputs(**prob)
    scale = 1 / math.sqrt(prob["D"])
    plan = make_plan(q, k, c, scale, log_eps, None, block, block)
    o, _ = blocked.forward(q, k, v, c, scale, plan)
    o_dense, _ = fox_attention_reference(q, k, v, c, scale)
    o_pruned, _ = fox_attention_reference(q, k, v, c, scale, keep=kept_entries(plan, prob["Tq"], prob["Tk"]))
    vmax = max_v_norm_per_head(v, prob["Hq"])
    assert ((o.double() - o_dense).abs() <= 2 * math.exp(log_eps) * vmax + 3e-5 * vmax.clamp(min=1)).all()
    assert ((o.double() - o_pruned).abs() <= 3e-5 * vmax.clamp(min=1)).all()


@settings(max_examples=15)
@given(problems())
def test_c_no_pruning_is_dense_and_none_equals_minus_inf_bitwise(prob):
    q, k, v, c = fox_inputs(**prob)
    o_none, lse_none, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, None, None)
    o_inf, lse_inf, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, float("-inf"), None)
    assert torch.equal(o_none, o_inf) and torch.equal(lse_none, lse_inf)
    scale = 1 / math.sqrt(prob["D"])
    for log_eps in (None, float("-inf")):
        plan = make_plan(q, k, c, scale, log_eps, None, blocked.BLOCK_M, blocked.BLOCK_N)
        assert (plan.start == 0).all()
    o_dense, lse_dense = fox_attention_reference(q, k, v, c)
    vmax = max_v_norm_per_head(v, prob["Hq"]).clamp(min=1)
    assert ((o_none.double() - o_dense).abs() <= 3e-5 * vmax).all()
    torch.testing.assert_close(lse_none.double(), lse_dense, rtol=1e-5, atol=1e-5)


@settings(max_examples=40)
@given(problems(), st.floats(-20.0, 0.0), st.floats(-20.0, 0.0), st.sampled_from([4, 16, 64]))
def test_d_stricter_threshold_never_skips_a_kept_tile(prob, eps_a, eps_b, block):
    q, k, v, c = fox_inputs(**prob)
    strict, loose = min(eps_a, eps_b), max(eps_a, eps_b)
    scale = 1 / math.sqrt(prob["D"])
    kept_strict = kept_tiles(make_plan(q, k, c, scale, strict, None, block, block))
    kept_loose = kept_tiles(make_plan(q, k, c, scale, loose, None, block, block))
    assert not (kept_loose & ~kept_strict).any()


@settings(max_examples=12)
@given(problems(max_t=150), st.sampled_from([-10.0, -4.0, None]), st.sampled_from(["online", "paper"]))
def test_e_gradients_through_the_api_match_the_reference(prob, log_eps, certificate):
    q, k, v, c = fox_inputs(**prob)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros(*c.shape[:2], 1))
    leaves = [t.detach().requires_grad_() for t in (q, k, v, log_f)]
    o = acp_compile.fox_attention(*leaves, log_eps=log_eps, certificate=certificate)
    do = torch.randn_like(o)
    o.backward(do)
    scale = 1 / math.sqrt(prob["D"])
    c32 = torch.cumsum(log_f, -1, dtype=torch.float32)                     # what the API computes
    # The kept set the forward recorded (the backward computes exactly that set).
    keep_from = torch.ops.acp.fox_attention_fwd(q, k, v, c32, None, log_eps, None, certificate=certificate)[3]
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, log_f)]
    o_ref, _ = fox_attention_reference(
        *ref_leaves[:3], torch.cumsum(ref_leaves[3], -1), scale, keep=recorded_entries(keep_from, prob["Tk"]),
    )
    o_ref.backward(do.double())
    for name, got, want in zip(("dq", "dk", "dv", "dlog_f"), leaves, ref_leaves):
        err = (got.grad.double() - want.grad).abs().max().item()
        scale_ref = max(want.grad.abs().max().item(), 1.0)
        # The log-gate gradient is a reverse cumulative sum over up to T positions: allow for it.
        tol = 2e-4 * (math.sqrt(prob["Tk"]) if name == "dlog_f" else 1.0)
        assert err <= tol * scale_ref, f"{name}: {err:.3g} > {tol:.1g} * {scale_ref:.3g}"


@pytest.mark.parametrize("gate", ["monotone", "walk"])
@pytest.mark.parametrize("log_eps", [-10.0, -3.0])
def test_strong_decay_really_prunes_and_keeps_the_bound(gate, log_eps):
    """T = 3 blocks of the blocked path, strong decay: many tiles skipped, both bounds still hold."""
    q, k, v, c = fox_inputs(1, 4, 2, 200, 200, 32, strength=1.0, qk_scale=0.5, gate=gate, seed=11)
    scale = 1 / math.sqrt(32)
    plan = make_plan(q, k, c, scale, log_eps, None, blocked.BLOCK_M, blocked.BLOCK_N)
    assert skipped_fraction(plan).mean() >= (0.3 if gate == "monotone" else 0.2), "the case must prune"
    assert row_skipped_mass(q, k, c, plan, scale).max() <= math.exp(log_eps)
    o, _, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None)
    o_dense, _ = fox_attention_reference(q, k, v, c)
    vmax = max_v_norm_per_head(v, 4)
    assert ((o.double() - o_dense).abs() <= 2 * math.exp(log_eps) * vmax + 3e-5 * vmax).all()


def test_user_bound_that_holds_keeps_the_guarantee():
    """A caller's U (here from the true per-head maxima, which bound |scale q.k|) prunes safely."""
    q, k, v, c = fox_inputs(1, 2, 2, 200, 200, 16, strength=0.5, qk_scale=0.3, seed=12)
    scale = 0.25
    u = (scale * q.norm(dim=-1).amax(-1) * k.norm(dim=-1).amax(-1)) * 1.01     # (B, Hq), a valid bound
    plan = make_plan(q, k, c, scale, -6.0, u, blocked.BLOCK_M, blocked.BLOCK_N)
    assert skipped_fraction(plan).mean() > 0.2
    assert row_skipped_mass(q, k, c, plan, scale).max() <= math.exp(-6.0)
    o, _, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, scale, -6.0, u, certificate="paper")
    o_pruned, _ = fox_attention_reference(q, k, v, c, scale, keep=kept_entries(plan, 200, 200))
    assert (o.double() - o_pruned).abs().max() < 3e-5 * max_v_norm_per_head(v, 2).max()


@settings(max_examples=30)
@given(problems(max_t=120), st.floats(-12.0, -0.5), st.sampled_from([4, 16, 64]), st.sampled_from([4, 16, 64]),
       st.sampled_from(["left", "right", "holes", "docs", "docs_left"]), st.integers(0, 2**16))
def test_f_padded_and_packed_rows_keep_the_eps_bound(prob, log_eps, bm, bn, kind, seg_seed):
    """(a) and (b) with a key mask and packed documents (kernels/segments.py): the skipped mass of every
    row of the masked attention is at most eps, and the blocked output is within 2 eps max ||v|| of it."""
    from acp_compile.kernels.reference import logits
    from acp_compile.kernels.segments import make_segments
    from segment_cases import segment_inputs

    q, k, v, c = fox_inputs(**prob)
    Tq, Tk = prob["Tq"], prob["Tk"]
    key_mask, doc = segment_inputs(kind, prob["B"], Tk, seed=seg_seed)
    seg = make_segments(key_mask, doc, Tq, Tk)
    scale = 1 / math.sqrt(prob["D"])
    plan = make_plan(q, k, c, scale, log_eps, None, bm, bn, seg)
    s = logits(q, k, c, scale, key_mask, doc)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                              # rows with no visible key: 0
    mass = (p * ~kept_entries(plan, Tq, Tk)).sum(-1)
    assert mass.max() <= math.exp(log_eps) * (1 + 1e-5)
    o, _ = blocked.forward(q, k, v, c, scale, plan, seg)
    ro, _ = fox_attention_reference(q, k, v, c, scale, key_mask=key_mask, doc=doc)
    bound = 2 * math.exp(log_eps) * max_v_norm_per_head(v, prob["Hq"]) + ROUNDING[torch.float32] * (1 + ro.abs().amax())
    assert ((o.double() - ro).abs() <= bound).all()


# ---- The online certificate (DESIGN.md 1.1): checked on the fp64 reference, per row --------------------

def adversarial(prob, resets, huge_key):
    """fox_inputs, then hard resets (log f = -30 or -1e6 at random positions: c not smooth) and/or one old
    key of huge norm aligned with the mean query (the case where a per-head max norm is loose)."""
    q, k, v, c = fox_inputs(**prob)
    g = torch.Generator().manual_seed(prob["seed"] + 1)
    Tk = prob["Tk"]
    if resets:
        log_f = torch.diff(c, dim=-1, prepend=torch.zeros(*c.shape[:2], 1))
        at = torch.randint(0, Tk, (resets,), generator=g)
        log_f[..., at] = torch.tensor([-30.0, -1e6])[torch.randint(0, 2, (resets,), generator=g)]
        c = torch.cumsum(log_f, dim=-1)
    if huge_key and Tk > 1:
        j = int(torch.randint(0, max(1, Tk // 3), (1,), generator=g))
        direction = q.mean(dim=(1, 2))                                   # (B, D)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        k[:, :, j] = direction[:, None, :] * 20.0 * math.sqrt(prob["D"])
    return q, k, v, c


def certified(q, k, v, c, scale, log_eps, bm, bn, dtype=torch.float64):
    """(o, lse, keep_from) of the blocked online forward on the inputs cast to dtype."""
    from acp_compile.kernels import blocked_certified
    from acp_compile.kernels.certificate import cert_stats, keep_from_rows
    q, k, v = (t.to(dtype) for t in (q, k, v))
    c = c.to(torch.float64 if dtype == torch.float64 else torch.float32)
    o, lse, start = blocked_certified.forward(q, k, v, c, scale, log_eps, cert_stats(q, k, c, scale, bn), bm)
    return o, lse, keep_from_rows(start, q.shape[2], bm, bn)


@settings(max_examples=40, deadline=None)
@given(problems(max_t=160), st.floats(-14.0, -0.5), st.sampled_from([4, 8, 16]), st.sampled_from([4, 8, 16]),
       st.integers(0, 3), st.booleans())
def test_f_online_dropped_mass_of_every_row_is_at_most_eps(prob, log_eps, bm, bn, resets, huge_key):
    """fp64 inputs: the guarantee itself (dropped mass <= eps of the full denominator) for monotone,
    random-walk and mixed gates, hard resets and a huge aligned old key; and the output is exactly the
    attention over the recorded kept set."""
    q, k, v, c = adversarial(prob, resets, huge_key)
    scale = 1 / math.sqrt(prob["D"])
    o, lse, keep_from = certified(q, k, v, c.double(), scale, log_eps, bm, bn)
    keep = recorded_entries(keep_from, prob["Tk"])
    dropped = row_dropped_mass(q.double(), k.double(), c.double(), keep, scale)
    assert dropped.max() <= math.exp(log_eps) * (1 + 1e-9), f"row lost {dropped.max().item():.3g}"
    o_kept, lse_kept = fox_attention_reference(q, k, v, c.double(), scale, keep=keep)
    assert (o - o_kept).abs().max() <= 1e-9 * max(1.0, o_kept.abs().max().item())
    assert (lse.double() - lse_kept).abs().max() <= 1e-5 * max(1.0, lse_kept.abs().max().item())


@settings(max_examples=25, deadline=None)
@given(problems(max_t=120), st.floats(-20.0, 0.0), st.floats(-20.0, 0.0), st.sampled_from([4, 16]), st.integers(0, 2))
def test_g_online_stricter_eps_never_skips_what_a_looser_one_kept(prob, eps_a, eps_b, block, resets):
    """Both visit key blocks in the same order and compare the same visited mass against the same bound,
    so the stricter eps stops at the same boundary or later (older)."""
    q, k, v, c = adversarial(prob, resets, False)
    scale = 1 / math.sqrt(prob["D"])
    strict, loose = min(eps_a, eps_b), max(eps_a, eps_b)
    kf_strict = certified(q, k, v, c, scale, strict, block, block)[2]
    kf_loose = certified(q, k, v, c, scale, loose, block, block)[2]
    assert (kf_strict <= kf_loose).all()


@settings(max_examples=15, deadline=None)
@given(problems(max_t=120), st.sampled_from([4, 16]))
def test_h_online_eps_to_zero_is_dense(prob, block):
    """With finite logits of bounded spread, log_eps = -1e4 keeps every entry."""
    q, k, v, c = fox_inputs(**prob)
    scale = 1 / math.sqrt(prob["D"])
    assert (certified(q, k, v, c, scale, -1e4, block, block)[2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_online_op_in_low_precision_keeps_the_bound_and_beats_the_paper_rule(dtype):
    """The op (blocked path, 64x64 tiles) on W1-like decaying heads with larger norms: rows lose at most
    eps (up to the rounding of the visited mass), and the online rule skips more than the paper rule."""
    q, k, v, c = fox_inputs(1, 4, 2, 600, 700, 32, strength=0.3, qk_scale=1.5, gate="mixed", seed=3, dtype=dtype)
    log_eps = -8.0
    kept = {}
    for certificate in ("online", "paper"):
        _, _, _, keep_from = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None, certificate=certificate)
        kept[certificate] = recorded_entries(keep_from, 700)
        dropped = row_dropped_mass(q.double(), k.double(), c.double(), kept[certificate], 1 / math.sqrt(32))
        assert dropped.max() <= math.exp(log_eps) * 1.05
    assert kept["online"].sum() < 0.9 * kept["paper"].sum(), (kept["online"].sum(), kept["paper"].sum())


@settings(max_examples=25, deadline=None)
@given(problems(max_t=120), st.floats(-12.0, -0.5), st.sampled_from([4, 16]), st.sampled_from([4, 16]),
       st.sampled_from(["left", "right", "holes", "docs", "docs_left"]), st.integers(0, 2**16))
def test_i_online_padded_and_packed_rows_keep_the_eps_bound(prob, log_eps, bm, bn, kind, seg_seed):
    """The online certificate with a key mask and packed documents: every row of the masked attention
    drops at most eps, and the output is the masked attention over exactly the recorded kept set."""
    from acp_compile.kernels import blocked_certified
    from acp_compile.kernels.certificate import cert_stats, keep_from_rows
    from acp_compile.kernels.reference import logits
    from acp_compile.kernels.segments import make_segments
    from segment_cases import segment_inputs

    q, k, v, c = (t.double() for t in fox_inputs(**prob))
    Tq, Tk = prob["Tq"], prob["Tk"]
    key_mask, doc = segment_inputs(kind, prob["B"], Tk, seed=seg_seed)
    seg = make_segments(key_mask, doc, Tq, Tk)
    scale = 1 / math.sqrt(prob["D"])
    o, lse, start = blocked_certified.forward(q, k, v, c, scale, log_eps, cert_stats(q, k, c, scale, bn), bm, seg)
    keep = recorded_entries(keep_from_rows(start, Tq, bm, bn), Tk)
    p = torch.softmax(logits(q, k, c, scale, key_mask, doc), dim=-1).nan_to_num(0.0)
    assert (p * ~keep).sum(-1).max() <= math.exp(log_eps) * (1 + 1e-9)
    ro, _ = fox_attention_reference(q, k, v, c, scale, keep=keep, key_mask=key_mask, doc=doc)
    assert (o - ro).abs().max() <= 1e-9 * max(1.0, ro.abs().max().item())
