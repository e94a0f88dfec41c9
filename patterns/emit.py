"""Emits the FoX attention op for a proven match and redirects the uses of the replaced node.

Nodes inserted just before `match.replace`:
  q, k, v, c          operands (builders run here)
  out = acp.fox_attention_fwd(q, k, v, c, sm_scale, log_eps, None)     (o, lse, u)
  o   = out[0]  (B, Hq, Tq, D);  lse = out[1]  (B, Hq, Tq) fp32
  o   = o + acp.report_site(...)  when reporting is on (a zero scalar with a recording side effect)
  val = match.finish(o)           the replaced node's value
The dead nodes of the matched region are erased afterwards (in-place writers included).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import acp_compile.ops  # noqa: F401  (registers torch.ops.acp.*)
from acp_compile.config import ACPConfig
from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns.match import FoxMatch, Operand


def _operand(graph: fx.Graph, x: Operand) -> fx.Node:
    return x if isinstance(x, fx.Node) else x(graph)


def emit_fox_attention(gm: fx.GraphModule, match: FoxMatch, config: ACPConfig, site: str) -> fx.Node:
    """Inserts the op for `match`; returns the node that now feeds the replaced node's users."""
    graph = gm.graph
    with graph.inserting_before(match.replace):
        q = _operand(graph, match.q)
        k = _operand(graph, match.k)
        v = _operand(graph, match.v)
        c = _operand(graph, match.c)
        out = graph.call_function(
            torch.ops.acp.fox_attention_fwd.default,
            (q, k, v, c, match.sm_scale, config.effective_log_eps, None),
        )
        o = graph.call_function(operator.getitem, (out, 0))
        lse = graph.call_function(operator.getitem, (out, 1))
        if config.report:
            from acp_compile import report
            zero = graph.call_function(
                report.report_op(), (q, k, c, site, match.sm_scale, config.effective_log_eps)
            )
            o = graph.call_function(operator.add, (o, zero))
        value = match.finish(graph, o) if match.finish is not None else o
    match.replace.replace_all_uses_with(value)
    if match.replace_lse is not None:
        match.replace_lse.replace_all_uses_with(lse)
    erase_dead(graph, (match.replace, match.replace_lse, *match.region))
    return value


def erase_dead(graph: fx.Graph, nodes) -> None:
    """Erases nodes of a matched region that nothing reads any more; an in-place writer whose
    target is dead dies with it. Never touches placeholders or nodes outside `nodes`."""
    region = {n for n in nodes if isinstance(n, fx.Node)}
    erased: set = set()
    changed = True
    while changed:
        changed = False
        for n in list(region):
            if n in erased or n.graph is not graph or n.op in ("placeholder", "output", "get_attr"):
                region.discard(n)
                continue
            users = list(n.users)
            if all(gu.is_inplace(u) and u.args and u.args[0] is n and not u.users for u in users):
                for u in users:
                    graph.erase_node(u)
                    erased.add(u)
                graph.erase_node(n)
                erased.add(n)
                region.discard(n)
                changed = True
