"""What an anchor may ask while it proves a match: fake shapes, and concrete evaluation of small
producer subgraphs (a causal mask, the views that turn c into c_i and c_j) on concrete inputs.

evaluate(node, leaves, sizes, reader) runs the nodes that `node` depends on, in graph order, with
  placeholders      -> the example inputs Dynamo handed to the backend (buffers hold real values)
  SymInt inputs     -> their hints, or the values given in `sizes` (to try other sequence lengths)
  nodes in `leaves` -> copies of the given tensors (e.g. random stand-ins for c)
"Depends on" includes writes: every node that writes into the storage of a value the evaluation
reads, before that read (patterns/aliasing.py), with what it depends on in turn; `reader` is the
node that reads `node` itself (writes into `node` before it count). Run with real tensors in graph
order, views and writes then behave exactly as in the program, so the value is the one the reader
sees. A write into a graph input or a module attribute is refused (NotProven).
It refuses (NotProven) subgraphs that are large, contain heavy ops or read big inputs, so a
proof never costs more than a few small tensor ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns.aliasing import StorageMap, written_args
from acp_compile.patterns.match import NotProven

MAX_EVAL_NODES = 64
MAX_EVAL_INPUT_NUMEL = 1 << 30     # a buffer is only referenced; the ops on it are what cost
_HEAVY = {"matmul", "bmm", "einsum", "softmax", "sdpa"}


@dataclass
class MatchContext:
    gm: fx.GraphModule
    example_inputs: list
    position: dict = field(default_factory=dict)          # node -> index in graph order
    placeholders: dict = field(default_factory=dict)      # placeholder node -> example input
    placeholder_index: dict = field(default_factory=dict) # placeholder node -> input index
    claimed: set = field(default_factory=set)             # nodes already used by a match
    storages: StorageMap | None = None                    # aliasing and in-place writes

    @classmethod
    def build(cls, gm: fx.GraphModule, example_inputs: Iterable) -> "MatchContext":
        ex = list(example_inputs)
        position = gu.order(gm.graph)
        ctx = cls(gm, ex, position, storages=StorageMap(gm.graph, position))
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for i, n in enumerate(phs):
            if i < len(ex):
                ctx.placeholders[n] = ex[i]
                ctx.placeholder_index[n] = i
        return ctx

    # -- fake values -------------------------------------------------------------------------
    def shape(self, node: Any) -> tuple:
        s = gu.shape(node)
        if s is None:
            raise NotProven(f"no tensor shape recorded for {getattr(node, 'name', node)}")
        return s

    def dim(self, node: Any) -> int:
        return len(self.shape(node))

    # -- concrete evaluation ------------------------------------------------------------------
    def dependencies(self, node: fx.Node, leaves: Mapping[fx.Node, Any] = (), reader: fx.Node | None = None) -> list[fx.Node]:
        """Nodes the value of `node` (as `reader` reads it) depends on, itself included, with leaves and
        placeholders as boundaries, and every write into a storage read on the way (module notes); in
        graph order."""
        pos = self.position
        seen: set[fx.Node] = set()
        stack = [node]
        if reader is not None:
            stack.extend(self.storages.writers(node, before=pos[reader]))
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if len(seen) > MAX_EVAL_NODES:
                raise NotProven(f"the producer of {node.name} is too large to evaluate at compile time")
            if n in leaves or n.op in ("placeholder", "get_attr"):
                continue
            for a in n.all_input_nodes:
                stack.append(a)
                stack.extend(self.storages.writers(a, before=pos[n]))
        return sorted(seen, key=pos.__getitem__)

    def symbol_inputs(self, node: fx.Node, reader: fx.Node | None = None) -> list[fx.Node]:
        """SymInt placeholders that `node` depends on (the sizes it is built from)."""
        return [n for n in self.dependencies(node, reader=reader) if n.op == "placeholder" and gu.is_scalar_value(n)]

    def tensor_inputs(self, node: fx.Node, leaves: Mapping[fx.Node, Any] = (), reader: fx.Node | None = None) -> list[fx.Node]:
        """Tensor placeholders and get_attr nodes that `node` depends on (buffers, user inputs)."""
        return [n for n in self.dependencies(node, leaves, reader)
                if n not in leaves and n.op in ("placeholder", "get_attr") and not gu.is_scalar_value(n)]

    def evaluate(self, node: fx.Node, leaves: Mapping[fx.Node, Any] = (), sizes: Mapping[fx.Node, int] = (),
                 inputs: list | None = None, reader: fx.Node | None = None) -> Any:
        """The concrete value of `node` as `reader` reads it (see the module notes). `inputs`
        replaces the example inputs."""
        # Copies: a write in the evaluated program may land in a leaf; it must not reach the caller's.
        leaves = {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in dict(leaves).items()}
        sizes = dict(sizes)
        env: dict[fx.Node, Any] = {}
        with torch.no_grad():
            for n in self.dependencies(node, leaves, reader):
                env[n] = self._run(n, env, leaves, sizes, inputs)
        return env[node]

    def _run(self, n: fx.Node, env: dict, leaves: dict, sizes: dict, inputs: list | None) -> Any:
        if n in leaves:
            return leaves[n]
        if n.op == "placeholder":
            if n in sizes:
                return sizes[n]
            if n not in self.placeholder_index:
                raise NotProven(f"no example input for {n.name}")
            v = (inputs if inputs is not None else self.example_inputs)[self.placeholder_index[n]]
            if tp.has_no_data(v):
                # DDP's graph splitter compiles each piece on fake example inputs: there is nothing to
                # read; a proof that needs this value must be made on the first real call (a guard).
                raise NotProven(f"{n.name} has no data at compile time (a fake example input)")
            if isinstance(v, torch.Tensor) and v.numel() > MAX_EVAL_INPUT_NUMEL:
                raise NotProven(f"{n.name} is too large to read at compile time")
            return tp.concrete_int(v) if isinstance(v, torch.SymInt) else v
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        if n.op not in ("call_function", "call_method"):
            raise NotProven(f"cannot evaluate {n.op} {n.name}")
        if any(gu.is_op(n, h) for h in _HEAVY):
            raise NotProven(f"{n.name} ({n.target}) is not a cheap op to evaluate at compile time")

        def sub(a):
            if isinstance(a, fx.Node):
                src = a
                if src not in env:
                    raise NotProven(f"{src.name} was not evaluated")
                return env[src]
            return a

        args = fx.node.map_aggregate(n.args, sub)
        kwargs = fx.node.map_aggregate(n.kwargs, sub)
        # A write into a graph input or a buffer would change user data (and the value is data, not
        # code): refused. Writes into leaves land in the evaluation's own copies.
        for target in written_args(n):
            if target not in leaves and self.storages.is_input_storage(target):
                raise NotProven(f"{n.name} writes in place into a graph input or module attribute ({target.name})")
        try:
            if n.op == "call_method":
                return getattr(args[0], n.target)(*args[1:], **kwargs)
            return n.target(*args, **kwargs)
        except NotProven:
            raise
        except Exception as err:  # a size that does not fit a buffer, a dtype error ...
            raise NotProven(f"evaluating {n.name} failed: {type(err).__name__}: {err}") from None

    # -- numbers --------------------------------------------------------------------------------
    def scalar(self, x: Any) -> Any:
        """A factor of the scale: a Python number, or the SymInt/SymFloat a node produces."""
        if isinstance(x, fx.Node):
            v = gu.fake(x)
            if isinstance(v, (torch.SymInt, torch.SymFloat, int, float)) and not isinstance(v, bool):
                return v
            raise NotProven(f"{x.name} is not a number")
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return x
        raise NotProven(f"{x!r} is not a number")


def product(factors: list) -> Any:
    out: Any = 1
    for f in factors:
        out = out * f
    return out


def concrete_number(x: Any) -> float:
    if tp.is_symbolic(x):
        if isinstance(x, torch.SymInt):
            return float(tp.concrete_int(x))
        hint = x.node.hint
        if hint is None:
            raise NotProven("a symbolic scale without a hint")
        return float(hint)
    return float(x)


def is_default_scale(factors: list, head_dim: Any) -> bool:
    """True when the product of `factors` equals 1/sqrt(head_dim) for every value of the symbols.

    Static: compared in floating point (1/math.sqrt(d) and d ** -0.5 may differ in the last bit).
    Symbolic: proven with sympy on the product's expression; falls back to False when unsure.
    """
    import math
    if not any(tp.is_symbolic(f) for f in factors) and not tp.is_symbolic(head_dim):
        value = 1.0
        for f in factors:
            value *= float(f)
        return abs(value * math.sqrt(int(head_dim)) - 1.0) < 1e-6
    import sympy
    try:
        expr = sympy.Integer(1)
        for f in factors:
            expr = expr * tp.to_plain_sympy(tp.sym_expr(f))
        d = tp.to_plain_sympy(tp.sym_expr(head_dim))
        # scale^2 * d == 1 and scale > 0 (sizes are positive symbols in torch's shape env).
        positive = {s: sympy.Symbol(s.name, positive=True) for s in expr.free_symbols | d.free_symbols}
        expr, d = expr.xreplace(positive), d.xreplace(positive)
        return sympy.simplify(expr * expr * d - 1) == 0 and expr.is_positive is True
    except Exception:
        return False


def extract_subgraph(ctx: MatchContext, masks: list, inputs: list) -> fx.Graph:
    """A standalone graph computing the values of `masks` (anything with .node and .reader: masks,
    bias terms) as their readers see them, from `inputs` (copies of the graph's nodes, writes into them
    included), so a run-time check does not depend on the rewritten graph that inductor may change later."""
    graph = fx.Graph()
    env: dict = {}
    for n in inputs:
        env[n] = graph.placeholder(n.name)
    deps = sorted({d for m in masks for d in ctx.dependencies(m.node, reader=m.reader)}, key=ctx.position.__getitem__)
    for n in deps:
        if n in env:
            continue
        if n.op == "placeholder":
            raise NotProven(f"the mask reads {n.name}, which is not among its guarded inputs")
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[m.node] for m in masks))
    return graph
