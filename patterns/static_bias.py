"""Biases that are not a per-call gate: ALiBi, static linear decays and one-sided key biases.

Why they are c_i - c_j (DESIGN.md 1.1): on the causal keep region K = {(i, j): j <= i + off} softmax
ignores a term r_i that is the same for every kept key of row i, as long as it is finite. So

  - a key-side term b (..., 1, Tk) is c_i - c_j + r_i with c = -b and r_i = b_(i+off): BLOOM's and
    MPT's `slope_h * j` and `slope_h * (j - (T-1))`. The shift is finite where b is; b must also be
    small enough that c_i - c_j loses nothing to rounding (a padding fill of -1e9 or finfo.min is a
    mask, not a bias: refused);
  - a (Tq, Tk) term B is c_i - c_j + r_i on K exactly when B(i, j) - B(Tq-1, j) is the same for every
    kept j of row i. Then c = -B[..., Tq-1, :], the bias of the last query row (position Tk-1, which
    keeps every key): `slope_h * (j - i)`, `-slope_h * |i - j|` (equal to it on K only), relative
    positions from two aranges, clamps that do not act on K. A slope per query row, a log-distance or
    bucketed bias, or a clamp that acts on K fails the test.

Both proofs use exact values: the terms are evaluated as the program computes them (no random
stand-ins), so a term may read only sizes, constants and module state (buffers, parameters, tensor
attributes of the module); a term built from a tensor passed per call (a padding mask) is refused.
The values prove the sizes and module state they were computed at; when a term reads either, a
guard (patterns/guards.py) runs the same check again for every new length and whenever the module
state changes, and a call that fails it runs the unrewritten graph. Per-head factors that decompose()
took out of a term (slope_h * rel, kept as tensor coefficients) are not evaluated: a factor that is
constant over (i, j) keeps either form for any finite value.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns.context import MatchContext, extract_subgraph
from acp_compile.patterns.guards import GuardedInput, MaskGuard, input_kind
from acp_compile.patterns.match import MASK_FILL_MAX, NotProven

MAX_KEY_BIAS = 1e6            # |b| above this is a fill, not a bias: c_i - c_j would lose the logits to rounding
ROW_CHUNK = 256               # rows checked at once (bounds the check's memory at long lengths)
_PER_CALL_HINT = ("only biases built from sizes, constants and module state (buffers, parameters) are proven as "
                  "ALiBi-style decays; a bias from per-call data must be a gate difference c_i - c_j (padded "
                  "batches are planned for the op)")


def _rounding(dtype: torch.dtype) -> float:
    """Relative rounding of a value of this dtype (0 for integers, which are exact)."""
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def check_key_bias(value: torch.Tensor, name: str) -> None:
    """A one-sided key bias b (..., 1, Tk): finite and at most MAX_KEY_BIAS in size everywhere."""
    if not isinstance(value, torch.Tensor):
        raise NotProven(f"the key-side bias {name} is not a tensor")
    v = value.detach().to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise NotProven(f"the key-side bias {name} holds -inf or NaN: a key mask (such as a padding mask) is not a "
                        "one-sided bias; with a causal mask alone the pass takes key biases with finite values")
    top = float(v.abs().max()) if v.numel() else 0.0
    if top > MAX_KEY_BIAS:
        raise NotProven(f"the key-side bias {name} reaches {top:.3g}: a masking fill rather than a bias (the pass "
                        f"takes one-sided biases up to {MAX_KEY_BIAS:g}, where c_i - c_j keeps the logits' precision)")


def check_row_shift(value: torch.Tensor, name: str, fills_allowed: bool) -> None:
    """A (..., Tq, Tk) term is c_i - c_j + r_i on the causal region (module notes): B(i, j) - B(Tq-1, j)
    constant over j <= i + off for every row, within the rounding of the term's dtype; finite there.
    Entries outside the region may be masking fills (<= MASK_FILL_MAX) when fills_allowed (the term
    enters the logits with a positive number and no tensor factor, so the fill stays a fill)."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        raise NotProven(f"the bias {name} is not a matrix over (query, key)")
    Tq, Tk = value.shape[-2], value.shape[-1]
    if Tq > Tk or Tq == 0:
        raise NotProven(f"the bias {name} has more query rows than keys")
    off = Tk - Tq
    eps = _rounding(value.dtype)
    v = value.detach()
    if bool(torch.isnan(v).any()):
        raise NotProven(f"the bias {name} holds NaN")
    last = v[..., -1, :].to(torch.float64)                       # position Tk-1: keeps every key
    if not bool(torch.isfinite(last).all()) or bool((last <= MASK_FILL_MAX).any()):
        raise NotProven(f"the bias {name} hides a key of the last query row: not causal")
    j = torch.arange(Tk, device=v.device)
    for r0 in range(0, Tq, ROW_CHUNK):
        rows = v[..., r0:r0 + ROW_CHUNK, :].to(torch.float64)
        i = torch.arange(r0, r0 + rows.shape[-2], device=v.device)
        keep = j[None, :] <= i[:, None] + off                      # (rows, Tk)
        inside = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        if not bool(torch.isfinite(inside).all()) or bool((inside <= MASK_FILL_MAX).any()):
            raise NotProven(f"the bias {name} is infinite or a masking fill on an entry the causal mask keeps")
        if not fills_allowed and bool(((rows <= MASK_FILL_MAX) & ~keep).any()):
            raise NotProven(f"the bias {name} holds masking fills but enters the logits negated or times a tensor")
        d = rows - last[..., None, :]
        big = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
        zero = torch.zeros((), dtype=d.dtype, device=d.device)
        spread = torch.where(keep, d, -big).amax(-1) - torch.where(keep, d, big).amin(-1)
        scale = torch.maximum(inside.abs().amax(-1), torch.where(keep, last[..., None, :].abs(), zero).amax(-1))
        excess = spread - (4 * eps * scale + 1e-9)
        if bool((excess > 0).any()):
            raise NotProven(
                f"the bias {name} is not c_i - c_j on the causal region: B(i, j) - B(last row, j) changes along a row "
                f"by up to {float(spread.max()):.3g}; a static decay must be linear in the key position with one slope "
                "per head there (not a slope per query row, a log-distance or bucketed bias, or a clamp that acts on "
                "kept entries)")


def _kinds(ctx: MatchContext, terms: list) -> dict:
    """How each tensor input of the terms is trusted (patterns/guards.py): a per-call tensor whose sizes
    alone are read (B, H, T = q.shape) is "shape"; get_attr nodes are "get_attr"."""
    deps = {d for t in terms for d in ctx.dependencies(t.node, reader=t.reader)}
    kinds = {}
    for t in terms:
        for n in ctx.tensor_inputs(t.node, reader=t.reader):
            if n.op == "get_attr":
                kinds[n] = "get_attr"
                continue
            kind = input_kind(tp.graph_input_source(n), ctx.placeholders.get(n))
            if kind == "data" and all(gu.reads_metadata_only(u) for u in n.users if u in deps):
                kind = "shape"
            kinds[n] = kind
    return kinds


def is_static(ctx: MatchContext, terms: list) -> bool:
    """The terms read sizes, constants and module state only (no per-call tensor's values): their exact
    values can be proven and guarded. A term whose producers are too many to walk (a gate computed from
    the previous layers of a whole-model graph) is not static: it goes to the per-call group, whose
    stand-in proof does not walk its producers."""
    try:
        return all(k not in ("data", "get_attr") for k in _kinds(ctx, terms).values())
    except NotProven:
        return False


def prove_static(ctx: MatchContext, terms: list, check: Callable[[list], None], what: str) -> list:
    """Evaluates `terms` (objects with .node, .reader) exactly, runs check(values) (raises NotProven) and
    returns the guards that run the check again when a size or module state the terms read changes
    (module notes). Refuses terms that read per-call tensors or module attributes outside the graph's
    inputs."""
    pos = ctx.position
    tensors = sorted({n for t in terms for n in ctx.tensor_inputs(t.node, reader=t.reader)}, key=pos.__getitem__)
    symbols = sorted({n for t in terms for n in ctx.symbol_inputs(t.node, t.reader)}, key=pos.__getitem__)
    kinds = _kinds(ctx, terms)
    for n in tensors:
        if kinds[n] == "get_attr":
            raise NotProven(f"the {what} reads the module attribute {n.target} (get_attr), which is not guarded")
        if kinds[n] == "data":
            raise NotProven(f"the {what} reads {n.name}, a tensor passed to the compiled code per call: {_PER_CALL_HINT}")
    check([ctx.evaluate(t.node, reader=t.reader) for t in terms])
    if not tensors and not symbols:
        return []                                  # built from constants only: proven exactly above
    inputs = tensors + symbols
    guarded = tuple(GuardedInput(ctx.placeholder_index[n], kinds.get(n, "size")) for n in inputs)
    graph = extract_subgraph(ctx, terms, inputs)
    cell: dict = {}

    def verify(call_inputs: list) -> bool:
        args = [tp.concrete_int(call_inputs[g.index]) if isinstance(call_inputs[g.index], torch.SymInt)
                else call_inputs[g.index] for g in guarded]
        if "gm" not in cell:                       # built on first use: most guards never fire
            cell["gm"] = fx.GraphModule(torch.nn.Module(), graph)
        with torch.no_grad():
            values = cell["gm"](*args)
        try:
            check(list(values))
        except NotProven:
            return False
        return True

    return [MaskGuard(guarded, verify, "", failure="the bias of {site} is not proven to be c_i - c_j")]
