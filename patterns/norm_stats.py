"""The online certificate's norm statistics as graph nodes (DESIGN.md 1.1), emitted with the op.

  q_norm = row_norms(q.detach())   (B, Hq, Tq) fp32: ||q_i||, rounded up (kernels/certificate.py)
  k_norm = row_norms(k.detach())   (B, Hkv, Tk) fp32: ||k_j||
Both are ordinary graph nodes that read q and k where the op reads them: inductor schedules by data
dependence, so it fuses each reduction into the kernel that produces q or k (a projection's epilogue,
a rotary embedding) when it can, and no separate pass over q and k is left for the op. They carry no
gradient (detached): the certificate only chooses which entries are computed.
"""
from __future__ import annotations

import torch.fx as fx

from acp_compile.ops import row_norms


def emit_norm_stats(graph: fx.Graph, q: fx.Node, k: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Inserts (q_norm, k_norm) at the graph's current insertion point; returns their nodes."""
    q_norm = graph.call_function(row_norms, (graph.call_method("detach", (q,)),))
    k_norm = graph.call_function(row_norms, (graph.call_method("detach", (k,)),))
    return q_norm, k_norm
