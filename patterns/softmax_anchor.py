"""Anchor: softmax(logits, dim=-1) [cast] [dropout p=0 / eval] @ v.

  logits = S * scale + (c_i - c_j), causal mask       (proved in patterns/logits.py)
  S      = q @ k^T | matmul | bmm | einsum            (operands in patterns/operands.py)
  O      = P @ v   | matmul | bmm | einsum            (the node whose uses get the op's o)
The probabilities P and every intermediate of the logits must feed only this attention;
otherwise they are computed anyway and the site is a near-miss (the graph stays as it was).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns import logits as lg
from acp_compile.patterns import operands as ops
from acp_compile.patterns.context import MatchContext, is_default_scale
from acp_compile.patterns.dtypes import cast_operand, operand_cast
from acp_compile.patterns.match import FoxMatch, NearMiss, NotProven
from acp_compile.patterns.registry import register_anchor


def _softmax_dim_is_last(node: fx.Node) -> bool:
    dim = gu.arg(node, 1, "dim")
    nd = len(gu.shape(node) or ())
    return isinstance(dim, int) and nd >= 2 and dim % nd == nd - 1


def _dropout_is_identity(node: fx.Node) -> bool:
    p = gu.arg(node, 1, "p", 0.5)
    training = gu.arg(node, 2, "training", True) if node.target is not torch.dropout else gu.arg(node, 2, "train", True)
    return p == 0 or training is False


class SoftmaxMatmulAnchor:
    name = "softmax_matmul"

    def candidates(self, graph: fx.Graph) -> Iterable[fx.Node]:
        return [n for n in graph.nodes if gu.is_op(n, "softmax")]

    def match(self, node: fx.Node, ctx: MatchContext):
        # Probabilities: softmax -> casts -> dropout -> P @ V, each step the only user.
        chain = [node]
        cur = node
        while True:
            users = list(cur.users)
            if len(users) != 1:
                if any(gu.is_op(u, "matmul") or gu.is_op(u, "bmm") or gu.is_op(u, "einsum") for u in users):
                    return NearMiss(self.name, node.name, "the attention probabilities are also used elsewhere")
                return None
            u = users[0]
            if gu.is_op(u, "cast") or (u.op == "call_method" and u.target == "contiguous"):
                chain.append(u)
                cur = u
                continue
            if gu.is_op(u, "dropout"):
                if not _dropout_is_identity(u):
                    return NearMiss(self.name, node.name, "dropout with p > 0 in training changes the attention")
                chain.append(u)
                cur = u
                continue
            break
        if not (gu.is_op(u, "matmul") or gu.is_op(u, "bmm") or gu.is_op(u, "einsum")):
            return None
        out_node = u
        if gu.is_op(out_node, "einsum"):
            _, _, operands = ops._parse_einsum(out_node)
            if operands[0] is not cur:
                return None
        elif out_node.args[0] is not cur:
            return None
        if not _softmax_dim_is_last(node):
            return NearMiss(self.name, node.name, "softmax is not over the last (key) dimension")
        if node.kwargs.get("dtype") not in (None, torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return None
        try:
            return self._prove(node, cur, out_node, chain, ctx)
        except NotProven as err:
            return NearMiss(self.name, node.name, str(err))

    def _prove(self, sm: fx.Node, P: fx.Node, O: fx.Node, chain: list, ctx: MatchContext):
        dec = lg.decompose(sm.args[0], sm, ctx)
        if dec.qk is None:
            raise NotProven("no q k^T product found below the softmax")
        qk = ops.qk_operands(dec.qk, ctx)
        S_shape = ctx.shape(dec.qk)
        Tq, Tk = tp.concrete_int(S_shape[-2]), tp.concrete_int(S_shape[-1])
        proof = lg.prove_bias(dec, ctx, Tq, Tk)
        if proof is None:
            return None                                  # plain causal attention: not FoX, left alone
        guards = lg.prove_causal(dec, ctx, Tq, Tk, O)
        pv = ops.pv_operands(O, P, qk, ctx)
        factors = lg.scale_factors(qk.factors + dec.qk_coef)
        if any(not tp.is_symbolic(f) and float(f) <= 0 for f in factors):
            raise NotProven("a non-positive scale")
        q = ops.memo(qk.q)
        k, v = qk.k, pv.v
        if isinstance(k, fx.Node) and isinstance(v, fx.Node):
            k2, v2 = ops.strip_kv_repeat(k, ctx), ops.strip_kv_repeat(v, ctx)
            if (k2 is not k) == (v2 is not v):
                k, v = k2, v2
        head_dim = ctx.shape(dec.qk.args[0] if not gu.is_op(dec.qk, "einsum") else O)[-1]
        sm_scale = _scale_argument(factors, head_dim)
        cast = operand_cast((qk.q, k, v), (dec.qk, O))
        if cast is not None:
            q, k, v = (cast_operand(x, cast) for x in (q, k, v))
        region = tuple(chain) + tuple(dec.chain) + (dec.qk,)
        return FoxMatch(
            anchor=self.name, replace=O, q=q, k=k, v=v,
            c=ops.c_builder(proof.key_terms, qk.c_layout, q),
            sm_scale=sm_scale, finish=pv.finish, guards=tuple(guards), region=region,
        )


def _scale_argument(factors: list, head_dim):
    """None when the scale is 1/sqrt(D) (the op computes it), a float otherwise."""
    if is_default_scale(factors, head_dim):
        return None
    if any(tp.is_symbolic(f) for f in factors):
        raise NotProven("a symbolic scale that is not 1/sqrt(head_dim)")
    value = 1.0
    for f in factors:
        value *= float(f)
    return value


register_anchor(SoftmaxMatmulAnchor())
