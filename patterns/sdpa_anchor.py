"""Anchor: F.scaled_dot_product_attention(q, k, v, attn_mask=bias_and_mask, scale=...).

FoX through SDPA carries the gate in a float attn_mask: (c_i - c_j) plus a causal 0/-inf part
(masked_fill with -inf, torch.where, or an added -inf matrix). The mask expression is proven by
the same decomposition as softmax logits (patterns/logits.py) without a q k^T product. SDPA's
default scale is 1/sqrt(D), the op's default. dropout_p must be 0; is_causal must be False (a
float mask cannot be combined with it). enable_gqa=True passes k, v with fewer heads as they are.
"""
from __future__ import annotations

from typing import Iterable

import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns import logits as lg
from acp_compile.patterns import operands as od  # od: operand builders
from acp_compile.patterns.dtypes import cast_operand, operand_cast
from acp_compile.patterns.match import FoxMatch, NearMiss, NotProven
from acp_compile.patterns.registry import register_anchor
from acp_compile.patterns.softmax_anchor import _scale_argument


class SdpaAnchor:
    name = "sdpa"

    def candidates(self, graph: fx.Graph) -> Iterable[fx.Node]:
        return [n for n in graph.nodes if gu.is_op(n, "sdpa")]

    def match(self, node: fx.Node, ctx):
        q, k, v = (gu.arg(node, i, nm) for i, nm in enumerate(("query", "key", "value")))
        mask = gu.arg(node, 3, "attn_mask")
        dropout_p = gu.arg(node, 4, "dropout_p", 0.0)
        is_causal = gu.arg(node, 5, "is_causal", False)
        scale = gu.arg(node, 6, "scale")
        enable_gqa = node.kwargs.get("enable_gqa", False)
        if mask is None or not isinstance(mask, fx.Node):
            return None                                   # plain (causal) attention: no gate
        try:
            if dropout_p != 0:
                raise NotProven("SDPA with dropout_p > 0")
            if is_causal:
                raise NotProven("SDPA with both is_causal and an attn_mask")
            if any(len(gu.shape(x) or ()) != 4 for x in (q, k, v)):
                raise NotProven("SDPA on tensors that are not 4D (B, H, T, D)")
            Tq, Tk = tp.concrete_int(ctx.shape(q)[-2]), tp.concrete_int(ctx.shape(k)[-2])
            dec = lg.decompose(mask, node, ctx, allow_qk=False, exclusive=False)
            proof = lg.prove_bias(dec, ctx, Tq, Tk)
            if proof is None:
                return None
            guards = lg.prove_causal(dec, ctx, Tq, Tk, node)
            factors = lg.scale_factors(dec.qk_coef)
            if factors and any(float(f) != 1.0 for f in factors if not tp.is_symbolic(f)):
                raise NotProven("the attn_mask is scaled as a whole")
            if scale is None:
                sm_scale = None
            else:
                ctx.scalar(scale)                             # a number (raises otherwise)
                sm_scale = _scale_argument([scale], ctx.shape(q)[-1])
            if not enable_gqa:
                k2, v2 = od.strip_kv_repeat(k, ctx), od.strip_kv_repeat(v, ctx)
                if (k2 is not k) == (v2 is not v):
                    k, v = k2, v2
            cast = operand_cast((q, k, v), (node,))
            if cast is not None:
                q, k, v = (cast_operand(x, cast) for x in (q, k, v))
            return FoxMatch(
                anchor=self.name, replace=node, q=q, k=k, v=v,
                c=od.c_builder(proof.key_terms, "4d", q), sm_scale=sm_scale,
                guards=tuple(guards) + tuple(proof.guards), region=tuple(dec.chain),
            )
        except NotProven as err:
            return NearMiss(self.name, node.name, str(err))


register_anchor(SdpaAnchor())
