"""Turns the two matrix products of an attention into the op's operands.

  S = qk_product:  A @ B (matmul / @ / bmm, B = k^T) or einsum("<q>,<k>-><batch> t s")
  O = pv_product:  P @ V (matmul / @ / bmm) or einsum("<batch> t s,<v>-><out>")
Results, in the op's layout: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), as nodes or builders,
the scale factors found on the q and k sides, and `finish` mapping o (B, Hq, Tq, D) to O's value.

Layouts: 4D products are used as they are; 3D (bmm on (B*H, T, D) views) reuse the 4D tensor the
view was taken from when there is one (o is flattened back), else add a leading batch of 1.
Einsum operands are permuted to (batch, t, d) and o back to the einsum's output order, so
(B, T, H, D) inputs never need a copy. Grouped-query attention: k and v repeated by
repeat_interleave(g, dim=1) or by x[:, :, None].expand(B, Hkv, g, T, D).reshape(B, Hkv*g, T, D)
are replaced by the un-repeated tensors (the op maps query head h to kv head h // g); a repeat of
another kind is passed on as it is (correct, only not cheaper).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns.context import MatchContext
from acp_compile.patterns.match import NotProven


@dataclass
class QK:
    q: Any                       # node or builder, (B, Hq, Tq, D)
    k: Any                       # node or builder, (B, Hkv, Tk, D)
    factors: list = field(default_factory=list)
    c_layout: str = "4d"         # "4d": c terms are (B, H, ., .); "flat": (N, ., .) with a 4D source; "3d": no source
    einsum_batch: str = ""
    group_source: Any = None      # "grouped": the (B, Hkv, G, Tq, D) query (a builder), whose sizes c takes


def _strip_scalars(node: Any, factors: list) -> Any:
    """q * s, q / s, s * q (s a number or symbolic size): returns q and appends s (or 1/s)."""
    while isinstance(node, fx.Node) and (gu.is_op(node, "mul") or gu.is_op(node, "div")) and len(node.args) == 2:
        x, y = node.args
        if gu.is_op(node, "mul") and gu.is_scalar_value(x) and not gu.is_scalar_value(y):
            x, y = y, x
        if not gu.is_scalar_value(y) or len(node.users) != 1 or gu.is_inplace(node):
            break
        f = gu.fake(y)
        f = y if tp.is_symbolic(f) else f                # a symbolic factor keeps its node (the op may need it)
        factors.append(f if gu.is_op(node, "mul") else ("inv", f))
        node = x
    return node


def _is_last_two_transpose(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    nd = len(gu.shape(node) or ())
    if gu.is_op(node, "transpose") and len(node.args) == 3:
        dims = {d % nd if isinstance(d, int) else None for d in node.args[1:]}
        return dims == {nd - 1, nd - 2}
    if gu.is_op(node, "permute"):
        perm = node.args[1:] if len(node.args) > 2 else node.args[1]
        perm = [p % nd for p in perm] if all(isinstance(p, int) for p in perm) else None
        return perm == list(range(nd - 2)) + [nd - 1, nd - 2]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return True
    return False


def _transposed(node: Any) -> Any:
    """k from k^T: the transpose's input, or a builder emitting k^T.transpose(-2, -1)."""
    if _is_last_two_transpose(node):
        return node.args[0]
    return lambda graph: graph.call_method("transpose", (node, -2, -1))


def strip_kv_repeat(node: Any, ctx: MatchContext) -> Any:
    """The un-repeated kv tensor behind a GQA repeat with query-head h -> kv head h // g semantics."""
    if not isinstance(node, fx.Node):
        return node
    if gu.is_op(node, "repeat_interleave"):
        x = node.args[0]
        reps = gu.arg(node, 1, "repeats")
        dim = gu.arg(node, 2, "dim")
        if isinstance(reps, int) and dim in (1, -3) and len(gu.shape(x) or ()) == 4:
            return x
        return node
    if gu.is_op(node, "reshape") or gu.is_op(node, "flatten"):
        e = node.args[0]
        if isinstance(e, fx.Node) and gu.is_op(e, "expand"):
            u = e.args[0]
            us = gu.shape(u) or ()
            if isinstance(u, fx.Node) and len(us) == 5 and us[2] == 1:
                x = None
                if gu.is_op(u, "unsqueeze") and gu.arg(u, 1, "dim") in (2, -3):
                    x = u.args[0]
                elif gu.is_op(u, "getitem"):
                    # x[:, :, None] or Llama's x[:, :, None, :, :]: a new axis right after the heads
                    idx = u.args[1]
                    full = lambda i: (isinstance(i, slice) and i == slice(None)) or i is Ellipsis
                    if (isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None
                            and all(full(i) for i in idx[:2]) and all(full(i) for i in idx[3:])
                            and idx.count(Ellipsis) <= (1 if idx[-1] is Ellipsis else 0)):
                        x = u.args[0]
                xs = gu.shape(x) if x is not None else None
                out = gu.shape(node)
                if xs is not None and len(xs) == 4 and out is not None and len(out) == 4:
                    return x
    return node


def _source_4d(node: Any, n_lead: Any) -> fx.Node | None:
    """The 4D (B, H, T, D) tensor that a 3D (B*H, T, D) view `node` was reshaped from, if any."""
    if not isinstance(node, fx.Node):
        return None
    if gu.is_op(node, "reshape") or gu.is_op(node, "flatten"):
        x = node.args[0]
        xs = gu.shape(x)
        if xs is not None and len(xs) == 4:
            if tp.statically_equal(xs[0] * xs[1], n_lead):
                return x
    return None


def _size(graph: fx.Graph, node: fx.Node, dim: int) -> Any:
    s = gu.shape(node)
    if s is not None and isinstance(s[dim], int):
        return s[dim]
    return graph.call_method("size", (node, dim))


def parse_einsum(node: fx.Node) -> tuple[str, list[str], list]:
    eq = node.args[0]
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "->" not in eq or "." in eq:
        raise NotProven("einsum without an explicit output or with '...'")
    lhs, out = eq.replace(" ", "").split("->")
    ins = lhs.split(",")
    if len(ins) != 2 or len(ops) != 2:
        raise NotProven("einsum with other than two operands")
    return out, ins, ops


def _permute_builder(node: Any, labels: str, order: str) -> Any:
    if labels == order:
        return node
    perm = [labels.index(ch) for ch in order]
    return lambda graph: graph.call_method("permute", (node, *perm))


def product_inputs(S: fx.Node) -> tuple:
    """(A, B) of A @ B, matmul, bmm, or baddbmm(bias, A, B)."""
    if gu.is_op(S, "baddbmm"):                       # torch.baddbmm(bias, A, B) or bias.baddbmm(batch1=A, batch2=B)
        return gu.arg(S, 1, "batch1"), gu.arg(S, 2, "batch2")
    return S.args[0], S.args[1]


def _grouped_qk(S: fx.Node, out: str, la: str, lb: str, a: Any, b: Any) -> QK:
    """einsum("bhgid,bhjd->bhgij", q5, k): grouped-query attention with q viewed as (B, Hkv, G, T, D)
    and k, v not repeated. Query head h * G + g reads kv head h, the op's own GQA mapping, so q is
    flattened to (B, Hkv * G, T, D) and k passes as it is."""
    batch, t, s = out[:3], out[3], out[4]
    d = set(la) & set(lb) - set(out)
    kv_batch = batch[:2]
    if len(d) != 1 or sorted(la) != sorted(batch + t + "".join(d)) or sorted(lb) != sorted(kv_batch + s + "".join(d)):
        raise NotProven(f"einsum {S.args[0]!r} is not a grouped q k^T (q (b, h, g, t, d) against k (b, h, s, d))")
    (dl,) = d
    fa, fb = [], []
    a, b = _strip_scalars(a, fa), _strip_scalars(b, fb)
    q5 = memo(_permute_builder(a, la, batch + t + dl))
    q = lambda graph: graph.call_method("flatten", (as_node(graph, q5), 1, 2))
    k = _permute_builder(b, lb, kv_batch + s + dl)
    return QK(q, k, fa + fb, c_layout="grouped", einsum_batch=batch, group_source=q5)


def qk_operands(S: fx.Node, ctx: MatchContext) -> QK:
    if gu.is_op(S, "einsum"):
        out, (la, lb), (a, b) = parse_einsum(S)
        if len(out) == 5:
            return _grouped_qk(S, out, la, lb, a, b)
        if len(out) != 4:
            raise NotProven("einsum logits that are not 4D")
        batch, t, s = out[:2], out[2], out[3]
        d = set(la) & set(lb) - set(out)
        if len(d) != 1 or sorted(la) != sorted(batch + t + "".join(d)) or sorted(lb) != sorted(batch + s + "".join(d)):
            raise NotProven(f"einsum {S.args[0]!r} is not q k^T")
        (dl,) = d
        fa, fb = [], []
        a, b = _strip_scalars(a, fa), _strip_scalars(b, fb)
        q = _permute_builder(a, la, batch + t + dl)
        k = _permute_builder(b, lb, batch + s + dl)
        return QK(q, k, fa + fb, c_layout="4d", einsum_batch=batch)
    a, b = product_inputs(S)
    fa, fb = [], []
    a, b = _strip_scalars(a, fa), _strip_scalars(b, fb)
    sa = gu.shape(a)
    if sa is None or len(sa) not in (3, 4):
        raise NotProven("q k^T on tensors that are neither 3D nor 4D")
    k = _transposed(b)
    if isinstance(k, fx.Node):
        k = _strip_scalars(k, fb)                       # (k * s).transpose(-2, -1)
    if len(sa) == 4:
        return QK(a, k, fa + fb, c_layout="4d")
    kt = b.args[0] if _is_last_two_transpose(b) else None
    q4 = _source_4d(a, sa[0])
    k4 = _source_4d(kt, sa[0]) if kt is not None else None
    if q4 is not None and k4 is not None:
        return QK(q4, k4, fa + fb, c_layout="flat")
    unsq = lambda x: (lambda graph: graph.call_method("unsqueeze", (x if isinstance(x, fx.Node) else x(graph), 0)))
    return QK(unsq(a), unsq(k), fa + fb, c_layout="3d")


@dataclass
class PV:
    v: Any
    finish: Callable | None


def pv_operands(O: fx.Node, P: fx.Node, qk: QK, ctx: MatchContext) -> PV:
    """O = P @ V (P the probabilities, first operand)."""
    if gu.is_op(O, "einsum"):
        out, (lp, lv), (p, v) = parse_einsum(O)
        if p is not P or qk.einsum_batch == "" and qk.c_layout != "4d":
            raise NotProven("einsum P V with the probabilities not first")
        if qk.c_layout == "grouped":
            return _grouped_pv(O, out, lp, lv, v, qk.group_source)
        if len(lp) != 4 or len(out) != 4:
            raise NotProven("einsum P V that is not 4D")
        batch, t, s = lp[:2], lp[2], lp[3]
        e = set(lv) - set(lp)
        if len(e) != 1 or sorted(lv) != sorted(batch + s + "".join(e)) or sorted(out) != sorted(batch + t + "".join(e)):
            raise NotProven(f"einsum {O.args[0]!r} is not P V")
        (el,) = e
        vb = _permute_builder(v, lv, batch + s + el)
        inner = batch + t + el
        finish = None if out == inner else (lambda graph, o: graph.call_method("permute", (o, *[inner.index(ch) for ch in out])))
        return PV(vb, finish)
    p, v = O.args[0], O.args[1]
    sv = gu.shape(v)
    if sv is None:
        raise NotProven("P V without a known shape")
    if len(sv) == 4 and qk.c_layout == "4d":
        return PV(v, None)
    if len(sv) == 3 and qk.c_layout == "flat":
        v4 = _source_4d(v, sv[0])
        if v4 is not None:
            return PV(v4, lambda graph, o: graph.call_method("flatten", (o, 0, 1)))
        raise NotProven("bmm P V where v is not a view of a 4D tensor while q and k are")
    if len(sv) == 3 and qk.c_layout == "3d":
        return PV(lambda graph: graph.call_method("unsqueeze", (v, 0)),
                  lambda graph, o: graph.call_method("squeeze", (o, 0)))
    raise NotProven("q k^T and P V disagree on 3D/4D layout")


def scaled_by(x: Any, factors: list) -> Callable:
    """A builder emitting x * f (or x / f) for each per-head factor, kept in x's dtype."""
    def build(graph: fx.Graph) -> fx.Node:
        base = as_node(graph, x)
        out = base
        for f, inverse in factors:
            out = graph.call_function(operator.truediv if inverse else operator.mul, (out, f))
        return graph.call_method("type_as", (out, base))
    return build


def _grouped_pv(O: fx.Node, out: str, lp: str, lv: str, v: Any, q5: Any) -> PV:
    """einsum("bhgij,bhjd->bhgid", p, v) after a grouped q k^T: v passes as (B, Hkv, Tk, D) and the op's
    o (B, Hkv * G, Tq, D) is unflattened to (B, Hkv, G, Tq, D) and put in the einsum's output order."""
    if len(lp) != 5 or len(out) != 5:
        raise NotProven(f"einsum {O.args[0]!r} after a grouped q k^T is not a grouped P V")
    batch, t, s = lp[:3], lp[3], lp[4]
    e = set(lv) - set(lp)
    if len(e) != 1 or sorted(lv) != sorted(batch[:2] + s + "".join(e)) or sorted(out) != sorted(batch + t + "".join(e)):
        raise NotProven(f"einsum {O.args[0]!r} is not a grouped P V")
    (el,) = e
    vb = _permute_builder(v, lv, batch[:2] + s + el)
    inner = batch + t + el
    order = [inner.index(ch) for ch in out]

    def finish(graph: fx.Graph, o: fx.Node) -> fx.Node:
        o5 = graph.call_method("unflatten", (o, 1, (-1, _size(graph, as_node(graph, q5), 2))))
        return o5 if order == list(range(5)) else graph.call_method("permute", (o5, *order))
    return PV(vb, finish)


def memo(x: Any) -> Any:
    """A builder that emits its nodes once and then returns the same node (nodes pass through)."""
    if isinstance(x, fx.Node):
        return x
    cell: dict = {}

    def build(graph: fx.Graph) -> fx.Node:
        if "node" not in cell:
            cell["node"] = x(graph)
        return cell["node"]

    return build


def as_node(graph: fx.Graph, x: Any) -> fx.Node:
    return x if isinstance(x, fx.Node) else x(graph)


def c_builder(key_terms: list, layout: str, q_op: Any, group_source: Any = None,
              flatten: frozenset = frozenset()) -> Callable:
    """c (B, Hq, Tk) fp32 = -(sum of coef * key term).squeeze(-2), broadcast to q's (B, Hq).

    key_terms: (coef, node, tensor factors, row) with node (..., 1, Tk) in the logits' leading layout, or
    (..., Tq, Tk) with row "last" (a static bias matrix: its last query row, position Tk-1, holds -c up to a
    constant; patterns/static_bias.py), and tensor factors [(f, inverse)] of shape (..., 1, 1) (only with
    layout "4d"); layout as QK.c_layout; q_op: the (memoised) q operand of the op, whose sizes c is expanded to.
    flatten (layout "flat"): key-term nodes of shape (B, H, 1, Tk) added after the (B*H, Tq, Tk) logits were
    viewed as (B, H, Tq, Tk), with both leading sizes those of the view: reshaped to (B*H, 1, Tk), row b*H + h,
    the view's own relabelling, before they are summed with the flat terms.
    Built from the graph's own values, so c follows every length and module state the bias does.
    """
    if layout not in ("4d", "grouped") and any(factors for _, _, factors, _ in key_terms):
        raise NotProven("a per-head factor on the bias of a 3D (bmm) attention")

    def build(graph: fx.Graph) -> fx.Node:
        q = as_node(graph, q_op)
        total = None
        lead_dims = 0
        for coef, node, factors, row in key_terms:
            lead_dims = max(lead_dims, len(gu.shape(node)) - 2)
            if row == "last":
                node = graph.call_function(operator.getitem, (node, (Ellipsis, slice(-1, None), slice(None))))
            term = node if coef == -1.0 else graph.call_function(operator.mul, (node, -coef))
            if node in flatten:
                term = graph.call_method("reshape", (term, -1, 1, _size(graph, node, -1)))
            for f, inverse in factors:
                term = graph.call_function(operator.truediv if inverse else operator.mul, (term, f))
                lead_dims = max(lead_dims, len(gu.shape(f)) - 2)
            total = term if total is None else graph.call_function(operator.add, (total, term))
        c = graph.call_method("squeeze", (total, -2))                      # (lead..., Tk)
        if layout == "flat" and key_terms[0][1] in flatten:
            lead = (None,)                                                # (B*H, 1, Tk): not 1 wide
        else:
            lead = gu.shape(key_terms[0][1])[:-2] if layout == "flat" else (None,) * lead_dims
        qb, qh = _size(graph, q, 0), _size(graph, q, 1)
        if layout == "flat":
            if len(lead) == 1 and lead[0] != 1:
                c = graph.call_method("reshape", (c, qb, qh, -1))
            else:
                c = graph.call_method("reshape", (c, 1, 1, -1))
        elif layout == "grouped":                                         # (B, Hkv, G, Tk) -> (B, Hkv * G, Tk)
            q5 = as_node(graph, group_source)
            while len(lead) < 3:
                c = graph.call_method("unsqueeze", (c, 0))
                lead = (1, *lead)
            c = graph.call_method("expand", (c, *(_size(graph, q5, i) for i in range(3)), -1))
            c = graph.call_method("flatten", (c, 1, 2))
        else:                                                             # "4d", "3d": pad to (., ., Tk)
            while len(lead) < 2:
                c = graph.call_method("unsqueeze", (c, 0))
                lead = (1, *lead)
        c = graph.call_method("expand", (c, qb, qh, -1))
        c = graph.call_method("float", (c,))
        return graph.call_method("contiguous", (c,))

    return build
