"""The torch ACP plan against a brute-force evaluation of its definition (kernels/plan.py header)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from acp_compile.kernels.plan import (
    causal_last_key_block, kept_entries, kept_tiles, make_plan, skipped_fraction, head_delta, torch_qk_bound,
)
from acp_compile.kernels.reference import causal_mask
from helpers import fox_inputs


def brute_force_plan(q, k, c, scale, log_eps, bm, bn):
    """start, end, n_hi and kept tiles from the definitions, entry by entry, in fp64."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g, off = Hq // Hkv, Tk - Tq
    Mq, Nk = -(-Tq // bm), -(-Tk // bn)
    n_hi = [(off + min((m + 1) * bm, Tq) - 1) // bn for m in range(Mq)]
    start = torch.zeros(B, Hq, Mq, dtype=torch.int32)
    kept = torch.zeros(B, Hq, Mq, Nk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            u = scale * q[b, h].double().norm(dim=-1).max() * k[b, h // g].double().norm(dim=-1).max()
            delta = log_eps - math.log(Tk) - 2 * float(u)
            for m in range(Mq):
                rows = range(m * bm, min((m + 1) * bm, Tq))
                n = 0
                while n <= n_hi[m]:
                    cols = range(n * bn, min((n + 1) * bn, Tk))
                    tile_max = max(float(c[b, h, off + i]) - float(c[b, h, j]) for i in rows for j in cols)
                    if tile_max >= delta:
                        break
                    n += 1
                start[b, h, m] = n
                kept[b, h, m, n:n_hi[m] + 1] = True
    end = torch.zeros(B, Hq, Nk, dtype=torch.int32)
    for n in range(Nk):
        has = kept[..., :, n]
        idx = torch.arange(1, Mq + 1, dtype=torch.int32)
        end[..., n] = (has.to(torch.int32) * idx).amax(-1)
    return start, end, torch.tensor(n_hi, dtype=torch.int32), kept


CASES = [
    # B, Hq, Hkv, Tq, Tk, D, bm, bn, strength, gate
    (1, 2, 2, 50, 50, 8, 8, 8, 1.0, "monotone"),
    (2, 4, 2, 37, 61, 5, 8, 16, 0.8, "monotone"),
    (1, 3, 1, 29, 90, 4, 16, 4, 2.0, "walk"),
    (1, 2, 1, 9, 70, 6, 4, 8, 1.5, "walk"),
    (1, 2, 2, 1, 40, 3, 16, 16, 3.0, "monotone"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,bm,bn,strength,gate", CASES)
def test_plan_matches_brute_force(B, Hq, Hkv, Tq, Tk, D, bm, bn, strength, gate):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, strength=strength, gate=gate, qk_scale=0.3, seed=Tq * Tk)
    scale = 1 / math.sqrt(D)
    plan = make_plan(q, k, c, scale, -6.0, None, bm, bn)
    start, end, n_hi, kept = brute_force_plan(q, k, c, scale, -6.0, bm, bn)
    assert torch.equal(plan.n_hi, n_hi)
    assert torch.equal(plan.start, start)
    assert torch.equal(plan.end, end)
    assert torch.equal(kept_tiles(plan), kept)
    assert plan.start.dtype == plan.end.dtype == plan.n_hi.dtype == torch.int32
    assert plan.delta.shape == (B, Hq) and plan.delta.dtype == torch.float32
    if strength >= 1.0:
        assert start.sum() > 0, "this case is meant to prune: the test would not exercise skipping"


def test_monotone_gate_skips_exactly_the_tiles_below_threshold():
    """For a non-increasing c the prefix rule loses nothing: kept == causal and not below delta."""
    q, k, v, c = fox_inputs(2, 2, 1, 100, 100, 8, strength=0.7, qk_scale=0.3, seed=5)
    plan = make_plan(q, k, c, 0.35, -8.0, None, 16, 8)
    tiles = kept_tiles(plan)
    c_rows = c.view(2, 2, -1)
    Mq, Nk = tiles.shape[-2:]
    for m in range(Mq):
        for n in range(int(plan.n_hi[m]) + 1):
            below = (c_rows[..., min((m * 16), 99)] - c_rows[..., min((n + 1) * 8, 100) - 1]) < plan.delta
            assert torch.equal(tiles[..., m, n], ~below)
    assert skipped_fraction(plan).min() > 0.3


def test_diagonal_tiles_are_never_skipped():
    q, k, v, c = fox_inputs(1, 4, 4, 77, 130, 8, strength=20.0, qk_scale=0.01, seed=6)
    plan = make_plan(q, k, c, 0.1, -1.0, None, 16, 16)
    assert (plan.start <= plan.n_hi).all()
    rows = torch.arange(77) + (130 - 77)
    entries = kept_entries(plan, 77, 130)
    assert entries[..., torch.arange(77), rows].all()                      # every diagonal entry kept
    assert skipped_fraction(plan).min() > 0.5


def test_kept_entries_respects_causality_and_tiles():
    q, k, v, c = fox_inputs(1, 1, 1, 20, 33, 4, strength=2.0, seed=7)
    plan = make_plan(q, k, c, 0.5, -3.0, None, 8, 8)
    e = kept_entries(plan, 20, 33)[0, 0]
    assert not (e & ~causal_mask(20, 33)).any()
    tiles = kept_tiles(plan)[0, 0]
    for i in range(20):
        for j in range(33):
            assert bool(e[i, j]) == (bool(tiles[i // 8, j // 8]) and j <= 13 + i)


@pytest.mark.parametrize("log_eps", [None, float("-inf")])
def test_pruning_off_keeps_every_causal_tile(log_eps):
    q, k, v, c = fox_inputs(1, 2, 2, 70, 70, 8, strength=50.0, seed=8)
    plan = make_plan(q, k, c, 0.3, log_eps, None, 8, 8)
    assert torch.isneginf(plan.delta).all()
    assert (plan.start == 0).all()
    assert (skipped_fraction(plan) == 0).all()


def test_threshold_formula_and_user_bound():
    q, k, v, c = fox_inputs(2, 4, 2, 10, 30, 8, seed=9)
    u = torch_qk_bound(q, k, 0.25)
    expected_u = 0.25 * q.norm(dim=-1).amax(-1) * k.norm(dim=-1).amax(-1).repeat_interleave(2, dim=1)
    torch.testing.assert_close(u, expected_u)
    torch.testing.assert_close(head_delta(q, k, 0.25, -10.0, None), -10.0 - math.log(30) - 2 * expected_u)
    user = torch.tensor([0.5, 1.0, 1.5, 2.0])                              # (Hq,) broadcasts over batch
    torch.testing.assert_close(head_delta(q, k, 0.25, -10.0, user), (-10.0 - math.log(30) - 2 * user).expand(2, 4))


def test_negative_or_nan_bound_turns_pruning_off():
    q, k, v, c = fox_inputs(1, 2, 2, 64, 64, 8, strength=10.0, seed=10)
    plan = make_plan(q, k, c, 0.3, -5.0, torch.tensor([-1.0, float("nan")]), 8, 8)
    assert (plan.start == 0).all()
    q[0, 1, 3, 0] = float("nan")
    plan = make_plan(q, k, c, 0.3, -5.0, None, 8, 8)
    assert (plan.start[0, 1] == 0).all() and (plan.start[0, 0] > 0).any()


def test_nan_gate_keeps_the_tiles_it_touches():
    q, k, v, c = fox_inputs(1, 1, 1, 64, 64, 8, strength=10.0, seed=11)
    c[0, 0, 5] = float("nan")
    tiles = kept_tiles(make_plan(q, k, c, 0.3, -5.0, None, 8, 8))[0, 0]
    assert tiles[:, 0].all()                           # key block 0 holds the NaN: every query block keeps it


def test_causal_last_key_block_with_fewer_queries():
    assert causal_last_key_block(10, 10, 4, 4).tolist() == [0, 1, 2]
    assert causal_last_key_block(3, 20, 2, 8).tolist() == [2, 2]          # rows at positions 17..19


def test_plan_runs_on_the_meta_device_without_values():
    """No host read: the plan builds on meta tensors, where any .item() or .tolist() would raise."""
    q, k, v, c = (t.to("meta") for t in fox_inputs(1, 2, 1, 40, 50, 8))
    plan = make_plan(q, k, c, 0.3, -10.0, None, 16, 16)
    assert plan.start.shape == (1, 2, 3) and plan.end.shape == (1, 2, 4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 90), st.integers(0, 40), st.sampled_from([1, 4, 8, 16, 32]), st.sampled_from([1, 4, 8, 16, 32]),
       st.sampled_from([4, 8, 16]), st.integers(0, 2 ** 31 - 1))
def test_covering_indices_visit_every_recorded_entry_in_any_partition(Tq, extra, bm, bn, fwd_bn, seed):
    """A recorded kept set (one start per forward query block of any size, not monotone in m) is covered
    by the dq view {start[m] <= n <= n_hi(m)} and by the dk/dv view {m_lo(n) <= m < end[n], start[m] <= n}
    of every backward partition: no kept entry lies in a tile either kernel skips."""
    from acp_compile.kernels.recorded import covering_indices
    from acp_compile.kernels.reference import causal_mask, recorded_entries
    Tk = Tq + extra
    g = torch.Generator().manual_seed(seed)
    fwd_bm = 8
    Mf = -(-Tq // fwd_bm)
    rows = torch.arange(Tq)
    n_hi_f = (Tk - Tq + torch.clamp((torch.arange(Mf) + 1) * fwd_bm, max=Tq) - 1) // fwd_bn
    start_f = (torch.rand(2, 3, Mf, generator=g) * (n_hi_f + 1)).long()          # any start <= n_hi
    keep_from = (start_f[..., rows // fwd_bm] * fwd_bn).to(torch.int32)           # (2, 3, Tq)
    keep = recorded_entries(keep_from, Tk) & causal_mask(Tq, Tk)
    start, end, n_hi = covering_indices(keep_from, Tk, bm, bn)
    Mq, Nk = start.shape[-1], end.shape[-1]
    m = torch.arange(Mq)[:, None]
    n = torch.arange(Nk)[None, :]
    m_lo = torch.clamp(n * bn - (Tk - Tq), min=0) // bm                            # first query block reaching n
    dq_view = (start[..., :, None] <= n) & (n <= n_hi[:, None].long())
    dkdv_view = (m >= m_lo) & (m < end[..., None, :]) & (start[..., :, None] <= n)
    tiles_needed = torch.zeros(2, 3, Mq, Nk, dtype=torch.bool)
    idx = keep.nonzero()
    tiles_needed[idx[:, 0], idx[:, 1], idx[:, 2] // bm, idx[:, 3] // bn] = True
    assert not (tiles_needed & ~dq_view).any()
    assert not (tiles_needed & ~dkdv_view).any()
    assert (start >= 0).all() and (end <= Mq).all()


@pytest.mark.parametrize("seed", range(6))
def test_covering_end_is_one_past_the_last_query_block_starting_at_or_before_each_key_block(seed):
    """end[n] = 1 + max{m : start[m] <= n} (0 if none), checked by brute force on random kept sets."""
    from acp_compile.kernels.recorded import covering_indices
    g = torch.Generator().manual_seed(seed)
    Tq = int(torch.randint(1, 90, (1,), generator=g))
    Tk = Tq + int(torch.randint(0, 40, (1,), generator=g))
    bm, bn = (8, 16, 32)[seed % 3], (16, 8, 32)[seed % 3]
    pos = torch.arange(Tk - Tq, Tk)
    keep_from = (torch.rand(2, 3, Tq, generator=g) * (pos + 1)).floor().to(torch.int32)
    start, end, _ = covering_indices(keep_from, Tk, bm, bn)
    for b in range(2):
        for h in range(3):
            for n in range(end.shape[-1]):
                ms = [m for m in range(start.shape[-1]) if start[b, h, m] <= n]
                assert end[b, h, n] == (1 + max(ms) if ms else 0), (b, h, n)
