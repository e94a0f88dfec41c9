"""Proves that a logits tensor is  scale * (q k^T) + (c_i - c_j)  with a causal mask.

Notation: S = q k^T (..., Tq, Tk) the raw product node; off = Tk - Tq (queries are the last Tq
positions); a term is an additive tensor with a numeric coefficient.

decompose(top, consumer) walks down from the value the consumer (softmax or SDPA) reads, through
  casts, add/sub/neg (in place or not), mul/div by numbers or symbolic sizes,
  masked_fill(x, m, -inf) and where(m, x, -inf) (recorded as masks),
and collects: the S node with the product of its scale factors, additive side terms, masks.
prove_bias(terms) then evaluates the side terms with random stand-ins for the tensors they view:
terms of shape (..., Tq, 1) are the query side, (..., 1, Tk) the key side; the proof is that
  query side (i) == -(key side)(off + i)  for random values,
which is exactly c_i - c_j with c = -(key side). An additive (..., Tq, Tk) term must evaluate to
0 / -inf (an additive causal mask). prove_causal(masks) evaluates the masks concretely and checks
masked(i, j) <=> j > i + off, also at other sequence lengths when the mask is built from sizes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns import static_bias as sb
from acp_compile.patterns.context import MatchContext, extract_subgraph
from acp_compile.patterns.guards import GuardedInput, MaskGuard, input_kind
from acp_compile.patterns.match import MASK_FILL_MAX, NotProven

_VIEW_METHODS = ("unsqueeze", "view", "reshape", "expand", "float", "half", "bfloat16", "double", "to",
                 "type", "type_as", "contiguous", "squeeze", "transpose", "permute", "movedim", "moveaxis",
                 "swapaxes", "swapdims", "flatten", "unflatten", "view_as", "reshape_as", "expand_as", "t", "clone")
_VIEW_FUNCTIONS = (torch.unsqueeze, torch.reshape, torch.squeeze, torch.transpose, torch.permute, torch.movedim,
                   torch.moveaxis, torch.swapaxes, torch.swapdims, torch.flatten, torch.clone, torch.t)
# Ops that only move values around (no arithmetic): the bias proof looks through them, so two views
# of one gate (c in (B, T, H) transposed separately for each side) or a cache concatenated in front
# of the new chunk's c are compared by value.
_GATHER_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate, torch.stack)


@dataclass
class Term:
    coef: list                 # numeric/symbolic factors
    node: fx.Node
    reader: fx.Node | None = None   # the chain node that reads it (its value is taken there)
    flat: bool = False         # read below a view of the logits from (N, Tq, Tk) to (B, H, Tq, Tk): N-leading


@dataclass
class Mask:
    node: fx.Node | None       # bool tensor node (or an additive 0/-inf term)
    masked_when: bool          # masked where the evaluated mask == masked_when
    additive: bool = False     # the node is an additive 0/-inf tensor
    reader: fx.Node | None = None   # the chain node that reads it
    fills_only: bool = False   # additive, and a bias matrix: only its fills (<= MASK_FILL_MAX) mask; the finite
                               # values are the bias (proven by static_bias.check_row_shift)
    fill: Any = None           # the fill value (a number or a node) of a mask that replaces logits
    replaces: bool = False     # masked entries are replaced by `fill` (masked_fill, where, item assignment), so no
                               # gradient reaches the logits there; False for additive masks


@dataclass
class Decomposition:
    qk: fx.Node | None = None
    qk_coef: list = field(default_factory=list)
    terms: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    chain: list = field(default_factory=list)       # nodes between top and S (the region)
    leading_view: fx.Node | None = None             # BLOOM's scores.view(B, H, Tq, Tk) of (B*H, Tq, Tk) logits


def _is_masked_value(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x <= MASK_FILL_MAX


def decompose(top: fx.Node, consumer: fx.Node, ctx: MatchContext, allow_qk: bool = True,
              exclusive: bool = True, other_readers: tuple = ()) -> Decomposition:
    """See the module notes. exclusive: every chain node must feed only the chain (else NotProven);
    other_readers: nodes besides `consumer` that read `top` as part of the normalisation
    (the logsumexp of exp(s - logsumexp(s)))."""
    out = Decomposition()
    pos = ctx.position
    visited = {consumer, *other_readers}
    reads: list = []           # (chain value, the chain node reading it)

    def walk(node: Any, coef: list, reader: fx.Node) -> None:
        if not isinstance(node, fx.Node):
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                return      # a constant added to every logit: softmax ignores it
            raise NotProven(f"unsupported operand {node!r} in the logits")
        v = gu.effective_value(node, reader, pos)
        visited.add(v)
        reads.append((v, reader))
        if exclusive:
            # Readers in the chain (a softmax reading `att` after `att.masked_fill_`) and in-place
            # writers before them are the only allowed users.
            writers = {u for u in v.users if gu.writes_into_first_argument(u) and u.args and u.args[0] is v
                       and pos[u] < pos[reader]}
            if any(u not in visited and u not in writers and u is not reader for u in v.users):
                raise NotProven(f"the intermediate logits {v.name} are also used elsewhere")
        if allow_qk and (gu.is_op(v, "matmul") or gu.is_op(v, "bmm") or gu.is_op(v, "einsum")):
            if out.qk is not None:
                raise NotProven("the logits hold two matrix products")
            out.qk, out.qk_coef = v, coef
            return
        if allow_qk and gu.is_op(v, "baddbmm"):
            # baddbmm(bias, q, k^T, beta=b, alpha=a) = b * bias + a * (q @ k^T)
            if out.qk is not None:
                raise NotProven("the logits hold two matrix products")
            alpha, beta = v.kwargs.get("alpha", 1), v.kwargs.get("beta", 1)
            if not gu.is_scalar_value(alpha) or not isinstance(beta, (int, float)) or isinstance(beta, bool):
                raise NotProven(f"{v.name}: baddbmm with a tensor alpha or a symbolic beta")
            out.qk, out.qk_coef = v, coef + ([alpha] if alpha != 1 else [])
            if beta != 0:
                walk(v.args[0], coef + ([beta] if beta != 1 else []), v)
            return
        out.chain.append(v)
        a = v.args
        if gu.is_op(v, "cast") or (v.op == "call_method" and v.target == "contiguous"):
            return walk(a[0], coef, v)
        if gu.is_op(v, "expand") or (v.op == "call_method" and v.target == "expand_as"):
            return walk(a[0], coef, v)            # adding x.expand(...) is adding x, broadcast
        if gu.is_op(v, "getitem") and _keeps_every_entry(v, ctx):
            return walk(a[0], coef, v)            # Hugging Face's attention_mask[:, :, :, :Tk] at full length
        if gu.is_op(v, "add") or gu.is_op(v, "sub"):
            if v.kwargs.get("alpha", 1) != 1 or len(a) > 2:
                raise NotProven(f"{v.name}: add/sub with alpha is not supported")
            other = a[1] if len(a) > 1 else v.kwargs.get("other")
            sign = -1 if gu.is_op(v, "sub") else 1
            walk(a[0], coef, v)
            walk(other, coef + [sign], v)
            return
        if gu.is_op(v, "neg"):
            return walk(a[0], coef + [-1], v)
        if gu.is_op(v, "mul") or gu.is_op(v, "div"):
            x, y = a[0], (a[1] if len(a) > 1 else v.kwargs.get("other"))
            x, y = _as_number(x), _as_number(y)
            if gu.is_op(v, "mul") and gu.is_scalar_value(x) and not gu.is_scalar_value(y):
                x, y = y, x
            if not gu.is_scalar_value(y):
                if gu.is_op(v, "mul") and _is_per_head_factor(x, v, ctx) and not _is_per_head_factor(y, v, ctx):
                    x, y = y, x
                if _is_per_head_factor(y, v, ctx):
                    # alpha_h * (c_i - c_j), or logits / temperature_h: a factor constant over (i, j)
                    return walk(x, coef + [("tensor" if gu.is_op(v, "mul") else "inv_tensor", y)], v)
                raise NotProven(f"{v.name}: the logits are multiplied or divided by a tensor that varies over "
                                "the query or key positions")
            if v.kwargs.get("rounding_mode") is not None:
                raise NotProven(f"{v.name}: division with rounding")
            f = ctx.scalar(y)
            f = y if tp.is_symbolic(f) else f        # a symbolic factor keeps its node (the op may need it)
            return walk(x, coef + [f if gu.is_op(v, "mul") else ("inv", f)], v)
        if gu.is_op(v, "where") and len(a) == 3 and not any(_is_fill(x, ctx, v) for x in a[1:]) \
                and not _computes_from_a_product(v):
            out.chain.pop()                       # a where inside a bias (buckets): a term, proven by value
            out.terms.append(Term(coef, v, reader))
            return
        if any(isinstance(f, tuple) and f[0] in ("tensor", "inv_tensor") for f in coef) and (
                gu.is_op(v, "masked_fill") or gu.is_op(v, "where") or v.target is operator.setitem):
            raise NotProven(f"{v.name}: a tensor factor multiplies the logits after the mask (its sign would decide "
                            "whether masked entries stay -inf)")
        if gu.is_op(v, "masked_fill"):
            fill = gu.arg(v, 2, "value")
            if not _is_fill(fill, ctx, v):
                raise NotProven(f"{v.name}: masked_fill with {_describe(fill)}, not -inf{_FINITE_FILL_HINT}")
            out.masks.append(Mask(gu.arg(v, 1, "mask"), True, reader=v, fill=fill, replaces=True))
            return walk(a[0], coef, v)
        if v.op == "call_function" and v.target is operator.setitem:
            mask = _item_assignment_mask(v, ctx)
            out.masks.append(Mask(mask, True, reader=v, fill=v.args[2], replaces=True))
            return walk(a[0], coef, v)
        if gu.is_op(v, "where") and len(a) == 3:
            cond, x, y = a
            if _is_fill(y, ctx, v) and isinstance(x, fx.Node) and not _is_fill(x, ctx, v):
                out.masks.append(Mask(cond, False, reader=v, fill=y, replaces=True))
                return walk(x, coef, v)
            if _is_fill(x, ctx, v) and isinstance(y, fx.Node):
                out.masks.append(Mask(cond, True, reader=v, fill=x, replaces=True))
                return walk(y, coef, v)
            if _is_fill(y, ctx, v) and _is_zero(x) or _is_fill(x, ctx, v) and _is_zero(y):
                # where(keep, 0.0, -inf): an additive mask on its own; a fill that enters negated is not one
                if tensor_factors(coef) or numeric_coef(coef) <= 0:
                    raise NotProven(f"{v.name}: an additive -inf mask enters the logits negated or times a tensor")
                out.masks.append(Mask(cond, _is_fill(x, ctx, v), reader=v))
                return
            raise NotProven(f"{v.name}: torch.where that does not fill with -inf{_FINITE_FILL_HINT}")
        if is_leading_split(v):
            # (N, Tq, Tk) logits viewed as (B, H, Tq, Tk) (BLOOM): softmax is per row, so the labels of the
            # leading dims do not matter as long as the probabilities are viewed back (softmax_anchor checks).
            if out.leading_view is not None:
                raise NotProven(f"{v.name}: the logits are reshaped twice")
            out.leading_view = v
            below["flat"] = True
            try:
                return walk(a[0], coef, v)
            finally:
                below["flat"] = False
        out.chain.pop()
        out.terms.append(Term(coef, v, reader, flat=below["flat"]))

    below = {"flat": False}
    walk(top, [], consumer)
    # Soundness against writes: the walk followed the in-place steps applied to each chain value
    # itself; any other write into its storage before it is read (an item assignment, a write
    # through a view or an alias) changes the value behind the proof's back.
    for value, reader in reads:
        for w in ctx.storages.writers(value, before=pos[reader]):
            if w not in visited:
                raise NotProven(f"{value.name} is written in place by {w.name} before it is read; "
                                "the pass cannot follow that write (write the logits out of place)")
    return out


def is_leading_split(node: Any) -> bool:
    """x.view(B, H, Tq, Tk) / reshape of a 3-D x (N, Tq, Tk): the leading dim split, the last two kept."""
    if not (gu.is_op(node, "reshape") and node.args and isinstance(node.args[0], fx.Node)):
        return False
    before, after = gu.shape(node.args[0]), gu.shape(node)
    return (before is not None and after is not None and len(before) == 3 and len(after) == 4
            and all(tp.statically_equal(a, b) for a, b in zip(before[-2:], after[-2:])))


def is_leading_merge(node: Any, into: tuple) -> bool:
    """p.view(N, Tq, Tk) / reshape of a 4-D p (B, H, Tq, Tk) to exactly the shape `into`."""
    if not (gu.is_op(node, "reshape") and node.args and isinstance(node.args[0], fx.Node)):
        return False
    before, after = gu.shape(node.args[0]), gu.shape(node)
    return (before is not None and after is not None and len(before) == 4 and len(after) == 3
            and len(into) == 3 and all(tp.statically_equal(a, b) for a, b in zip(after, into))
            and all(tp.statically_equal(a, b) for a, b in zip(before[-2:], after[-2:])))


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _computes_from_a_product(node: fx.Node, limit: int = 64) -> bool:
    """A matrix product among the first `limit` producers of `node` (it may hold the logits)."""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if any(gu.is_op(n, m) for m in ("matmul", "bmm", "einsum", "baddbmm", "sdpa")):
            return True
        stack.extend(n.all_input_nodes)
    return bool(stack)                   # too far to tell: assume it may


_FINITE_FILL_HINT = (" (a finite fill such as -1e4 leaves masked keys a weight of exp(fill - max logit), which is "
                     "zero only for logits the pass cannot bound at compile time; fill with float('-inf') or "
                     "torch.finfo(dtype).min)")


def _is_per_head_factor(y: Any, reader: fx.Node, ctx: MatchContext) -> bool:
    """A floating tensor of at most 4 dims whose last two are 1: constant over the logits' (i, j),
    varying at most over batch and head (a learned alpha_h, a per-head temperature)."""
    value = gu.fake(y) if isinstance(y, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or value.dim() > 4:
        return False
    shape = tuple(value.shape)
    return len(shape) >= 2 and all(tp.statically_equal(s, 1) for s in shape[-2:])


def tensor_factors(coef: list) -> list:
    """[(node, inverse)] of the per-head tensor factors in a coefficient."""
    return [(f[1], f[0] == "inv_tensor") for f in coef if isinstance(f, tuple) and f[0] in ("tensor", "inv_tensor")]


def _numbers(coef: list) -> list:
    return [f for f in coef if not (isinstance(f, tuple) and f[0] in ("tensor", "inv_tensor"))]


def _as_number(x: Any) -> Any:
    """The number inside a one-element tensor made from it (GPT-2's torch.full([], d ** 0.5)), rounded
    to the tensor's dtype as eager rounds it; x itself otherwise."""
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.args):
        return x
    name = getattr(x.target, "__name__", "")
    number = None
    if name == "full" and len(x.args) >= 2 and isinstance(x.args[0], (list, tuple)) and tuple(x.args[0]) == ():
        number = x.args[1]
    elif name in ("tensor", "scalar_tensor", "as_tensor"):
        number = x.args[0]
    value = gu.fake(x)
    if number is None or not gu.is_scalar_value(number) or not isinstance(value, torch.Tensor):
        return x
    if value.dtype in (torch.float32, torch.float64):
        return number
    if isinstance(number, (int, float)) and value.dtype.is_floating_point:
        return float(torch.tensor(number, dtype=value.dtype))     # the value eager divides by
    return x


def _describe(x: Any) -> str:
    return x.name if isinstance(x, fx.Node) else repr(x)


def _is_fill(x: Any, ctx: MatchContext, reader: fx.Node) -> bool:
    """A masking fill: a number <= MASK_FILL_MAX, or a one-element tensor built in the graph from
    constants alone holding such a number (GPT-2's torch.full([], finfo.min))."""
    if _is_masked_value(x):
        return True
    if not isinstance(x, fx.Node):
        return False
    value = gu.fake(x)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.dtype.is_floating_point:
        return False
    try:
        if ctx.tensor_inputs(x, reader=reader) or ctx.symbol_inputs(x, reader):
            return False                             # data, or a size: not a constant
        concrete = ctx.evaluate(x, reader=reader)
    except NotProven:
        return False
    return isinstance(concrete, torch.Tensor) and _is_masked_value(float(concrete.reshape(())))


def _keeps_every_entry(node: fx.Node, ctx: MatchContext) -> bool:
    """x[:, :, :, :n] (slices only) whose result has x's shape: every entry is kept, in place."""
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) and i.step in (None, 1) and i.start in (None, 0) for i in index):
        return False
    before, after = gu.shape(node.args[0]), gu.shape(node)
    return before is not None and after is not None and len(before) == len(after) and all(
        tp.statically_equal(a, b) for a, b in zip(before, after))


def _item_assignment_mask(node: fx.Node, ctx: MatchContext) -> fx.Node:
    """`s[..., m] = -inf` or `s[:, :, m] = -inf` (m bool, covering the last dims) or `s[m] = -inf` (m of
    s's shape): the same as s.masked_fill_(m, -inf). Returns m."""
    target, index, value = node.args
    if not _is_fill(value, ctx, node):
        raise NotProven(f"{node.name}: an item assignment into the logits of {_describe(value)}, not -inf"
                        + _FINITE_FILL_HINT)
    nd = len(ctx.shape(target))
    if isinstance(index, fx.Node):
        lead, mask = [], index
    elif isinstance(index, tuple) and index and isinstance(index[-1], fx.Node):
        lead, mask = list(index[:-1]), index[-1]
    else:
        raise NotProven(f"{node.name}: an item assignment into the logits that is not a boolean mask")
    value_m = gu.fake(mask)
    if not isinstance(value_m, torch.Tensor) or value_m.dtype != torch.bool:
        raise NotProven(f"{node.name}: an item assignment into the logits indexed by a non-boolean tensor")
    full = all(isinstance(i, slice) and i == slice(None) for i in lead if i is not Ellipsis)
    covers_last = (Ellipsis in lead and lead.count(Ellipsis) == 1) or len(lead) + value_m.dim() == nd
    if not (full and covers_last):
        raise NotProven(f"{node.name}: an item assignment into the logits whose mask does not cover the last dims")
    return mask


def factor_value(f: Any) -> Any:
    """A factor's number: itself, or the SymInt/SymFloat its node produces."""
    return gu.fake(f) if isinstance(f, fx.Node) else f


def numeric_coef(coef: list) -> float:
    """The numeric part of a coefficient (per-head tensor factors are kept apart: tensor_factors)."""
    value = 1.0
    for f in _numbers(coef):
        if isinstance(f, tuple):
            f = factor_value(f[1])
            if tp.is_symbolic(f):
                raise NotProven("a bias term is scaled by a symbolic number")
            value /= float(f)
        else:
            f = factor_value(f)
            if tp.is_symbolic(f):
                raise NotProven("a bias term is scaled by a symbolic number")
            value *= float(f)
    return value


def scale_factors(coef: list) -> list:
    """Numeric factors of a coefficient as numbers (division turned into 1/x); tensor factors apart."""
    out = []
    for f in _numbers(coef):
        if isinstance(f, tuple):
            x = factor_value(f[1])
            out.append(1.0 / x if not tp.is_symbolic(x) else 1 / x)
        else:
            out.append(factor_value(f))
    return out


def scale_builder(coef: list):
    """A builder emitting the product of the numeric factors as a graph value (a SymFloat at run time)."""
    def build(graph: fx.Graph) -> Any:
        value: Any = 1.0
        for f in _numbers(coef):
            inverse = isinstance(f, tuple)
            x = f[1] if inverse else f
            if isinstance(value, float) and not isinstance(x, fx.Node):
                value = value / float(x) if inverse else value * float(x)
            else:
                value = graph.call_function(operator.truediv if inverse else operator.mul, (value, x))
        return value
    return build


def _is_view_like(node: Any) -> bool:
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return node.args[1] in ("mT", "T", "mH", "H")
        return node.target in _VIEW_FUNCTIONS or gu.is_op(node, "getitem")
    return False


def view_base(node: fx.Node) -> fx.Node:
    """Walks down view/cast-like ops (unsqueeze, c[..., :, None], view, transpose, to ...) to the tensor they read."""
    cur = node
    while _is_view_like(cur):
        cur = cur.args[0]
    return cur


def value_sources(node: fx.Node) -> list[fx.Node]:
    """The tensors whose values `node` only rearranges: walks down view-like ops and concatenations
    (torch.cat, torch.stack) to the first nodes that compute something."""
    out, seen, stack = [], set(), [node]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if _is_view_like(cur):
            stack.append(cur.args[0])
        elif isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in _GATHER_FUNCTIONS \
                and isinstance(cur.args[0], (list, tuple)) and all(isinstance(a, fx.Node) for a in cur.args[0]):
            stack.extend(cur.args[0])
        else:
            out.append(cur)
    return out


def _concrete_shape(node: fx.Node, ctx: MatchContext) -> tuple[int, ...]:
    return tuple(tp.concrete_int(s) for s in ctx.shape(node))


@dataclass
class BiasProof:
    # (coefficient, node, tensor factors, row) per term of c = -sum(coef * node[row] * factors): row None for a
    # (..., 1, Tk) key term, "last" for a (..., Tq, Tk) static bias whose last query row gives c (static_bias.py)
    key_terms: list
    guards: list = field(default_factory=list)     # re-check static biases at new sizes / module states


def _is_bias_matrix(t: Term, ctx: MatchContext) -> bool:
    """A (Tq, Tk) term that is not a 0/-inf mask at the compile-time values (ALiBi, a static decay, a
    precomputed bias with the causal fill in it). False when it cannot be evaluated now (then it is
    treated as a mask, whose proof says why not)."""
    try:
        value = ctx.evaluate(t.node, reader=t.reader)
    except NotProven:
        return False
    if not isinstance(value, torch.Tensor) or value.dtype == torch.bool:
        return False
    return not bool(((value == 0) | (value <= MASK_FILL_MAX)).all())


def _reversed_gate_check(key_terms: list) -> None:
    for coef, node, _, _ in key_terms:
        if coef > 0 and is_log_gate_cumsum(view_base(node)):
            raise NotProven("the bias is reversed (c_j - c_i of a cumulative log forget gate): "
                            "attention would grow with distance, which is not FoX")


def prove_bias(dec: Decomposition, ctx: MatchContext, Tq: int, Tk: int) -> BiasProof | None:
    """None when there is no bias at all (plain attention); NotProven when it is not c_i - c_j.

    Terms by shape: (..., Tq, 1) query, (..., 1, Tk) key, (..., Tq, Tk) a mask or a bias matrix.
    Query and key terms together must pair up as c_i - c_j (random stand-ins for data, exact values for
    static terms); key terms alone are a one-sided bias and bias matrices a static decay, both proven on
    exact values under the causal mask (patterns/static_bias.py)."""
    query, key, additive = [], [], []
    for t in dec.terms:
        s = _concrete_shape(t.node, ctx)
        if len(s) < 2:
            if len(s) == 0 or s[-1] == 1:
                continue                                  # a constant shift
            raise NotProven(f"bias term {t.node.name} of shape {s} is not of the form c_i - c_j")
        rows, cols = s[-2], s[-1]
        if cols == 1 and rows == Tq:                      # with Tq == 1 this is the (..., 1, 1) c_i
            query.append(t)
        elif rows == 1 and cols == 1:
            continue                                      # per-head constant: cancels in softmax
        elif rows == 1 and cols == Tk:
            key.append(t)
        elif (rows, cols) == (Tq, Tk):
            additive.append(t)
        else:
            raise NotProven(f"bias term {t.node.name} of shape {s} does not broadcast to the logits")
    matrices = [t for t in additive if Tq > 1 and _is_bias_matrix(t, ctx)]
    for t in additive:
        dec.masks.append(Mask(t.node, True, additive=True, reader=t.reader, fills_only=t in matrices))
        if t in matrices:
            continue
        if tensor_factors(t.coef):
            raise NotProven(f"additive term {t.node.name} is multiplied by a tensor")
        if numeric_coef(t.coef) <= 0:
            raise NotProven(f"additive term {t.node.name} enters the logits with a negative sign")
    guards, static_terms = [], []
    for t in matrices:                      # ALiBi, static decays: c = -(the last query row)
        fills_ok = not tensor_factors(t.coef) and numeric_coef(t.coef) > 0
        guards += sb.prove_static(ctx, [t], lambda values, t=t, ok=fills_ok: sb.check_row_shift(
            values[0], t.node.name, ok), "bias matrix")
        static_terms.append((numeric_coef(t.coef), t.node, tensor_factors(t.coef), "last"))
    if not query and not key:
        if static_terms:
            return BiasProof(static_terms, guards)
        for t in additive:                       # plain attention, unless the "mask" is a bias
            try:
                _masked(Mask(t.node, True, additive=True), ctx.evaluate(t.node, reader=t.reader))
            except NotProven as err:
                raise NotProven(f"an additive (Tq, Tk) bias that is not c_i - c_j ({err})") from None
        return None
    if not key:
        raise NotProven("the bias depends only on the query position (a per-row shift that softmax ignores, with "
                        "no key-side term): not c_i - c_j")
    key_terms = [(numeric_coef(t.coef), t.node, tensor_factors(t.coef), None) for t in key]
    _reversed_gate_check(key_terms)
    # Two groups, each c_i - c_j on its own (then so is their sum): terms from per-call data (a gate), proven
    # by random stand-ins, and static terms (sizes, constants, module state: ALiBi), proven on exact values.
    static = [t for t in query + key if sb.is_static(ctx, [t, *_factor_terms(t)])]
    for part, terms in (("per-call", [t for t in query + key if t not in static]), ("static", static)):
        q_part, k_part = [t for t in terms if t in query], [t for t in terms if t in key]
        if not terms:
            continue
        if not k_part:
            raise NotProven(f"the {part} part of the bias depends only on the query position (a per-row shift "
                            "with no key-side term): not c_i - c_j")
        if part == "per-call" and (q_part or Tq == 1):
            _prove_pairing_by_stand_ins(ctx, q_part, k_part, Tq, Tk)
        elif not q_part:
            # One-sided key bias b_j (BLOOM, MPT): c = -b, the row shift b_i cancels under the causal mask.
            guards += sb.prove_static(ctx, k_part, lambda values, k_part=k_part: [
                sb.check_key_bias(v, t.node.name) for v, t in zip(values, k_part)], "one-sided key bias")
        else:
            # Both sides static (slope * i - slope * j from two aranges): exact values. Per-head factors shared
            # by every term factor out; others are evaluated with the terms.
            factors = [] if _same_factors(terms) else [f for t in terms for f in _factor_terms(t)]
            n_q, n_k = len(q_part), len(k_part)
            guards += sb.prove_static(ctx, q_part + k_part + factors, lambda values, q_part=q_part, k_part=k_part, \
                                      n_q=n_q, n_k=n_k, with_factors=bool(factors): _check_pairing(
                values[:n_q], values[n_q:n_q + n_k], values[n_q + n_k:], q_part, k_part, with_factors), "two-sided bias")
    return BiasProof(key_terms + static_terms, guards)


def _factor_terms(t: Term) -> list:
    """The per-head factors of a term, as terms to evaluate (read where the term is read)."""
    return [Term([], f, t.reader) for f, _ in tensor_factors(t.coef)]


def _same_factors(terms: list) -> bool:
    """Every term has the same per-head factors (then they factor out of the pairing)."""
    first = sorted((id(f), inv) for f, inv in tensor_factors(terms[0].coef))
    return all(sorted((id(f), inv) for f, inv in tensor_factors(t.coef)) == first for t in terms)


def _check_pairing(q_values: list, k_values: list, f_values: list, query: list, key: list, with_factors: bool) -> None:
    """Exact values: the sum of the query terms at i == -(the sum of the key terms) at i + off. f_values: the
    terms' per-head factors in order (when they differ between terms; else left out, as they factor out)."""
    f_iter = iter(f_values)

    def side(values, terms, squeeze_dim):
        total = None
        for val, t in zip(values, terms):
            val = val.to(torch.float64) * numeric_coef(t.coef)
            for _, inverse in (tensor_factors(t.coef) if with_factors else ()):
                f = next(f_iter).to(torch.float64)
                val = val / f if inverse else val * f
            total = val if total is None else total + val
        return total.squeeze(squeeze_dim)
    q_side = side(q_values, query, -1)
    k_side = side(k_values, key, -2)
    _compare_sides(q_side, k_side)


def _compare_sides(q_side: torch.Tensor, k_side: torch.Tensor) -> None:
    """q_side (..., Tq) against -k_side (..., Tk) at the query positions Tk - Tq + i."""
    Tq, Tk = q_side.shape[-1], k_side.shape[-1]
    if Tq > Tk:
        raise NotProven("the bias has more query positions than keys")
    q_side, k_side = torch.broadcast_tensors(q_side[..., None], k_side[..., None, :])
    lhs = q_side[..., 0]                           # (..., Tq)
    rhs = -k_side[..., 0, Tk - Tq:]                # (..., Tq)
    scale = max(1.0, float(lhs.abs().max())) if lhs.numel() else 1.0
    if not torch.allclose(lhs, rhs, rtol=1e-5, atol=1e-5 * scale):
        raise NotProven("the bias is not c_i - c_j (query and key sides differ; a reversed c_j - c_i or an arbitrary bias)")


def _prove_pairing_by_stand_ins(ctx: MatchContext, query: list, key: list, Tq: int, Tk: int) -> None:
    """Random stand-ins for the tensors the terms rearrange; the same source gets the same values, so
    the sides are compared by value through views, transposes and concatenations."""
    gen = torch.Generator().manual_seed(0)
    leaves: dict = {}

    def stand_ins(node: fx.Node, what: str, away_from_zero: bool) -> None:
        for base in value_sources(node):
            if base in leaves:
                continue
            bv = gu.fake(base)
            if not isinstance(bv, torch.Tensor) or not bv.dtype.is_floating_point:
                raise NotProven(f"{what} is not a floating-point view of a tensor")
            shape = tuple(tp.concrete_int(s) for s in bv.shape)
            values = (0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=torch.float64) if away_from_zero
                      else torch.randn(shape, generator=gen, dtype=torch.float64))
            leaves[base] = values.to(bv.dtype).to(bv.device)

    for t in query + key:
        stand_ins(t.node, f"bias term {t.node.name}", away_from_zero=False)
        for factor, _ in tensor_factors(t.coef):
            stand_ins(factor, f"the factor {factor.name}", away_from_zero=True)   # divided by: keep it off 0

    def factor_product(t):
        total = 1.0
        for factor, inverse in tensor_factors(t.coef):
            val = ctx.evaluate(factor, leaves=leaves, reader=t.reader).to(torch.float64)
            total = total / val if inverse else total * val
        return total

    def side(terms, squeeze_dim):
        total = None
        for t in terms:
            val = ctx.evaluate(t.node, leaves=leaves, reader=t.reader).to(torch.float64) * numeric_coef(t.coef)
            val = val * factor_product(t)
            total = val if total is None else total + val
        return total.squeeze(squeeze_dim)

    k_side = side(key, -2)                        # (..., Tk)
    q_side = side(query, -1) if query else -k_side[..., Tk - Tq:]   # (..., Tq)
    _compare_sides(q_side, k_side)


def _is_nonpositive_log_gate(node: Any) -> bool:
    """logsigmoid(x) or -softplus(x) (through casts): a log forget gate, <= 0 by construction."""
    while isinstance(node, fx.Node) and gu.is_op(node, "cast"):
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    name = getattr(node.target, "__name__", str(node.target))
    if name in ("logsigmoid", "log_sigmoid"):
        return True
    if gu.is_op(node, "neg"):
        inner = node.args[0]
        return isinstance(inner, fx.Node) and getattr(inner.target, "__name__", str(inner.target)) == "softplus"
    return False


def is_log_gate_cumsum(node: Any) -> bool:
    """A cumulative sum over the last dim of a log forget gate: a non-increasing c."""
    if not isinstance(node, fx.Node):
        return False
    name = getattr(node.target, "__name__", str(node.target))
    if name != "cumsum" or not node.args:
        return False
    return _is_nonpositive_log_gate(node.args[0])


def _masked(mask: Mask, value: torch.Tensor) -> torch.Tensor:
    if mask.additive:
        if mask.fills_only:
            return value <= MASK_FILL_MAX
        if not bool(((value == 0) | (value <= MASK_FILL_MAX)).all()):
            raise NotProven("an additive (Tq, Tk) term holds values other than 0 and -inf: an arbitrary bias")
        return value <= MASK_FILL_MAX
    if value.dtype != torch.bool:
        raise NotProven("a mask that is not boolean")
    return value if mask.masked_when else ~value


def masked_entries(masks: list, ctx: MatchContext, sizes=(), inputs=None) -> torch.Tensor | None:
    total = None
    for m in masks:
        val = ctx.evaluate(m.node, sizes=sizes, inputs=inputs, reader=m.reader)
        if not isinstance(val, torch.Tensor):
            raise NotProven("a mask that is not a tensor")
        mk = _masked(m, val)
        total = mk if total is None else (total | mk)
    return total


def is_causal(masked: torch.Tensor | None, Tq: int, Tk: int) -> bool:
    """masked (..., Tq', Tk') equals j > i + (Tk' - Tq') on every leading index (and has Tq <= Tk)."""
    if masked is None:
        return Tq == 1                      # one query sees every key: no mask is needed
    if masked.dim() < 2:
        return False
    tq, tk = masked.shape[-2], masked.shape[-1]
    if tq > tk:
        return False
    i = torch.arange(tq, device=masked.device)[:, None]
    j = torch.arange(tk, device=masked.device)[None, :]
    return bool((masked == (j > i + (tk - tq))).all())


ALTERNATIVE_SIZES = (1, 2, 3, 5, 17)


def prove_causal(dec: Decomposition, ctx: MatchContext, Tq: int, Tk: int, site: fx.Node) -> list:
    """Checks the masks; returns run-time guards for masks that read input tensors (buffers)."""
    masks = [m for m in dec.masks if m.node is not None]
    if not masks:
        if Tq == 1:
            return []
        raise NotProven("no causal mask")
    symbols = sorted({s for m in masks for s in ctx.symbol_inputs(m.node, m.reader)}, key=ctx.position.__getitem__)
    tensors = sorted({t for m in masks for t in ctx.tensor_inputs(m.node, reader=m.reader)}, key=ctx.position.__getitem__)
    # Example inputs without data (DDP's graph splitter compiles each piece on fake inputs): nothing
    # can be evaluated now. Only the recorded shapes are checked; the guard built below verifies the
    # mask on the first real call (and as its kind says after that) before the rewrite serves a call.
    no_data = [t for t in tensors if t.op == "placeholder" and tp.has_no_data(ctx.placeholders.get(t))]
    if no_data:
        for m in masks:
            s = gu.shape(m.node)
            s = None if s is None else tuple(tp.concrete_int(d) for d in s)
            if s is None or len(s) < 2 or s[-2] not in (1, Tq) or s[-1] not in (1, Tk):
                raise NotProven("the mask does not match the logits' shape")
    else:
        masked = masked_entries(masks, ctx)
        if masked.shape[-2:] != (Tq, Tk) and not (masked.shape[-2] in (1, Tq) and masked.shape[-1] in (1, Tk)):
            raise NotProven("the mask does not match the logits' shape")
        masked = masked.expand(*masked.shape[:-2], Tq, Tk)
        if not is_causal(masked, Tq, Tk):
            raise NotProven("the mask is not causal (j > i hidden, diagonal kept)")
    # Built from sizes: a quick look at other sequence lengths refuses masks that are causal only
    # at the compile length (each size alone). This is no proof: the guard below is.
    for s in (symbols if not no_data else ()):
        for value in ALTERNATIVE_SIZES:
            try:
                alt = masked_entries(masks, ctx, sizes={s: value})
            except NotProven:
                continue                    # e.g. a buffer shorter than this length
            if alt is not None and alt.dim() >= 2 and alt.shape[-2] > alt.shape[-1]:
                continue                    # more queries than keys: not a size this site can have
            if alt is None or not is_causal(alt, alt.shape[-2], alt.shape[-1]):
                raise NotProven(f"the mask is not causal when {s.name} = {value}")
    if not tensors and not symbols:
        return []                           # built from constants only: proven exactly above
    if any(t.op == "get_attr" for t in tensors):
        raise NotProven("a mask read from a module attribute (get_attr) is not guarded; pass it as an input")
    guarded = []
    for n in tensors + symbols:
        kind = input_kind(tp.graph_input_source(n), ctx.placeholders.get(n))
        if kind == "data":
            device = getattr(ctx.placeholders.get(n), "device", None)
            if device is None or device.type != "cpu":
                raise NotProven(
                    f"the mask is built from the graph input {n.name} (a tensor passed to the compiled code, "
                    "such as a padding mask): its contents would have to be checked on every call, which costs "
                    f"a device sync on {device}; build the mask in the model from sizes, keep it in a registered "
                    "buffer, or call acp_compile.fox_attention directly")
        guarded.append(GuardedInput(ctx.placeholder_index[n], kind))
    inputs_used = tensors + symbols
    indices = tuple(g.index for g in guarded)
    mask_graph = extract_subgraph(ctx, masks, inputs_used)
    cell: dict = {}

    def verify(inputs: list) -> bool:
        args = [tp.concrete_int(inputs[i]) if isinstance(inputs[i], torch.SymInt) else inputs[i] for i in indices]
        if "gm" not in cell:                      # built on first use: most guards never fire
            cell["gm"] = fx.GraphModule(torch.nn.Module(), mask_graph)
        with torch.no_grad():
            values = cell["gm"](*args)
        total = None
        for m, val in zip(masks, values):
            mk = _masked(m, val)
            total = mk if total is None else (total | mk)
        return total is not None and is_causal(total, total.shape[-2], total.shape[-1])

    return [MaskGuard(tuple(guarded), verify, site.name)]
