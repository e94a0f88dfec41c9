"""The online certificate's norm statistics as graph nodes (DESIGN.md 1.1), emitted with the op.

  q_norm = row_norms(q.detach())   (B, Hq, Tq) fp32: ||q_i||, rounded up (kernels/certificate.py)
  k_norm = row_norms(k.detach())   (B, Hkv, Tk) fp32: ||k_j||
Both are ordinary graph nodes placed right after the nodes that produce q and k; inductor schedules by
data dependence, so it fuses each reduction into the kernel that produces q or k (a projection's
epilogue, a rotary embedding) when it can, and no separate pass over q and k is left for the op. They carry no
gradient (detached): the certificate only chooses which entries are computed.
"""
from __future__ import annotations

import torch.fx as fx

from acp_compile.ops import row_norms


def _norm_after(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """row_norms(x.detach()) right after x's producer (graph inputs: at the current insertion point).
    Between x's creation and the op nothing writes into x's storage (the pass proved it, DESIGN.md 2.1),
    so the norm reads the value the op reads."""
    if x.op in ("call_function", "call_method", "call_module"):
        with graph.inserting_after(x):
            detached = graph.call_method("detach", (x,))
        with graph.inserting_after(detached):
            return graph.call_function(row_norms, (detached,))
    return graph.call_function(row_norms, (graph.call_method("detach", (x,)),))


def emit_norm_stats(graph: fx.Graph, q: fx.Node, k: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Inserts (q_norm, k_norm) next to the producers of q and k; returns their nodes."""
    return _norm_after(graph, q), _norm_after(graph, k)
