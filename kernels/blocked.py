"""Blocked PyTorch forward and backward of FoX attention that visits only the tiles an ACP plan keeps.

This is the CPU implementation and the fallback on CUDA for shapes the Triton kernels do not cover.

Notation (one batch element b, query head h, kv head h // g with g = Hq // Hkv):
  q (B, Hq, Tq, D)   k (B, Hkv, Tk, D)   v (B, Hkv, Tk, Dv)   c (B, Hq, Tk) cumulative log forget gate
  o, do (B, Hq, Tq, Dv): the value head dim Dv may differ from D
  off = Tk - Tq      query row i sits at key position p_i = off + i
  query block m: rows [r0, r1) = [m*BM, min((m+1)*BM, Tq))
  kept key range of (b, h, m): [k0, k1) = [start[b,h,m] * BN, off + r1)
      every key below k0 lies in a skipped tile; every key at or past k1 is above the diagonal
  s = scale * q k^T + c[p_i] - c[j] on (rows of m) x [k0, k1)       (BMa, L) per head, L = k1 - k0
  the causal mask touches only the last BMa columns of that range (keys off+r0 .. off+r1-1)
  with segments (kernels/segments.py: key_mask and packed documents) every column j of the range
  is also masked where key_valid[b, j] is False or j < lo[b, p_i]; a row left with no visible key
  gives o = 0 and lse = -inf (and p = 0 in the backward), never NaN

Forward, per query block m and group of heads sharing start[b,h,m]: ONE matmul against the kept
key range, a direct softmax over it in fp32 (fp64 for fp64 inputs), o = P V and lse = logsumexp.
No (Tq, Tk) matrix is ever built; the largest temporary is (heads in group, BM, L): at most
g * BM / D times the size of k.

Backward, per query block likewise: P = softmax(s) as in the forward, dP = dO V^T and
dS = P * (dP - Delta) with Delta_i = sum_j P_ij dP_ij over the kept row (the fp32/fp64 P and dP
themselves, not dO_i . O_i with O rounded to bf16); dq = scale dS K is written once per query block;
dk += scale dS^T Q, dv += P^T dO, dc -= colsum(dS) and dc[p_i] += rowsum_i(dS) are accumulated per
query block into fp32 (fp64) buffers.
dc keeps both terms, dc_t = sum_j dS_tj - sum_i dS_it. The row term is zero in exact arithmetic but
not in rounded arithmetic, and d log f is the reverse cumulative sum of dc, so a dropped row term
would add up with T; with Delta taken from P and dP, both terms cancel consistently.
Head groups: the heads of a query block are grouped by their start; a group that is every head,
or one contiguous run of heads, reads plain views; any other group gathers its rows (a copy).
GQA: the g query heads of one kv head are stacked as rows of one matmul, so k and v are not repeated
(a gathered group reads k and v once per query head).

Host sync: the loop bounds come from plan.start, read with ONE .tolist() per call. On CUDA that is
a device-to-host synchronisation; the Triton path has none. Inputs of any strides are accepted
(no copy is forced); outputs are torch.empty_like of the matching input and are fully written.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from acp_compile.kernels.layout import empty_like_last
from acp_compile.kernels.plan import Plan
from acp_compile.kernels.segments import Segments

BLOCK_M = 64
BLOCK_N = 64


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass
class _Heads:
    """The query heads that one matmul processes, in one of three modes:
      all    every (b, h) of the call: plain slices, no copy
      slice  heads h0..h1-1 of one batch element b, whose kv heads kv0..kv1-1 stack them: views, no copy
      index  any other set: gathered with index tensors (copies the rows it reads)
    """
    mode: str
    b: int | Tensor | None = None        # slice: batch index; index: (G,) batch of each query head
    h: slice | Tensor | None = None      # slice: query heads h0:h1; index: (G,) query head
    h_kv: slice | Tensor | None = None   # slice: kv heads kv0:kv1; index: (G,) kv head h // g
    flat_q: slice | Tensor | None = None   # rows of a (B*Hq, ...) accumulator
    flat_kv: slice | Tensor | None = None  # rows of a (B*Hkv, ...) accumulator

    def batch_rows(self, x: Tensor, t0: int, t1: int, Hq: int) -> Tensor:
        """x (B, T) per-batch data -> (G, t1 - t0) for the batch element of each selected query head."""
        if self.mode == "all":
            return x[:, None, t0:t1].expand(x.shape[0], Hq, t1 - t0).flatten(0, 1)
        if self.mode == "slice":
            n = self.h.stop - self.h.start
            return x[self.b, t0:t1][None].expand(n, t1 - t0)
        return x[self.b, t0:t1]

    def q_rows(self, x: Tensor, t0: int, t1: int, dtype: torch.dtype) -> Tensor:
        """x (B, Hq, T, ...) -> (G, t1 - t0, ...) for the selected query heads."""
        if self.mode == "all":
            part = x[:, :, t0:t1].flatten(0, 1)
        else:
            part = x[self.b, self.h, t0:t1]
        return part.to(dtype)

    def kv_rows(self, x: Tensor, t0: int, t1: int, dtype: torch.dtype) -> Tensor:
        """x (B, Hkv, T, D) -> (Gk, L, D): one row block per kv head (all, slice), or per query head (index)."""
        if self.mode == "all":
            part = x[:, :, t0:t1].flatten(0, 1)
        else:
            part = x[self.b, self.h_kv, t0:t1]
        return part.to(dtype)

    def write_q_rows(self, out: Tensor, t0: int, t1: int, value: Tensor) -> None:
        """out[b, h, t0:t1] = value for the selected heads; value (G, t1 - t0, ...)."""
        if self.mode == "all":
            out[:, :, t0:t1] = value.reshape(*out.shape[:2], *value.shape[1:])
        else:
            out[self.b, self.h, t0:t1] = value.to(out.dtype)

    def add_q_rows(self, acc: Tensor, t0: int, t1: int, value: Tensor) -> None:
        """acc (B*Hq, T, ...) [heads, t0:t1] += value (G, t1 - t0, ...)."""
        if self.mode == "index":
            acc[:, t0:t1].index_add_(0, self.flat_q, value)
        else:
            acc[self.flat_q, t0:t1] += value

    def add_kv_rows(self, acc: Tensor, t0: int, t1: int, value: Tensor) -> None:
        """acc (B*Hkv, T, D) [kv heads, t0:t1] += value (Gk, L, D); heads sharing a kv head add up."""
        if self.mode == "index":
            acc[:, t0:t1].index_add_(0, self.flat_kv, value)
        else:
            acc[self.flat_kv, t0:t1] += value


def _heads_of(members: list[tuple[int, int]], B: int, Hq: int, Hkv: int, device) -> _Heads:
    """The cheapest mode that covers the (b, h) pairs in `members` (sorted by b, then h)."""
    g = Hq // Hkv
    if len(members) == B * Hq:
        return _Heads("all", flat_q=slice(None), flat_kv=slice(None))
    b0, h0 = members[0]
    h1 = members[-1][1] + 1
    one_run = all(b == b0 for b, _ in members) and h1 - h0 == len(members)
    if one_run and (h1 - h0 == 1 or (h0 % g == 0 and h1 % g == 0)):
        kv0, kv1 = h0 // g, (h1 - 1) // g + 1
        return _Heads("slice", b0, slice(h0, h1), slice(kv0, kv1),
                      slice(b0 * Hq + h0, b0 * Hq + h1), slice(b0 * Hkv + kv0, b0 * Hkv + kv1))
    b = torch.tensor([m[0] for m in members], device=device)
    h = torch.tensor([m[1] for m in members], device=device)
    h_kv = torch.div(h, g, rounding_mode="floor")
    return _Heads("index", b, h, h_kv, b * Hq + h, b * Hkv + h_kv)


def _head_groups(starts_m: list[list[int]], Hq: int, Hkv: int, device) -> list[tuple[int, _Heads]]:
    """Groups the (b, h) heads of one query block by their start; starts_m[b][h]."""
    by_start: dict[int, list[tuple[int, int]]] = {}
    for b, row in enumerate(starts_m):
        for h, s in enumerate(row):
            by_start.setdefault(s, []).append((b, h))
    return [(s, _heads_of(members, len(starts_m), Hq, Hkv, device)) for s, members in by_start.items()]


def _matmul_heads(a: Tensor, b: Tensor, transpose_b: bool, add_to: Tensor | None = None) -> Tensor:
    """(Gq, R, X) x per-kv-head (Gk, Y, X) or (Gk, X, Y) -> (Gq, R, Y), stacking Gq // Gk heads as rows.

    add_to (Gq, R, Y) contiguous (updated in place) or (Gq, R, 1): added to the product in the same gemm.
    """
    Gq, R = a.shape[0], a.shape[1]
    Gk = b.shape[0]
    rhs = b.transpose(-1, -2) if transpose_b else b
    lhs = a.reshape(Gk, (Gq // Gk) * R, a.shape[-1])
    if add_to is None:
        out = lhs @ rhs
    elif add_to.shape == (Gq, R, rhs.shape[-1]):                     # a full term: add in place
        out = add_to.contiguous().view(Gk, (Gq // Gk) * R, rhs.shape[-1]).baddbmm_(lhs, rhs)
    else:                                                             # a row term (Gq, R, 1), broadcast
        out = torch.baddbmm(add_to.reshape(Gk, (Gq // Gk) * R, 1), lhs, rhs)
    return out.view(Gq, R, out.shape[-1])


def _matmul_heads_t(a: Tensor, b: Tensor, Gk: int) -> Tensor:
    """sum over the stacked heads of a^T b: a (Gq, R, L), b (Gq, R, D) -> (Gk, L, D)."""
    Gq, R = a.shape[0], a.shape[1]
    a2 = a.reshape(Gk, (Gq // Gk) * R, a.shape[-1])
    b2 = b.reshape(Gk, (Gq // Gk) * R, b.shape[-1])
    return a2.transpose(-1, -2) @ b2


@dataclass
class _Block:
    """One (query block, head group) visit: rows [r0, r1), kept keys [k0, k1)."""
    r0: int
    r1: int
    k0: int
    k1: int
    heads: _Heads


def _blocks(q: Tensor, k: Tensor, plan: Plan):
    """Yields every (query block, head group) visit of the plan; ONE host read of plan.start."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    off = Tk - Tq
    starts = plan.start.tolist()                                         # (B, Hq, Mq): the one sync
    for m in range(-(-Tq // plan.block_m)):
        r0, r1 = m * plan.block_m, min((m + 1) * plan.block_m, Tq)
        k1 = off + r1
        starts_m = [[starts[b][h][m] for h in range(Hq)] for b in range(B)]
        for start, heads in _head_groups(starts_m, Hq, Hkv, q.device):
            # A valid plan never skips a tile holding a diagonal entry; min() keeps the diagonal
            # columns inside the range even for a hand-made plan.
            k0 = min(start * plan.block_n, off + r0)
            yield _Block(r0, r1, k0, k1, heads)


def _scores(blk: _Block, q: Tensor, k: Tensor, c: Tensor, sm_scale: float, dt: torch.dtype, seg=None):
    """One block visit: scaled q rows (G, BMa, D), k rows (Gk, L, D) and the masked scores
    s = scale q k^T + c_i - c_j (G, BMa, L), built as bias + gemm in one baddbmm."""
    off = k.shape[2] - q.shape[2]
    # (G, BMa, D) with the scale folded in; out of place, since q_rows may return a view of q.
    q_blk = blk.heads.q_rows(q, blk.r0, blk.r1, dt) * sm_scale
    k_blk = blk.heads.kv_rows(k, blk.k0, blk.k1, dt)                      # (Gk, L, D)
    # contiguous: a strided c (a permuted (B, T, H) gate) would give the bias below a strided layout
    c_rows = blk.heads.q_rows(c, off + blk.r0, off + blk.r1, dt).contiguous()   # (G, BMa)
    c_cols = blk.heads.q_rows(c, blk.k0, blk.k1, dt).contiguous()               # (G, L)
    # c_i - c_j per entry, one rounding relative to |c_i - c_j| (exact when c_j is within a factor 2
    # of c_i): a hard reset (one log gate of -1e9 inside the block) or a steep decay does not leak
    # the rounding of a large |c| into the rows after it, as a shared per-block reference would.
    bias = c_rows[:, :, None] - c_cols[:, None, :]                        # (G, BMa, L)
    s = _matmul_heads(q_blk, k_blk, transpose_b=True, add_to=bias)        # (G, BMa, L)
    bma = blk.r1 - blk.r0
    idx = torch.arange(bma, device=q.device)
    above_diagonal = idx[None, :] > idx[:, None]                          # (BMa, BMa): key after query
    s[:, :, -bma:].masked_fill_(above_diagonal, float("-inf"))          # keys off+r0 .. off+r1-1
    if seg is not None:
        Hq = q.shape[1]
        key_ok = blk.heads.batch_rows(seg.key_valid, blk.k0, blk.k1, Hq)           # (G, L)
        lo = blk.heads.batch_rows(seg.lo, off + blk.r0, off + blk.r1, Hq)         # (G, BMa)
        cols = torch.arange(blk.k0, blk.k1, device=q.device)
        visible = key_ok[:, None, :] & (cols[None, None, :] >= lo[:, :, None])    # (G, BMa, L)
        s.masked_fill_(~visible, float("-inf"))
    return q_blk, k_blk, s


def _softmax_rows(s: Tensor, seg) -> tuple[Tensor, Tensor]:
    """(p, row_max) of the kept row; with segments a row with no visible key gets p = 0 (not NaN)."""
    row_max = s.amax(dim=-1)                                              # (G, BMa)
    p = torch.softmax(s, dim=-1)                                          # (G, BMa, L)
    if seg is not None:
        p.masked_fill_((row_max == float("-inf"))[..., None], 0.0)
    return p, row_max


def forward(q: Tensor, k: Tensor, v: Tensor, c: Tensor, sm_scale: float, plan: Plan,
            seg: Segments | None = None) -> tuple[Tensor, Tensor]:
    """o (B, Hq, Tq, Dv) in q's layout, lse (B, Hq, Tq) fp32; computes exactly the entries the plan keeps
    (and that the segments leave visible)."""
    dt = _compute_dtype(q)
    o = empty_like_last(q, v.shape[-1])
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for blk in _blocks(q, k, plan):
        _, _, s = _scores(blk, q, k, c, sm_scale, dt, seg)                # (G, BMa, L)
        p, row_max = _softmax_rows(s, seg)                                # (G, BMa, L), (G, BMa)
        # At the row maximum p = exp(0) / sum, so lse = max + log(sum) = max - log(max_j p): two cheap
        # reductions instead of a second exp pass (torch.logsumexp costs twice the softmax on CPU).
        row_lse = row_max - torch.log(p.amax(dim=-1))
        if seg is not None:                                               # no visible key: -inf, not NaN
            row_lse = row_lse.masked_fill(row_max == float("-inf"), float("-inf"))
        blk.heads.write_q_rows(lse, blk.r0, blk.r1, row_lse)
        v_blk = blk.heads.kv_rows(v, blk.k0, blk.k1, dt)                  # (Gk, L, Dv)
        blk.heads.write_q_rows(o, blk.r0, blk.r1, _matmul_heads(p, v_blk, transpose_b=False))
    return o, lse


def backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, c: Tensor, o: Tensor, lse: Tensor, sm_scale: float, plan: Plan,
    seg: Segments | None = None, keep_from: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq like q, dk like k, dv like v, dc like c: c's dtype and strides) of the pruned attention.

    P is recomputed with the forward's softmax over the kept row, not as exp(s - lse): each visit holds
    the whole kept row anyway, the result is the forward's P exactly (fp64 too, where lse is only fp32),
    and torch's CPU exp is 10 to 40 times slower on the far-negative scores of a long decay, which the
    softmax kernel avoids. Delta_i = sum_j P_ij dP_ij over the kept row, from the same fp32 (fp64) P and
    dP that dS uses, not do_i . o_i with o rounded to the output dtype: dS then vanishes where it must
    (a one-hot row gives dS = 0 exactly), and its row sums are zero up to the rounding of the sum.
    dc takes both terms, dc_t = sum_j dS_tj - sum_i dS_it. lse and o are accepted for the common
    signature and not read (o only for its NaNs, see o_nan).
    keep_from (B, Hq, Tq) int32, optional: the kept set a forward recorded (kernels/plan.py recorded_plan
    gives the covering plan); entries j < keep_from[i] are masked, so the gradient is that of exactly
    the recorded kept set whatever the forward's tile partition was.
    """
    dt = _compute_dtype(q)
    acc_dt = torch.float64 if c.dtype == torch.float64 else dt           # dc in fp64 for an fp64 gate
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    off = Tk - Tq
    dq = torch.empty_like(q)
    dk_acc = torch.zeros(B * Hkv, Tk, D, dtype=dt, device=q.device)
    dv_acc = torch.zeros(B * Hkv, Tk, v.shape[3], dtype=dt, device=q.device)
    dc_acc = torch.zeros(B * Hq, Tk, dtype=acc_dt, device=q.device)
    # 0, or NaN in a row whose output is NaN (a head poisoned by the forward, see dispatch._poison): the
    # Triton backward's Delta = dO . O carries that NaN into dS, and so does this one.
    o_nan = (do.to(dt) * o.to(dt)).sum(dim=-1).mul_(0.0)                 # (B, Hq, Tq)
    for blk in _blocks(q, k, plan):
        heads, r0, r1, k0, k1 = blk.heads, blk.r0, blk.r1, blk.k0, blk.k1
        q_blk, k_blk, s = _scores(blk, q, k, c, sm_scale, dt, seg)
        if keep_from is not None:                                          # exactly the recorded kept set
            kf = heads.q_rows(keep_from, r0, r1, torch.int64)              # (G, BMa)
            cols = torch.arange(k0, k1, device=q.device)
            s.masked_fill_(cols[None, None, :] < kf[:, :, None], float("-inf"))
        p, _ = _softmax_rows(s, seg)                                      # (G, BMa, L), the forward's P
        do_blk = heads.q_rows(do, r0, r1, dt)                             # (G, BMa, Dv)
        v_blk = heads.kv_rows(v, k0, k1, dt)                              # (Gk, L, Dv)
        Gk = k_blk.shape[0]
        heads.add_kv_rows(dv_acc, k0, k1, _matmul_heads_t(p, do_blk, Gk))
        dp = _matmul_heads(do_blk, v_blk, transpose_b=True)               # (G, BMa, L)
        delta = (p * dp).sum(dim=-1, keepdim=True)                        # (G, BMa, 1): sum_j P_ij dP_ij
        delta += heads.q_rows(o_nan, r0, r1, dt)[:, :, None]
        ds = p.mul_(dp.sub_(delta))                                       # P * (dP - Delta)
        heads.write_q_rows(dq, r0, r1, _matmul_heads(ds, k_blk, transpose_b=False).mul_(sm_scale))
        heads.add_kv_rows(dk_acc, k0, k1, _matmul_heads_t(ds, q_blk, Gk))   # q_blk carries the scale
        heads.add_q_rows(dc_acc, k0, k1, ds.sum(dim=1).neg_().to(acc_dt))  # -column sums, (G, L)
        heads.add_q_rows(dc_acc, off + r0, off + r1, ds.sum(dim=2).to(acc_dt))  # +row sums, (G, BMa)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dk.copy_(dk_acc.view(B, Hkv, Tk, D))
    dv.copy_(dv_acc.view(B, Hkv, Tk, v.shape[3]))
    dc = torch.empty_like(c)
    dc.copy_(dc_acc.view(B, Hq, Tk))
    return dq, dk, dv, dc
