"""Padded batches and packed documents: masks built from per-call data, proven by structure.

A mask that reads a tensor passed per call (Hugging Face's attention_mask, per-token document ids) is
data: its values change every call. What can be proven once is its *structure*: that it equals

    causal(i, j)  AND  key_valid[b, j]  AND  doc[b, i] == doc[b, j]

for whatever values the data holds; the values themselves go to the op at run time (key_mask, doc_ids).

How (prove_segments):
1. Leaves. Walking down from each mask, the data enters through *leaves*: a boolean node shaped
   (B, 1, ..., 1, Tk) (a key leaf: `pad[:, None, None, :]`, `attention_mask[:, None, None, :] == 0`), or
   an `==` / `!=` of two views of one integer (B, T) node, one along the query axis and one along the key
   axis (a document leaf: `doc[:, None, :, None] == doc[:, None, None, :]`). What computes a leaf does
   not matter: the graph computes it per call and the op receives that value.
2. Locality. Between the leaves and the mask only elementwise ops, broadcasts, `unsqueeze`, `None`
   indexing and full slices are allowed, so entry (b, h, i, j) of the mask reads a key leaf only at
   (b, j) and a document leaf only at (b, i, j). Any other op on data (a flip, a roll, a reduction, a
   cumsum after the leaf, a query-side view), data reaching a mask without a leaf, or an in-place write
   that involves data refuses the site.
3. Exhaustion. By 2, each entry is a function of its static part and the leaves' booleans there. The
   masks are evaluated with every leaf set to a constant True or False, every combination (at most
   2^4): exactly one combination must give the causal mask and every other must mask every entry.
   Hence mask(b, i, j) = causal(i, j) or (some leaf differs from its causal value at that entry), for
   every value the data can take. A document leaf must be causal when the ids are equal.
4. What the op computes. The op sees key j from row i when j is causal, key_mask[b, j] and j lies in the
   row's *run* of equal document ids. The graph's relation is equal ids anywhere, so the emitted code
   sorts each row by document id (stable: positions keep their order within a document), runs the op on
   the sorted q, k, v, c and key mask, where every id is one run, and puts o back in place: exact for
   any ids, no host sync (requires Tq == Tk). c_i - c_j is unchanged by the permutation.
5. Rows with no visible key (a left-padded row, a document of padding only). Eager gives what its
   fills make of them; the op gives 0. Only masks that *replace* logits (masked_fill, where, item
   assignment) applied last before the softmax are taken, all with one fill value F as the softmax reads
   it (after casts): F = -inf gives NaN rows (or 0 after a NaN clean-up of the probabilities); a finite F
   gives a uniform softmax, the mean of v over all Tk keys. The emitted code writes exactly that into
   the rows where the op's lse is -inf, with the same gradients (the replaced logits get none; v gets
   the mean's, or NaN through 0 x NaN as in eager). Additive padding masks are refused: a fully masked
   row's softmax of s + F depends on how s rounds against F.
6. Sizes. The static part (the causal mask from sizes or a buffer) is guarded as any mask: a guard
   re-runs step 3 for every new size or module state (the data tensors are read for their shapes only).
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns.aliasing import written_args
from acp_compile.patterns.guards import GuardedInput, MaskGuard, input_kind
from acp_compile.patterns.match import NotProven

MAX_LEAVES = 4

_ELEMENTWISE_FUNCTIONS = {
    operator.and_, operator.or_, operator.xor, operator.invert, operator.eq, operator.ne, operator.lt, operator.le,
    operator.gt, operator.ge, operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.not_, torch.logical_and, torch.logical_or, torch.logical_xor, torch.logical_not, torch.bitwise_and,
    torch.bitwise_or, torch.bitwise_xor, torch.bitwise_not, torch.eq, torch.ne, torch.lt, torch.le, torch.gt,
    torch.ge, torch.where, torch.masked_fill, torch.add, torch.sub, torch.mul, torch.neg, torch.clone,
}
_ELEMENTWISE_METHODS = {
    "__and__", "__or__", "__xor__", "__invert__", "__rand__", "__ror__", "__rxor__", "logical_and", "logical_or",
    "logical_xor", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "eq", "ne", "lt", "le",
    "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "masked_fill", "where", "add", "sub",
    "mul", "__add__", "__sub__", "__mul__", "__radd__", "__rsub__", "__rmul__", "neg", "__neg__", "bool", "float",
    "int", "long", "half", "bfloat16", "double", "to", "type", "type_as", "clone", "contiguous",
}
_EQUALITY = {operator.eq, operator.ne, torch.eq, torch.ne, "eq", "ne", "__eq__", "__ne__"}


@dataclass
class Leaf:
    node: fx.Node
    kind: str                   # "key" or "doc"
    ndim: int
    roles: tuple                # per axis: "b", "i", "j" or None
    equal: bool = True          # doc: == (True) or != (False)
    ids: fx.Node | None = None  # doc: the (B, T) integer node compared

    def constant(self, value: bool) -> torch.Tensor:
        """The leaf held at one value, as a (1, .., 1) bool tensor on the leaf's own device: the rest of the mask
        (a causal mask built with device=q.device, say) lives there, and a CPU probe would not combine with it."""
        fake = gu.fake(self.node)
        device = fake.device if isinstance(fake, torch.Tensor) else None
        return torch.full((1,) * self.ndim, value, dtype=torch.bool, device=device)


@dataclass
class SegmentProof:
    key_leaves: list = field(default_factory=list)     # [(leaf node, value when the key is visible)]
    doc_ids: fx.Node | None = None                      # the (B, Tk) integer ids, or None
    empty_rows: str | None = None                       # "nan", "mean", "zero": eager's rows with no visible key
    guards: list = field(default_factory=list)


def _is_elementwise(n: fx.Node) -> bool:
    if n.op == "call_function":
        if n.target is torch.where and len(n.args) + len(n.kwargs) < 3:
            return False
        return n.target in _ELEMENTWISE_FUNCTIONS
    if n.op == "call_method":
        if n.target == "where" and len(n.args) < 3:
            return False
        return n.target in _ELEMENTWISE_METHODS
    return False


def _is_equality(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _EQUALITY and len(n.args) == 2
    if n.op == "call_method":
        return n.target in _EQUALITY and len(n.args) == 2
    return False


def _ndim(n: Any) -> int | None:
    s = gu.shape(n)
    return None if s is None else len(s)


def _view_roles(n: fx.Node, roles: tuple) -> tuple | None:
    """roles of a view of a node with `roles`: unsqueeze, indexing by None / full slices / Ellipsis, expand.
    None when n is not such a view (or moves a role axis)."""
    src = n.args[0]
    in_shape, out_shape = gu.shape(src), gu.shape(n)
    if in_shape is None or out_shape is None:
        return None
    if gu.is_op(n, "unsqueeze"):
        d = gu.arg(n, 1, "dim")
        if not isinstance(d, int):
            return None
        d = d % (len(in_shape) + 1)
        return roles[:d] + (None,) + roles[d:]
    if gu.is_op(n, "getitem"):
        index = n.args[1]
        index = index if isinstance(index, tuple) else (index,)
        if not all(i is None or i is Ellipsis or isinstance(i, slice) for i in index) or \
                sum(i is Ellipsis for i in index) > 1:
            return None
        n_real = sum(isinstance(i, slice) for i in index)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (len(in_shape) - n_real) + index[at + 1:]
        else:
            index = index + (slice(None),) * (len(in_shape) - n_real)
        out, axis = [], 0
        for i in index:
            if i is None:
                out.append(None)
                continue
            if i.step not in (None, 1) or i.start not in (None, 0) or axis >= len(in_shape):
                return None
            out.append(roles[axis])
            axis += 1
        if axis != len(in_shape) or len(out) != len(out_shape):
            return None
        # every slice keeps its whole axis (x[:, :, :, :Tk] at full length)
        for r_in, r_out in zip(range(len(in_shape)), [k for k, i in enumerate(index) if i is not None]):
            if not tp.statically_equal(in_shape[r_in], out_shape[r_out]):
                return None
        return tuple(out)
    if gu.is_op(n, "expand") or (n.op == "call_method" and n.target == "expand_as"):
        extra = len(out_shape) - len(in_shape)
        if extra < 0:
            return None
        out = (None,) * extra + roles
        for axis, r in enumerate(out):
            if r is not None and not tp.statically_equal(in_shape[axis - extra], out_shape[axis]):
                return None
        return out
    return None


class _Tracker:
    """Finds the leaves under the masks and the role of each axis of every node that reads them."""

    def __init__(self, ctx, B, Tk, data_roots: set):
        self.ctx, self.B, self.Tk, self.data_roots = ctx, B, Tk, data_roots
        self.tainted: dict = {}
        self.roles: dict = {}            # node -> {leaf node: roles tuple}
        self.leaves: dict = {}           # leaf node -> Leaf

    def is_tainted(self, n: Any) -> bool:
        if not isinstance(n, fx.Node):
            return False
        if n in self.tainted:
            return self.tainted[n]
        self.tainted[n] = False          # cycles cannot happen in a DAG; guards the recursion
        if n.op == "placeholder":
            out = n in self.data_roots
        elif gu.reads_metadata_only(n):
            out = False                  # a size, a dtype: not the data (a number computed from data stays tainted)
        else:
            out = any(self.is_tainted(a) for a in n.all_input_nodes)
        self.tainted[n] = out
        return out

    def _key_leaf(self, n: fx.Node) -> Leaf | None:
        v = gu.fake(n)
        if not isinstance(v, torch.Tensor) or v.dtype != torch.bool or v.dim() < 2:
            return None
        s = tuple(v.shape)
        if not (tp.statically_equal(s[0], self.B) and tp.statically_equal(s[-1], self.Tk)
                and all(tp.statically_equal(d, 1) for d in s[1:-1])):
            return None
        return Leaf(n, "key", len(s), ("b",) + (None,) * (len(s) - 2) + ("j",))

    def _doc_leaf(self, n: fx.Node) -> Leaf | None:
        if not _is_equality(n):
            return None
        x, y = n.args
        if not isinstance(x, fx.Node) or not isinstance(y, fx.Node):
            return None
        bx, rx = self._id_view(x)
        by, ry = self._id_view(y)
        if bx is None or bx is not by:
            return None
        nd = _ndim(n)
        rx, ry = (None,) * (nd - len(rx)) + rx, (None,) * (nd - len(ry)) + ry
        roles = []
        for a, b in zip(rx, ry):
            if a == "b" or b == "b":
                if a != b:
                    return None
                roles.append("b")
            elif a == "t" and b is None:
                roles.append("x")
            elif b == "t" and a is None:
                roles.append("y")
            elif a is None and b is None:
                roles.append(None)
            else:
                return None                     # the two views put the positions on the same axis
        if roles.count("x") != 1 or roles.count("y") != 1 or roles.count("b") != 1:
            return None
        first = min(roles.index("x"), roles.index("y"))
        roles = tuple("i" if k == first else "j" if r in ("x", "y") else r for k, r in enumerate(roles))
        equal = n.target in (operator.eq, torch.eq, "eq", "__eq__")
        return Leaf(n, "doc", nd, roles, equal=equal, ids=bx)

    def _id_view(self, n: fx.Node):
        """(the integer (B, T) node, roles with "b" and "t") when n is a view of one; (None, None) otherwise."""
        chain = []
        cur = n
        while True:
            v = gu.fake(cur)
            if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.dtype.is_floating_point \
                    and not v.dtype.is_complex and v.dtype != torch.bool and self.is_tainted(cur) \
                    and tp.statically_equal(v.shape[0], self.B) and tp.statically_equal(v.shape[1], self.Tk):
                break
            if not (gu.is_op(cur, "unsqueeze") or gu.is_op(cur, "getitem")) or not isinstance(cur.args[0], fx.Node):
                return None, None
            chain.append(cur)
            cur = cur.args[0]
        roles = ("b", "t")
        for view in reversed(chain):
            roles = _view_roles(view, roles)
            if roles is None:
                return None, None
        return cur, roles

    def track(self, n: Any) -> dict:
        """{leaf: roles} for node n (empty when n reads no data). Raises NotProven when data reaches n by a
        path the proof cannot follow."""
        if not isinstance(n, fx.Node) or not self.is_tainted(n):
            return {}
        if n in self.roles:
            return self.roles[n]
        leaf = self._key_leaf(n) or self._doc_leaf(n)
        if leaf is not None:
            self.leaves[n] = leaf
            self.roles[n] = {n: leaf.roles}
            return self.roles[n]
        if n.op == "placeholder":
            raise NotProven(f"the mask reads the per-call input {n.name} other than as a key padding mask "
                            "(B, 1, 1, Tk) or a document-id comparison")
        ins = [a for a in n.all_input_nodes if self.is_tainted(a)]
        if written_args(n):
            raise NotProven(f"{n.name} writes in place into a mask built from per-call data")
        view = gu.is_op(n, "unsqueeze") or gu.is_op(n, "getitem") or gu.is_op(n, "expand") or \
            (n.op == "call_method" and n.target == "expand_as")
        if view and ins and ins[0] is n.args[0]:
            if len(ins) > 1:
                raise NotProven(f"{n.name}: a view indexed by per-call data")
            out = {}
            for leaf, roles in self.track(n.args[0]).items():
                r = _view_roles(n, roles)
                if r is None:
                    raise NotProven(f"{n.name} moves the positions of a padding or document mask (only unsqueeze, "
                                    "None indexing, full slices and expand are followed)")
                out[leaf] = r
            self.roles[n] = out
            return out
        if not _is_elementwise(n):
            raise NotProven(f"{n.name} ({getattr(n.target, '__name__', n.target)}) computes on per-call data in "
                            "the mask without being an elementwise op on a key padding mask or a document-id "
                            "comparison")
        nd = _ndim(n)
        out_shape = gu.shape(n)
        if nd is None:
            raise NotProven(f"no shape recorded for {n.name}")
        out: dict = {}
        for a in ins:
            a_shape = gu.shape(a)
            for leaf, roles in self.track(a).items():
                if len(roles) > nd:
                    raise NotProven(f"{n.name} reduces the rank of a mask built from per-call data")
                r = (None,) * (nd - len(roles)) + roles
                for axis, role in enumerate(r):
                    if role is not None and not tp.statically_equal(a_shape[axis - (nd - len(roles))],
                                                                     out_shape[axis]):
                        raise NotProven(f"{n.name} broadcasts a position axis of a padding or document mask")
                if leaf in out and out[leaf] != r:
                    raise NotProven(f"{n.name} combines a padding or document mask with itself at other positions")
                out[leaf] = r
        self.roles[n] = out
        return out


def _data_roots(ctx, masks: list) -> set:
    roots = set()
    for m in masks:
        for n in ctx.tensor_inputs(m.node, reader=m.reader):
            if n.op != "placeholder":
                continue
            kind = input_kind(tp.graph_input_source(n), ctx.placeholders.get(n))
            if kind == "data":
                roots.add(n)
    return roots


def _effective_fills(dec, top: fx.Node, softmax_dtype, ctx) -> list:
    """The fill of each mask as the softmax reads it: every mask must replace logits within the last steps
    before the softmax (only casts and other masks above it), so its entries are the fill, cast as they are."""
    readers = {m.reader: m for m in dec.masks}
    pos = ctx.position
    above: list = []                     # dtypes of the chain values above the current node, nearest last
    seen = {}
    cur = top
    while isinstance(cur, fx.Node):
        if cur in readers:
            seen[cur] = list(above)
        val = gu.fake(cur)
        dtype = val.dtype if isinstance(val, torch.Tensor) else None
        if cur in readers:
            m = readers[cur]
            if gu.is_op(cur, "masked_fill") or cur.target is operator.setitem:
                nxt = cur.args[0]
            elif gu.is_op(cur, "where"):
                nxt = cur.args[1] if m.fill is cur.args[2] else cur.args[2]
            else:
                break
        elif gu.is_op(cur, "cast") or (cur.op == "call_method" and cur.target in ("contiguous", "clone")):
            nxt = cur.args[0]
        else:
            break
        if dtype is not None:
            above.append(dtype)
        if not isinstance(nxt, fx.Node):
            break
        cur = gu.effective_value(nxt, cur, pos)
    fills = []
    for m in dec.masks:
        if m.reader not in seen:
            raise NotProven(f"the mask applied at {m.reader.name} is followed by other arithmetic before the softmax; "
                            "with padding, apply the masks last (masked_fill or where just before the softmax)")
        f = m.fill
        if isinstance(f, fx.Node):
            f = ctx.evaluate(f, reader=m.reader)
            f = float(f.reshape(())) if isinstance(f, torch.Tensor) else float(f)
        t = torch.tensor(float(f), dtype=torch.float64)
        out_val = gu.fake(m.reader.args[0] if m.reader.target is operator.setitem else m.reader)
        chain = [out_val.dtype] + list(reversed(seen[m.reader])) if isinstance(out_val, torch.Tensor) else []
        for n_cast, dt in enumerate(chain + ([softmax_dtype] if softmax_dtype is not None else [])):
            finite = bool(torch.isfinite(t))
            t = t.to(dt)
            if n_cast == 0 and finite and not bool(torch.isfinite(t)):
                # masked_fill raises on such a value in eager; where() would fill -inf: not guessed here
                raise NotProven(f"the fill {float(f):g} does not fit the logits' dtype {dt}")
        fills.append(float(t))
    return fills


def prove_segments(dec, ctx, Tq: int, Tk: int, logits_shape: tuple, top: fx.Node, softmax_dtype,
                   cleaned: bool) -> SegmentProof | None:
    """None when no mask reads per-call data (the ordinary proof applies); a SegmentProof when the masks are
    proven to be causal AND key padding AND same document (module notes); NotProven otherwise."""
    masks = [m for m in dec.masks if m.node is not None]
    if not masks:
        return None
    roots = _data_roots(ctx, masks)
    if not roots:
        return None
    if len(logits_shape) != 4:
        raise NotProven("a padding or document mask on logits that are not (B, H, Tq, Tk)")
    B = logits_shape[0]
    tracker = _Tracker(ctx, B, logits_shape[-1], roots)
    for m in masks:
        if not m.replaces:
            raise NotProven("an additive padding or document mask: a row with no visible key gets a softmax of "
                            "s + fill that depends on how s rounds against the fill; apply the mask with "
                            "masked_fill or torch.where")
        roles = tracker.track(m.node)
        if not roles:
            continue
        nd = _ndim(m.node)
        if nd != 4:
            raise NotProven(f"the mask {m.node.name} built from per-call data is not (B, H, Tq, Tk)-aligned")
        for leaf, r in roles.items():
            want = {"b": 0, "i": 2, "j": 3}
            for role, axis in want.items():
                if role in r and r.index(role) != axis:
                    raise NotProven(
                        f"the per-call mask {leaf.name} lands on the wrong axis of the logits "
                        f"({'query' if r.index(role) == 2 else 'head' if r.index(role) == 1 else 'key'} axis for "
                        f"its {'batch' if role == 'b' else 'query' if role == 'i' else 'key'} positions): a padding "
                        "mask applied on the query side, or a broadcast across the wrong dims")
    leaves = list(tracker.leaves.values())
    if not leaves:
        raise NotProven("the mask reads per-call data but no key padding mask or document-id comparison was found")
    if len(leaves) > MAX_LEAVES:
        raise NotProven("too many padding and document masks in one attention")
    docs = [lf for lf in leaves if lf.kind == "doc"]
    if len({id(lf.ids) for lf in docs}) > 1:
        raise NotProven("two different document-id tensors in one mask")
    if docs and Tq != Tk:
        raise NotProven("a document mask with fewer queries than keys (Tq < Tk)")
    # In-place writes anywhere the masks read from: only writes that touch no per-call data are followed
    # (by evaluation); others change a leaf or a combination behind the structural proof.
    leaf_nodes = {lf.node: None for lf in leaves}
    deps = set()
    for m in masks:
        deps.update(ctx.dependencies(m.node, leaf_nodes, m.reader))
    for n in deps:
        if n in leaf_nodes:
            continue
        if written_args(n) and any(tracker.is_tainted(a) for a in n.all_input_nodes):
            raise NotProven(f"{n.name} writes in place into a padding or document mask (or with per-call data)")
    for lf in leaves:                                   # writes into a leaf between it and the mask
        for m in masks:
            if ctx.storages.writers(lf.node, after=ctx.position[lf.node], before=ctx.position[m.reader]):
                raise NotProven(f"the padding or document mask {lf.node.name} is written in place after it was built")
    check = _combination_check(leaves, masks, Tq, Tk)
    check(lambda values: _evaluate(ctx, masks, values))
    fills = _effective_fills(dec, top, softmax_dtype, ctx)
    if all(f == float("-inf") for f in fills):
        empty = "zero" if cleaned else "nan"
    elif len(set(fills)) == 1 and fills[0] != float("-inf"):
        empty = "mean"
    else:
        raise NotProven(f"the masks fill with different values as the softmax reads them ({sorted(set(fills))}): "
                        "a row with no visible key would mix them")
    proof = SegmentProof(empty_rows=empty if any(lf.kind == "key" for lf in leaves) else None)
    causal_values = check.causal_values
    for lf, val in zip(leaves, causal_values):
        if lf.kind == "key":
            proof.key_leaves.append((lf.node, val))
        elif val != lf.equal:
            raise NotProven("the mask keeps keys of *other* documents (ids compared unequal)")
        else:
            proof.doc_ids = lf.ids
    proof.guards = _guards(ctx, masks, leaves, leaf_nodes, check)
    return proof


def key_mask_builder(key_leaves: list):
    """A builder of the op's key mask (B, Tk) bool from the key leaves: each (B, 1, .., 1, Tk) leaf flattened,
    equal to its value on visible keys, all of them together."""
    def build(graph: fx.Graph) -> fx.Node:
        total = None
        for leaf, value in key_leaves:
            x = graph.call_method("flatten", (leaf, 1))
            if not value:
                x = graph.call_function(torch.logical_not, (x,))
            total = x if total is None else graph.call_function(torch.logical_and, (total, x))
        return total
    return build


def _evaluate(ctx, masks, leaf_values: dict) -> list:
    return [ctx.evaluate(m.node, leaves=leaf_values, reader=m.reader) for m in masks]


def _combination_check(leaves: list, masks: list, Tq: int, Tk: int):
    """check(evaluate) runs every combination of constant leaves through evaluate(leaf values) -> mask values and
    raises NotProven unless exactly one is causal and all others mask everything; check.causal_values: that one."""
    from acp_compile.patterns.logits import _masked, is_causal

    def check(evaluate) -> None:
        causal = []
        for combo in itertools.product((True, False), repeat=len(leaves)):
            values = {lf.node: lf.constant(val) for lf, val in zip(leaves, combo)}
            total = None
            for m, val in zip(masks, evaluate(values)):
                if not isinstance(val, torch.Tensor):
                    raise NotProven("a mask that is not a tensor")
                mk = _masked(m, val)
                total = mk if total is None else (total | mk)
            tq, tk = total.shape[-2], total.shape[-1]
            if tq not in (1, Tq) or tk not in (1, Tk):
                raise NotProven("the mask does not match the logits' shape")
            total = total.expand(*total.shape[:-2], Tq, Tk)
            if is_causal(total, Tq, Tk):
                causal.append(combo)
            elif not bool(total.all()):
                raise NotProven("with a padding or document mask constant, the mask is neither causal nor hides "
                                "every key: it is not causal AND (key is valid) AND (same document)")
        if len(causal) != 1:
            raise NotProven("the mask is causal for no (or several) values of the padding / document masks")
        check.causal_values = causal[0]
    return check


def _guards(ctx, masks, leaves, leaf_nodes, check) -> list:
    """A size / module-state guard that runs the combination check again for new sizes (data inputs are read
    for their shapes only, through the leaves' producers that are cut off here)."""
    pos = ctx.position
    deps = sorted({d for m in masks for d in ctx.dependencies(m.node, leaf_nodes, m.reader)}, key=pos.__getitem__)
    inputs = [d for d in deps if d.op in ("placeholder", "get_attr") and d not in leaf_nodes]
    if any(d.op == "get_attr" for d in inputs):
        raise NotProven("a mask read from a module attribute (get_attr) is not guarded; pass it as an input")
    if not inputs:
        return []
    guarded = []
    for n in inputs:
        example = ctx.placeholders.get(n)
        kind = input_kind(tp.graph_input_source(n), example)
        if kind == "data":
            if not all(gu.reads_metadata_only(u) for u in n.users if u in deps):
                raise NotProven(f"the mask reads the per-call input {n.name} outside its padding or document masks")
            kind = "shape"
        guarded.append(GuardedInput(ctx.placeholder_index[n], kind))
    graph = fx.Graph()
    env: dict = {}
    for n in inputs:
        env[n] = graph.placeholder(n.name)
    order = [lf.node for lf in leaves]
    for n in order:
        env[n] = graph.placeholder(f"leaf_{n.name}")
    for n in deps:
        if n in env:
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[m.node] for m in masks))
    cell: dict = {}
    indices = tuple(g.index for g in guarded)

    def verify(call_inputs: list) -> bool:
        args = [tp.concrete_int(call_inputs[i]) if isinstance(call_inputs[i], torch.SymInt) else call_inputs[i]
                for i in indices]
        if "gm" not in cell:
            cell["gm"] = fx.GraphModule(torch.nn.Module(), graph)
        def evaluate(values):
            with torch.no_grad():
                return list(cell["gm"](*args, *[values[n] for n in order]))
        try:
            # sizes at this call from the masks' broadcast shape (leaves are size 1 here; an axis the static part
            # lacks is one along which nothing varies, and a query axis of 1 with several queries was refused at
            # compile time: a row-constant mask is not causal)
            probe = evaluate({lf.node: lf.constant(True) for lf in leaves})
            shape = torch.broadcast_shapes(*[p.shape for p in probe])
            c = _combination_check(leaves, masks, shape[-2], shape[-1])
            c(evaluate)
            return tuple(c.causal_values) == tuple(check.causal_values)
        except NotProven:
            return False

    return [MaskGuard(tuple(guarded), verify, "")]
