"""The pass: run every anchor over a Dynamo graph, emit the op for each proven site, count and log.

    result = rewrite_graph(gm, example_inputs, config)
    result.gm          the same GraphModule, rewritten in place
    result.sites       names of the rewritten sites, in graph order
    result.near_misses NearMiss records (also counted and logged; strict mode raised on the first)
    result.guards      run-time guards the compiled graph needs (patterns/guards.py); the caller keeps
                       a copy of the graph from before (copy_graph_module) for the calls they refuse

Counters: torch._dynamo.utils.counters["acp"]["fox_attention"] += 1 per rewritten site and
["near_miss"] += 1 per near-miss. Log: logger "acp_compile" (TORCH_LOGS="+acp_compile").
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile.config import ACPConfig
from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns.context import MatchContext
from acp_compile.patterns.emit import emit_fox_attention
from acp_compile.patterns.match import FoxMatch, NearMiss, NotProven
from acp_compile.patterns.registry import anchors

log = tp.logger()


class NearMissError(RuntimeError):
    """Raised in strict mode when attention was found but not proven to be FoX attention."""


@dataclass
class RewriteResult:
    gm: fx.GraphModule
    sites: list = field(default_factory=list)
    near_misses: list = field(default_factory=list)
    guards: list = field(default_factory=list)


def copy_graph_module(gm: fx.GraphModule):
    """A function returning a GraphModule over a copy of gm's graph as it is now; the graph is
    copied at once, the module (Python code generation) is built on the first call."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    cell: dict = {}

    def build() -> fx.GraphModule:
        if "gm" not in cell:
            cell["gm"] = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
        return cell["gm"]

    return build


def site_name(node: fx.Node, taken: set) -> str:
    """A stable, readable name: the module path of the attention ("layers.3.attn"); outside modules
    the function and line of the attention's last matmul ("attend:42"), else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        path = re.sub(r"^L\['self'\]\.?", "", path)
        path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).strip(".")
        path = re.sub(r"^(L|self)\.", "", path)
    if not path:
        frames = re.findall(r'line (\d+), in (\w+)', node.meta.get("stack_trace") or "")
        if frames:
            line, func = frames[-1]
            path = f"{func}:{line}"
    name = path or node.name
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}#{i}"
    taken.add(name)
    return name


def _undo(graph: fx.Graph, before: set) -> None:
    """Erases nodes added since `before` (an emission that failed before redirecting any use)."""
    for n in reversed(list(graph.nodes)):
        if n not in before and not n.users:
            graph.erase_node(n)


def rewrite_graph(gm: fx.GraphModule, example_inputs, config: ACPConfig) -> RewriteResult:
    """Rewrites `gm` in place (see the module notes). All sites are proven on the unmodified graph
    first, then emitted."""
    ctx = MatchContext.build(gm, example_inputs)
    result = RewriteResult(gm)
    counters = tp.acp_counters()
    matches: list[FoxMatch] = []
    for anchor in anchors():
        for node in list(anchor.candidates(gm.graph)):
            if node in ctx.claimed:
                continue
            try:
                found = anchor.match(node, ctx)
            except Exception as err:  # a bug in an anchor must not break compilation
                log.warning("acp: anchor %s failed on %s (%s: %s); left as it was", anchor.name, node.name,
                            type(err).__name__, err, exc_info=log.isEnabledFor(10))
                found = NearMiss(anchor.name, node.name, f"internal error in the matcher: {type(err).__name__}: {err}")
            if found is None:
                continue
            if isinstance(found, NearMiss):
                _near_miss(_ddp_split_note(found, ctx), result, counters, config)
                continue
            assert isinstance(found, FoxMatch)
            ctx.claimed.update(n for n in (found.replace, *found.region) if isinstance(n, fx.Node))
            matches.append(found)
    taken: set = set()
    for found in matches:
        site = site_name(found.replace, taken)
        n_before = len(gm.graph.nodes)
        before = set(gm.graph.nodes)
        try:
            emit_fox_attention(gm, found, config, site, validate=_validator(ctx))
        except Exception as err:
            if len(gm.graph.nodes) != n_before:
                _undo(gm.graph, before)
            if isinstance(err, NotProven):
                reason = str(err)
            else:
                log.warning("acp: emitting the op for %s failed (%s: %s); left as it was", site,
                            type(err).__name__, err, exc_info=log.isEnabledFor(10))
                reason = f"internal error while emitting the op: {type(err).__name__}: {err}"
            _near_miss(NearMiss(found.anchor, found.replace.name, reason), result, counters, config)
            continue
        for g in found.guards:
            g.site = site
        result.guards.extend(found.guards)
        result.sites.append(site)
        counters["fox_attention"] += 1
        log.debug("acp: rewrote %s (%s anchor, sm_scale=%s)", site, found.anchor, found.sm_scale)
    if result.sites:
        gm.graph.lint()
        gm.recompile()
        log.info("acp: rewrote %d FoX attention site(s): %s", len(result.sites), ", ".join(result.sites))
    return result


def _validator(ctx: MatchContext):
    """Checks an emitted site before its uses are redirected (raises NotProven to refuse it):

    - the op reads q, k, v and c where the replaced node was, later than the original program read
      them (and the proof may have looked through `q * s` to q): no write into an operand's storage
      may happen between the operand's creation and that point;
    - the inserted nodes run on the fake values of what they read, so an operand that breaks the
      op's contract (shapes, dtypes, a value head dim the op does not take) is refused here with
      the op's own message, not when the inner backend compiles the graph.
    """
    def validate(inserted: list, at: fx.Node) -> None:
        known = set(ctx.position)
        reads = {a for n in inserted for a in n.all_input_nodes if a not in inserted}
        if any(x not in known for x in reads):
            raise NotProven("the operands are produced by another rewritten site")
        for x in sorted(reads, key=ctx.position.__getitem__):
            written = ctx.storages.writers(x, after=ctx.position[x], before=ctx.position[at])
            if written:
                raise NotProven(f"the operand {x.name} is written in place by {written[0].name} before the "
                                "attention reads it; the op would read it at another point")
        _check_skipped_steps(ctx, reads, at)
        try:
            tp.propagate_fake_values(inserted, ctx.example_inputs)
        except Exception as err:  # noqa: BLE001 - the op's checks and shape errors alike
            raise NotProven(f"the operands do not fit the op: {type(err).__name__}: {err}") from None
    return validate


_PRODUCTS = ("matmul", "bmm", "baddbmm", "einsum", "__matmul__", "mm")


def _check_skipped_steps(ctx, reads: set, at: fx.Node) -> None:
    """The op reads q, k, v and the gate where the proof found them, which may be a few steps before the
    original products read them (a GQA repeat, a reshape, a scale, a transpose): those steps are re-done by
    the op. A write in place into the result of such a step (`v = repeat(v); v.add_(1)`: the repeat copied, so
    the write is not in v's own storage) would be skipped with it: refused. Checked on every node between a
    read and the products (the operand side); the logits chain after the products is the decomposition's to
    check (patterns/logits.py)."""
    pos = ctx.position
    upstream: set = set()
    stack = [at]
    while stack:                                   # ancestors of the replaced node, back to the reads
        n = stack.pop()
        if n in upstream or n in reads or pos.get(n, -1) < 0:
            continue
        upstream.add(n)
        stack.extend(a for a in n.all_input_nodes if a in pos)
    products = [n for n in upstream if any(gu.is_op(n, p) for p in _PRODUCTS)]
    feeds_product: set = set()                     # nodes the products read, directly or through steps
    stack = [a for n in products for a in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in feeds_product or n not in upstream:
            continue
        feeds_product.add(n)
        stack.extend(n.all_input_nodes)
    after_product: set = set()                     # the logits / probabilities chain: the decomposition's
    for n in sorted(upstream, key=pos.__getitem__):
        if n in products or any(a in after_product for a in n.all_input_nodes):
            after_product.add(n)
    reach: set = {x for x in reads if not gu.is_scalar_value(x)}
    for n in sorted(upstream, key=pos.__getitem__):
        if n not in feeds_product or n in after_product or not any(a in reach for a in n.all_input_nodes):
            continue
        reach.add(n)
        written = ctx.storages.writers(n, after=pos[n], before=pos[at])
        if written:
            raise NotProven(f"{n.name}, a step between an operand and the attention's product, is written in "
                            f"place by {written[0].name}; the op would skip that write")


def _ddp_split_note(found: NearMiss, ctx: MatchContext) -> NearMiss:
    """Says so in the reason when DDP's graph splitter may have cut the site in half: the graph is one
    piece of DDPOptimizer's split and the anchor reads, without passing a projection (a matmul or an
    op on a parameter), a tensor that another piece computed (a placeholder with no Dynamo source)."""
    if not tp.is_ddp_piece(ctx.gm):
        return found
    start = next((n for n in ctx.gm.graph.nodes if n.name == found.node), None)
    if start is None:
        return found

    def is_parameter(n: fx.Node) -> bool:
        return n.op == "placeholder" and "._parameters[" in (tp.graph_input_source(n) or "")

    seen, stack, cut = set(), list(start.all_input_nodes), []
    while stack and len(seen) < 256:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if tp.graph_input_source(n) is None and len(gu.shape(n) or ()) >= 2:
                cut.append(n.name)
            continue
        if any(gu.is_op(n, op) for op in ("matmul", "bmm", "einsum")) or any(map(is_parameter, n.all_input_nodes)):
            continue
        stack.extend(n.all_input_nodes)
    if not cut:
        return found
    return NearMiss(found.anchor, found.node, (
        f"{found.reason} (this graph is one piece of DDP's graph split at gradient-bucket boundaries, and the "
        f"attention reads {', '.join(sorted(cut))} from another piece: the split may have cut the site in half; "
        "use a larger bucket_cap_mb in DistributedDataParallel, or compute the forget gate before q k^T so that "
        "no parameter is used between q k^T and the softmax)"))


def _near_miss(found: NearMiss, result: RewriteResult, counters, config: ACPConfig) -> None:
    counters["near_miss"] += 1
    result.near_misses.append(found)
    log.info("acp near-miss: %s", found)
    if config.strict:
        raise NearMissError(
            f"acp (strict): {found}. Rewrite the attention in a supported spelling "
            f"(see README), or pass options={{'strict': False}} to let it fall back."
        )
