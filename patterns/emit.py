"""Emits the FoX attention op for a proven match and redirects the uses of the replaced node.

Nodes inserted just before `match.replace`:
  q, k, v, c          operands (builders run here)
  q_norm, k_norm      the online certificate's norm statistics (patterns/norm_stats.py), when it prunes
  out = acp.fox_attention_fwd(q, k, v, c, sm_scale, log_eps, None, certificate=, q_norm=, k_norm=)
                      (o, lse, u, keep_from)
  o   = out[0]  (B, Hq, Tq, D)
  o   = o + acp.report_site(..., out[3], anchor)  when reporting is on (a zero scalar with a recording
        side effect; out[3] is the kept set the forward recorded, anchor a parameter of the site's
        module that names the site when it runs: site_anchor.py)
  val = match.finish(o)           the replaced node's value
The dead nodes of the matched region are erased afterwards (in-place writers included).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import acp_compile.ops  # noqa: F401  (registers torch.ops.acp.fox_attention_*)
import acp_compile.report_op  # noqa: F401  (registers torch.ops.acp.report_site)
from acp_compile.config import ACPConfig
from acp_compile.patterns.aliasing import storage_of, written_args
from acp_compile.patterns.match import FoxMatch, Operand
from acp_compile.patterns.norm_stats import emit_norm_stats
from acp_compile.patterns.site_anchor import find_anchor


def _operand(graph: fx.Graph, x: Operand) -> fx.Node:
    return x if isinstance(x, fx.Node) else x(graph)


def emit_fox_attention(gm: fx.GraphModule, match: FoxMatch, config: ACPConfig, site: str,
                       validate=None) -> fx.Node:
    """Inserts the op for `match`; returns the node that now feeds the replaced node's users.
    validate(inserted, at): called with the inserted nodes (in graph order) and the node they were
    inserted before, before any use is redirected; it raises to refuse (the caller undoes)."""
    graph = gm.graph
    existing = set(graph.nodes)
    with graph.inserting_before(match.replace):
        q = _operand(graph, match.q)
        k = _operand(graph, match.k)
        v = _operand(graph, match.v)
        c = _operand(graph, match.c)
        sm_scale = match.sm_scale
        if callable(sm_scale) and not isinstance(sm_scale, fx.Node):
            sm_scale = sm_scale(graph)                 # a symbolic scale, emitted as a graph value
        key_mask = _operand(graph, match.key_mask) if match.key_mask is not None else None
        doc = _operand(graph, match.doc_ids) if match.doc_ids is not None else None
        v_orig = v
        inverse = None
        if doc is not None:
            # The graph compares ids for equality anywhere in the row; the op sees runs of equal ids. A stable
            # sort by id makes every id one run and keeps positions in order within it: exact for any ids.
            q, k, v, c, key_mask, doc, inverse = _sorted_by_document(graph, q, k, v, c, key_mask, doc)
        q_norm = k_norm = None
        if config.certificate == "online" and config.op_log_eps is not None:
            q_norm, k_norm = emit_norm_stats(graph, q, k)
        out = graph.call_function(
            torch.ops.acp.fox_attention_fwd.default,
            (q, k, v, c, sm_scale, config.op_log_eps, None, key_mask, doc),
            {"certificate": config.certificate, "q_norm": q_norm, "k_norm": k_norm},
        )
        o = graph.call_function(operator.getitem, (out, 0))
        if inverse is not None:
            o = _take_rows(graph, o, inverse, 4)
        if match.empty_rows in ("nan", "mean"):
            lse = graph.call_function(operator.getitem, (out, 1))
            if inverse is not None:
                lse = _take_rows(graph, lse, inverse, 3)
            o = _empty_rows(graph, o, lse, v_orig, q, match.empty_rows)
        if config.report:
            anchor = find_anchor(gm, match.replace)
            zero = graph.call_function(
                torch.ops.acp.report_site.default,
                (q, k, c, site, sm_scale, config.op_log_eps, graph.call_function(operator.getitem, (out, 3)),
                 anchor.placeholder if anchor else None, anchor.encoded() if anchor else ""),
            )
            o = graph.call_function(operator.add, (o, zero))
        value = match.finish(graph, o) if match.finish is not None else o
    if validate is not None:
        validate([n for n in graph.nodes if n not in existing], match.replace)
    match.replace.replace_all_uses_with(value)
    erase_dead(graph, (match.replace, *match.region))
    return value


def _take_rows(graph: fx.Graph, x: fx.Node, index: fx.Node, ndim: int) -> fx.Node:
    """x (B, H, T[, D]) gathered along T by index (B, T): x[b, h, index[b, t]]."""
    # torch.gather with the index expanded, not take_along_dim: the latter's fake implementation specialises
    # symbolic sizes (a recompile per length under dynamic=True)
    idx = graph.call_function(operator.getitem, (index, (slice(None), None, slice(None)) + ((None,) if ndim == 4 else ())))
    idx = graph.call_method("expand_as", (idx, x))
    return graph.call_function(torch.gather, (x, 2, idx))


def _sorted_by_document(graph, q, k, v, c, key_mask, doc):
    srt = graph.call_function(torch.sort, (doc,), {"dim": -1, "stable": True})
    doc_sorted = graph.call_function(operator.getitem, (srt, 0))
    perm = graph.call_function(operator.getitem, (srt, 1))
    inverse = graph.call_function(torch.argsort, (perm,), {"dim": -1})
    q, k, v = (_take_rows(graph, x, perm, 4) for x in (q, k, v))
    c = _take_rows(graph, c, perm, 3)
    if key_mask is not None:
        key_mask = graph.call_function(torch.gather, (key_mask, 1, perm))
    return q, k, v, c, key_mask, doc_sorted, inverse


def _empty_rows(graph: fx.Graph, o: fx.Node, lse: fx.Node, v: fx.Node, q: fx.Node, how: str) -> fx.Node:
    """Rows with no visible key (the op's lse is -inf there, its o 0) as eager computes them:
    "nan": softmax over all -inf logits is NaN; eager's v gets a NaN gradient (0 x NaN) in every batch element
           holding such a row, reproduced by a fill v.sum() * w with w = NaN there and 0 elsewhere;
    "mean": a finite fill makes the row's softmax uniform over all Tk keys: the mean of v (per kv head,
           repeated to the query heads)."""
    empty = graph.call_function(operator.eq, (lse, float("-inf")))                     # (B, Hq, Tq)
    where = graph.call_function(operator.getitem, (empty, (Ellipsis, None)))
    if how == "nan":
        anywhere = graph.call_function(torch.any, (graph.call_method("flatten", (empty, 1)),), {"dim": -1})
        w = graph.call_function(torch.where, (anywhere, float("nan"), 0.0))
        total = graph.call_function(torch.sum, (v,), {"dim": (1, 2, 3)})
        fill = graph.call_function(operator.mul, (total, graph.call_method("to", (w, total))))
        fill = graph.call_function(operator.getitem, (fill, (slice(None), None, None, None)))
    else:
        mean = graph.call_method("mean", (v, -2), {"keepdim": True})                   # (B, Hkv, 1, Dv)
        group = graph.call_function(operator.floordiv, (graph.call_method("size", (q, 1)),
                                                        graph.call_method("size", (v, 1))))
        fill = graph.call_function(torch.repeat_interleave, (mean, group), {"dim": 1})
    fill = graph.call_method("to", (fill, o))
    return graph.call_function(torch.where, (where, fill, o))


def erase_dead(graph: fx.Graph, nodes) -> None:
    """Erases the nodes of a matched region that die with it: a node dies when everything that reads
    it dies too; a node that writes in place dies only when no surviving value views the storage it
    writes. Never touches placeholders or nodes outside `nodes`."""
    dying = {n for n in nodes if isinstance(n, fx.Node) and n.graph is graph
             and n.op not in ("placeholder", "output", "get_attr")}
    changed = True
    while changed:
        changed = False
        for n in list(dying):
            if any(u not in dying for u in n.users) or any(
                    _storage_seen_elsewhere(graph, t, dying) for t in written_args(n)):
                dying.discard(n)
                changed = True
    for n in reversed(list(graph.nodes)):
        if n in dying:
            graph.erase_node(n)


def _storage_seen_elsewhere(graph: fx.Graph, node: fx.Node, dying: set) -> bool:
    key = storage_of(node)
    if key is None:
        return True
    return any(m not in dying and storage_of(m) == key for m in graph.nodes)
