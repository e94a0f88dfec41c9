"""Anchor: softmax(logits, dim=-1) [cast] [dropout p=0 / eval] @ v.

  logits = S * scale + (c_i - c_j), causal mask       (proved in patterns/logits.py)
  S      = q @ k^T | matmul | bmm | einsum            (operands in patterns/operands.py)
  O      = P @ v   | matmul | bmm | einsum            (the node whose uses get the op's o)
The probabilities P and every intermediate of the logits must feed only this attention;
otherwise they are computed anyway and the site is a near-miss (the graph stays as it was).
"""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns import logits as lg
from acp_compile.patterns import operands as od  # od: operand builders
from acp_compile.patterns import segment_masks as sg
from acp_compile.patterns.context import MatchContext, is_default_scale
from acp_compile.patterns.dtypes import cast_operand, operand_cast
from acp_compile.patterns.match import FoxMatch, NearMiss, NotProven
from acp_compile.patterns.registry import register_anchor


def _softmax_dim_is_last(node: fx.Node) -> bool:
    dim = gu.arg(node, 1, "dim")
    nd = len(gu.shape(node) or ())
    return isinstance(dim, int) and nd >= 2 and dim % nd == nd - 1


_MATMULS = ("matmul", "bmm", "einsum")


def _is_nan_test(node: Any, of: fx.Node) -> bool:
    """torch.isnan(x) or x != x."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    name = _target_name(node)
    if name == "isnan":
        return node.args[0] is of
    if name in ("ne", "__ne__") or node.target is operator.ne:
        return len(node.args) == 2 and node.args[0] is of and node.args[1] is of
    return False


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _probability_step(cur: fx.Node, ctx: MatchContext):
    """The next node of the probability chain after `cur`, with the helper nodes it consumes:
    (next, helpers); None at the chain's end; a string when the chain is attention that cannot be
    rewritten (the reason).

    Steps that leave probabilities of causal attention on finite inputs unchanged: casts,
    contiguous, clone, dropout with p = 0 or in eval, and NaN clean-ups (nan_to_num, masked_fill or
    torch.where on isnan(p), or p[isnan(p)] = 0): a causal row always sees its diagonal, so its
    probabilities hold no NaN. (With NaN inputs the rewritten code returns NaN rows where the
    clean-up would have zeroed them.)"""
    users = list(cur.users)
    if len(users) == 1:
        u = users[0]
        name = _target_name(u)
        if u.args and u.args[0] is cur and (gu.is_op(u, "cast") or name in ("contiguous", "clone")):
            return u, []
        if gu.is_op(u, "dropout") and u.args and u.args[0] is cur:
            return (u, []) if _dropout_is_identity(u) else "dropout with p > 0 in training changes the attention"
        if u.args and u.args[0] is cur and gu.is_op(u, "reshape") and len(gu.shape(cur) or ()) == 4 \
                and len(gu.shape(u) or ()) == 3:
            return u, []           # BLOOM's probabilities viewed back to (B*H, Tq, Tk); _prove checks the pair
        if name == "nan_to_num" and u.args and u.args[0] is cur:
            nan = gu.arg(u, 1, "nan", 0.0)
            return (u, []) if _is_zero(nan) else f"{u.name}: nan_to_num with nan={nan!r} changes the probabilities"
        return None
    tests = [u for u in users if _is_nan_test(u, cur)]
    others = [u for u in users if u not in tests]
    if len(tests) == 1 and len(tests[0].users) == 1:
        test = tests[0]
        (use,) = test.users
        if gu.is_op(use, "masked_fill") and not gu.is_inplace(use) and use.args[0] is cur and others == [use] \
                and gu.arg(use, 1, "mask") is test and _is_zero(gu.arg(use, 2, "value")):
            return use, [test]
        if gu.is_op(use, "where") and len(use.args) == 3 and use.args[0] is test and _is_zero(use.args[1]) \
                and use.args[2] is cur and others == [use]:
            return use, [test]
        if use.op == "call_function" and use.target is operator.setitem and use.args[0] is cur \
                and use.args[1] is test and _is_zero(use.args[2]) and len(others) == 2 and use in others:
            (nxt,) = [u for u in others if u is not use]
            if ctx.position[test] < ctx.position[use] < ctx.position[nxt]:
                if any(gu.is_op(nxt, m) for m in _MATMULS) and nxt.args and nxt.args[0] is cur:
                    return _ChainEnd(nxt, [test, use])     # the cleaned probabilities go straight into @ v
                return nxt, [test, use]
    if any(gu.is_op(u, m) for u in users for m in _MATMULS):
        return "the attention probabilities are also used elsewhere"
    return None


def _first_within(start: fx.Node, neighbours, hops: int, hit):
    """Breadth-first from `start` over neighbours(node) for at most `hops` steps: the first node for
    which hit(node, seen) holds (seen: the nodes reached so far, itself included), else None."""
    frontier, seen = [start], set()
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for m in neighbours(n):
                if m in seen:
                    continue
                seen.add(m)
                if hit(m, seen):
                    return m
                nxt.append(m)
        frontier = nxt
    return None


class _ChainEnd(tuple):
    """_probability_step's answer when the chain ends at the current node after an in-place clean-up
    whose helpers it consumed: (the product that reads it, the helpers)."""

    def __new__(cls, product: fx.Node, helpers: list):
        return super().__new__(cls, (product, helpers))


def _over_a_product(softmax: fx.Node) -> bool:
    """The softmax's input is built from a matrix product within a few steps (attention logits, not,
    say, a router's linear layer)."""
    products = _MATMULS + ("baddbmm",)
    return _first_within(softmax, lambda n: n.all_input_nodes, 8,
                         lambda a, _: any(gu.is_op(a, m) for m in products)) is not None


def _silent_miss(softmax: fx.Node, end: fx.Node, anchor: str):
    """None when the softmax does not look like attention; a near-miss naming the step that stopped
    the chain when the softmax reads a q k^T product and the probabilities reach the first operand of
    another product within a few steps."""
    if not _over_a_product(softmax):
        return None

    def product_of_probabilities(u: fx.Node, seen: set) -> bool:
        return any(gu.is_op(u, m) for m in _MATMULS) and bool(u.args) and (
            u.args[0] in seen or u.args[0] is end or gu.is_op(u, "einsum"))

    if _first_within(end, lambda n: n.users, 4, product_of_probabilities) is None:
        return None
    blockers = sorted({_target_name(x) for x in end.users})
    return NearMiss(anchor, softmax.name, "the probabilities pass through "
                    f"{', '.join(blockers)} before the product with v; only casts, clones, dropout "
                    "that is off and NaN clean-ups are understood there")


def _target_name(node: fx.Node) -> str:
    """A call's name: the method name, or the function's __name__."""
    return str(node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target))


def _is_call(node: Any, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and _target_name(node) == name


def _normalised_by_hand(node: fx.Node):
    """The division node of e / e.sum(-1, keepdim=True) with e = exp(...), when its result is the
    first operand of a matrix product: a softmax written by hand."""
    if not _is_call(node, "exp"):
        return None
    for div in node.users:
        if not gu.is_op(div, "div") or div.args[0] is not node or not isinstance(div.args[1], fx.Node):
            continue
        total = div.args[1]
        if not (_is_call(total, "sum") and total.args and total.args[0] is node):
            continue
        if any(any(gu.is_op(u, m) for m in _MATMULS) and u.args and u.args[0] is div for u in div.users):
            return div
    return None


def _log_normalised(node: fx.Node):
    """(s, s - lse, lse) when node is exp(s - logsumexp(s, dim, keepdim=True)): a softmax of s."""
    if not _is_call(node, "exp") or not node.args or not gu.is_op(node.args[0], "sub"):
        return None
    sub = node.args[0]
    if len(sub.args) != 2 or sub.kwargs.get("alpha", 1) != 1 or len(sub.users) != 1:
        return None
    s, lse = sub.args
    if not _is_call(lse, "logsumexp") or len(lse.users) != 1:
        return None
    if not lse.args or lse.args[0] is not s or gu.arg(lse, 2, "keepdim", False) is not True:
        return None
    return s, sub, lse


def _dropout_is_identity(node: fx.Node) -> bool:
    p = gu.arg(node, 1, "p", 0.5)
    training = gu.arg(node, 2, "training", True) if node.target is not torch.dropout else gu.arg(node, 2, "train", True)
    return p == 0 or training is False


class SoftmaxMatmulAnchor:
    name = "softmax_matmul"

    def candidates(self, graph: fx.Graph) -> Iterable[fx.Node]:
        return [n for n in graph.nodes if gu.is_op(n, "softmax") or _log_normalised(n) is not None
                or _normalised_by_hand(n) is not None]

    def match(self, node: fx.Node, ctx: MatchContext):
        if not gu.is_op(node, "softmax") and _log_normalised(node) is None:
            return NearMiss(self.name, node.name, "the probabilities are computed by hand (exp, then a division by "
                            "the row sum) instead of a softmax op; write torch.softmax(s, dim=-1) (or "
                            "exp(s - logsumexp(s))) to let the pass prove the site")
        # Probabilities: softmax -> casts, clones, dropout, NaN clean-ups -> P @ V, each step the only user.
        chain = [node]
        cur = node
        while True:
            step = _probability_step(cur, ctx)
            if step is None:
                u = next(iter(cur.users)) if len(cur.users) == 1 else None
                break
            if isinstance(step, str):
                return NearMiss(self.name, node.name, step)
            if isinstance(step, _ChainEnd):
                u, helpers = step
                chain.extend(helpers)
                break
            cur, helpers = step
            chain.extend(helpers)
            chain.append(cur)
        if not (gu.is_op(u, "matmul") or gu.is_op(u, "bmm") or gu.is_op(u, "einsum")):
            return _silent_miss(node, cur, self.name)
        out_node = u
        if gu.is_op(out_node, "einsum"):
            _, _, einsum_inputs = od.parse_einsum(out_node)
            if einsum_inputs[0] is not cur:
                return None
        elif out_node.args[0] is not cur:
            return None
        if not _softmax_dim_is_last(node if gu.is_op(node, "softmax") else _log_normalised(node)[2]):
            return NearMiss(self.name, node.name, "softmax is not over the last (key) dimension")
        if node.kwargs.get("dtype") not in (None, torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return None
        try:
            return self._prove(node, cur, out_node, chain, ctx)
        except NotProven as err:
            return NearMiss(self.name, node.name, str(err))

    def _prove(self, sm: fx.Node, P: fx.Node, O: fx.Node, chain: list, ctx: MatchContext):
        if gu.is_op(sm, "softmax"):
            dec = lg.decompose(sm.args[0], sm, ctx)
        else:
            top, sub, lse = _log_normalised(sm)
            dec = lg.decompose(top, sub, ctx, other_readers=(lse,))
            chain = chain + [sub, lse]
        if dec.qk is None:
            raise NotProven("no q k^T product found below the softmax")
        qk = od.qk_operands(dec.qk, ctx)
        _check_leading_views(dec, chain, qk)
        S_shape = ctx.shape(dec.qk)
        Tq, Tk = tp.concrete_int(S_shape[-2]), tp.concrete_int(S_shape[-1])
        proof = lg.prove_bias(dec, ctx, Tq, Tk)
        if proof is None:
            return None                                  # plain causal attention: not FoX, left alone
        flatten = frozenset()
        if dec.leading_view is not None:
            flat = {t.node for t in dec.terms if t.flat}
            after_view = {node for _, node, _, _ in proof.key_terms if node not in flat}
            if after_view and (qk.c_layout != "flat" or not all(_full_view_term(n, dec.leading_view) for n in after_view)):
                raise NotProven("a key-side bias is added after the logits were viewed as (B, H, Tq, Tk) and is not "
                                "(B, H, 1, Tk) with the view's own B and H; add it to the (B*H, Tq, Tk) logits (or "
                                "baddbmm's bias) instead")
            flatten = frozenset(after_view)
        if gu.is_op(sm, "softmax"):
            top = gu.effective_value(sm.args[0], sm, ctx.position)      # after att.masked_fill_(...) in place
        else:
            s_node, sub, _ = _log_normalised(sm)
            top = gu.effective_value(s_node, sub, ctx.position)
        seg = _prove_segments(dec, ctx, Tq, Tk, tuple(S_shape), top, sm, chain, O)
        guards = seg.guards if seg is not None else lg.prove_causal(dec, ctx, Tq, Tk, O)
        pv = od.pv_operands(O, P, qk, ctx)
        raw_factors = qk.factors + dec.qk_coef
        factors = lg.scale_factors(raw_factors)
        if any(not tp.is_symbolic(f) and float(f) <= 0 for f in factors):
            raise NotProven("a non-positive scale")
        q = od.memo(qk.q)
        per_head = lg.tensor_factors(raw_factors)
        if per_head:
            if qk.c_layout != "4d":
                raise NotProven("a per-head factor on the logits of a 3D (bmm) or grouped attention")
            q = od.memo(od.scaled_by(q, per_head))          # (f q) . k = f (q . k), and c' = f c below
        k, v = qk.k, pv.v
        if isinstance(k, fx.Node) and isinstance(v, fx.Node):
            k2, v2 = od.strip_kv_repeat(k, ctx), od.strip_kv_repeat(v, ctx)
            if (k2 is not k) == (v2 is not v):
                k, v = k2, v2
        head_dim = ctx.shape(od.product_inputs(dec.qk)[0] if not gu.is_op(dec.qk, "einsum") else O)[-1]
        sm_scale = _scale_argument(raw_factors, head_dim)
        cast = operand_cast((qk.q, k, v), (dec.qk, O))
        if cast is not None:
            q, k, v = (cast_operand(x, cast) for x in (q, k, v))
        region = tuple(chain) + tuple(dec.chain) + (dec.qk,)
        return FoxMatch(
            anchor=self.name, replace=O, q=q, k=k, v=v,
            c=od.c_builder(proof.key_terms, qk.c_layout, q, qk.group_source, flatten),
            sm_scale=sm_scale, finish=pv.finish, guards=tuple(guards) + tuple(proof.guards), region=region,
            key_mask=sg.key_mask_builder(seg.key_leaves) if seg is not None and seg.key_leaves else None,
            doc_ids=seg.doc_ids if seg is not None else None,
            empty_rows=seg.empty_rows if seg is not None else None,
        )


def _prove_segments(dec, ctx: MatchContext, Tq: int, Tk: int, S_shape: tuple, top: fx.Node, sm: fx.Node,
                    chain: list, O: fx.Node):
    """The padded-batch / packed-document proof (patterns/segment_masks.py) when the masks read per-call data;
    None when they do not, or when it fails but the ordinary proof (a per-call check on the CPU) holds."""
    cleaned = any(_target_name(n) in ("isnan", "nan_to_num") or (_target_name(n) in ("ne", "__ne__") and len(n.args) == 2
                  and n.args[0] is n.args[1]) for n in chain if n.op in ("call_function", "call_method"))
    softmax_dtype = sm.kwargs.get("dtype") if gu.is_op(sm, "softmax") else None
    try:
        seg = sg.prove_segments(dec, ctx, Tq, Tk, S_shape, top, softmax_dtype, cleaned)
        return seg
    except NotProven as err:
        try:
            lg.prove_causal(dec, ctx, Tq, Tk, O)
        except NotProven:
            raise err from None
        return None


def _full_view_term(node: fx.Node, view: fx.Node) -> bool:
    """node is (B, H, 1, Tk) with B and H the very sizes of the view (B*H, Tq, Tk) -> (B, H, Tq, Tk): equal ints,
    or the same symbolic expressions; a broadcast (1 or another size) is not flattened."""
    s, v = gu.shape(node), gu.shape(view)
    if s is None or v is None or len(s) != 4 or len(v) != 4 or not (isinstance(s[2], int) and s[2] == 1):
        return False
    for a, b in zip(s[:2], v[:2]):
        if isinstance(a, int) and isinstance(b, int):
            if a != b or a == 1:
                return False
        elif isinstance(a, int) or isinstance(b, int) or str(a) != str(b):
            return False
    return True


def _check_leading_views(dec, chain: list, qk) -> None:
    """(N, Tq, Tk) logits viewed as (B, H, Tq, Tk) for the mask and softmax, and the probabilities viewed
    back to exactly (N, Tq, Tk) before the product with v (BLOOM): a relabelling of rows and its inverse,
    allowed on 3-D products only. Either view alone changes which rows meet which values: refused."""
    merges = [n for n in chain if gu.is_op(n, "reshape")]
    split = dec.leading_view
    if split is None and not merges:
        return
    if split is None or len(merges) != 1 or qk.c_layout not in ("flat", "3d") \
            or not lg.is_leading_merge(merges[0], tuple(gu.shape(split.args[0]))):
        raise NotProven("the logits or probabilities are reshaped between q k^T and the product with v, and not "
                        "as (B*H, Tq, Tk) -> (B, H, Tq, Tk) and back")


def _scale_argument(raw_factors: list, head_dim):
    """None when the scale is 1/sqrt(D) (the op computes it), a float for a constant scale, or a
    builder emitting the product when it is symbolic (a float kept on the module under dynamic=True);
    raw_factors: numbers, nodes of symbolic numbers, ("inv", x) for a division."""
    factors = lg.scale_factors(raw_factors)
    if is_default_scale(factors, head_dim):
        return None
    if any(tp.is_symbolic(f) for f in factors):
        return lg.scale_builder(raw_factors)
    value = 1.0
    for f in factors:
        value *= float(f)
    return value


register_anchor(SoftmaxMatmulAnchor())
