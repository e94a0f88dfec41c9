"""Finding FoX attention in Dynamo graphs (torch-level FX, before AOTAutograd) and replacing it.

How the pass works (patterns/rewrite.py): every registered *anchor* (patterns/registry.py) lists
candidate nodes (a softmax, an SDPA call, a flex_attention op), then tries to *prove* that the
candidate computes causal FoX attention

    o = softmax(scale * q k^T + (c_i - c_j), causal) v

by meaning, not by spelling: the causal mask and the c_i - c_j bias are evaluated on concrete
inputs (patterns/context.py), the scale is compared with 1/sqrt(D) symbolically when the head
dim is symbolic. A proven site comes back as a FoxMatch (patterns/match.py), which
patterns/emit.py turns into torch.ops.acp.fox_attention_fwd; anything attention-shaped that is
not proven comes back as a NearMiss with its reason and the graph stays as it was.

Protocol for a new anchor (e.g. patterns/flex_anchor.py):

    from acp_compile.patterns.registry import register_anchor
    from acp_compile.patterns.match import FoxMatch, NearMiss

    class FlexAnchor:
        name = "flex"
        def candidates(self, graph):            # cheap scan, yields fx.Nodes
            ...
        def match(self, node, ctx):             # ctx: patterns.context.MatchContext
            ...                                 # never modifies the graph
            return FoxMatch(anchor="flex", replace=out_node, q=q, k=k, v=v, c=build_c,
                            sm_scale=None, finish=None)
            # or NearMiss("flex", node.name, "mask_mod is not causal"), or None (not attention)

    register_anchor(FlexAnchor())

FoxMatch operands are fx.Nodes already in the op's layout (q (B, Hq, Tq, D), k and v (B, Hkv,
Tk, D), c (B, Hq, Tk) fp32) or builders `fn(graph) -> fx.Node` that emit the needed views (they
run with the insertion point just before the replaced node). `finish(graph, o)` maps the op's
output to the replaced node's value (a transpose back for (B, T, H, D), a flatten for bmm).
Modules listed in registry.BUILTIN_ANCHOR_MODULES are imported on first use.
"""
