"""Which graph values share storage, and which nodes write into it: the facts that keep a proof
sound when the program writes in place.

A Dynamo graph is not functional: `keep[:, :n] = True`, `att.masked_fill_(m, x)`, `c.mul_(2)` or a
write through a view (`keep.view(-1).fill_(True)`) change the value of every node that aliases the
written storage, at the point of the write. Dynamo's fake values carry the aliasing exactly (a view
shares its base's storage; `x.contiguous()` or `x.float()` on an fp32 x is x itself), so

    StorageMap(graph).writers(node, before=p)

lists every node that writes into the storage `node` views, before graph position p. The pass uses
it three ways (see DESIGN.md, "Soundness of the pass"):
  1. a value the proof evaluates is evaluated together with every earlier write into its storage
     (patterns/context.py), so the proof sees what the reader sees;
  2. the logits chain may only be written by the in-place steps the decomposition walked
     (patterns/logits.py);
  3. nothing may write into an operand of the op between its creation and the point where the op
     reads it (patterns/rewrite.py), since the op reads q, k, v and c later than the original did.
A node that writes and whose target's storage is unknown counts as writing into everything.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx

from acp_compile import _torch_private as tp

_INPLACE_OPERATORS = (
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem,
)
_MUTATING_DUNDERS = {
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__",
}
def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "") or ""


def _schema_writes(node: fx.Node) -> list | None:
    """Arguments an OpOverload writes according to its schema; None for other targets."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    out = []
    for i, a in enumerate(schema.arguments):
        info = a.alias_info
        if info is not None and info.is_write:
            out.append(node.args[i] if i < len(node.args) else node.kwargs.get(a.name))
    return out


def written_args(node: fx.Node) -> list:
    """The arguments (nodes, or nested lists of them) that `node` writes into."""
    if node.op == "call_module":
        return list(node.all_input_nodes)     # a module call may do anything to its inputs
    if node.op not in ("call_function", "call_method"):
        return []
    written = []
    name = _target_name(node)
    if node.op == "call_method":
        if name in _MUTATING_DUNDERS or (name.endswith("_") and not name.startswith("_")):
            written.append(node.args[0])
    else:
        schema = _schema_writes(node)
        if schema is not None:
            written.extend(schema)
        elif node.target in _INPLACE_OPERATORS or name in _MUTATING_DUNDERS or (
                name.endswith("_") and not name.startswith("_") and getattr(node.target, "__module__", None) != "_operator"):
            if node.args:
                written.append(node.args[0])
    if "out" in node.kwargs:
        written.append(node.kwargs["out"])
    if node.kwargs.get("inplace") is True and node.args:
        written.append(node.args[0])
    flat = []
    fx.node.map_aggregate(written, lambda a: flat.append(a) if isinstance(a, fx.Node) else None)
    return flat


# Ops whose result may share its first argument's storage (used only for tensors whose fake value
# has no storage, e.g. the batched tensors inside a vmap that create_block_mask traces).
_VIEW_LIKE = {
    "getitem", "view", "view_as", "reshape", "reshape_as", "expand", "expand_as", "transpose", "permute", "unsqueeze",
    "squeeze", "contiguous", "to", "float", "half", "bfloat16", "double", "type", "type_as", "detach", "select",
    "narrow", "as_strided", "flatten", "unflatten", "movedim", "moveaxis", "t", "swapaxes", "swapdims",
    "diagonal", "unbind", "split", "chunk", "tensor_split", "alias", "real", "imag", "view_as_real",
}


def storage_of(node: Any) -> Any:
    """The storage key of a node's value: from its fake tensor, or, for a tensor without a storage
    (a batched tensor under vmap), the node that allocated it, found through view-like ops and
    in-place writers. None when the value is not a tensor."""
    if not isinstance(node, fx.Node):
        return None
    value = tp.example_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    key = tp.storage_key(value)
    if key is not None:
        return key
    cur = node
    while cur.op in ("call_function", "call_method") and cur.args and isinstance(cur.args[0], fx.Node) and (
            _target_name(cur) in _VIEW_LIKE or written_args(cur)[:1] == [cur.args[0]]):
        cur = cur.args[0]
        key = tp.storage_key(tp.example_value(cur))
        if key is not None:
            return key
    return ("allocated by", cur)


class StorageMap:
    """Storage keys and writers of one graph (see the module notes)."""

    def __init__(self, graph: fx.Graph, position: dict):
        self.position = position
        self._writers: dict = defaultdict(list)
        self._unknown: list = []
        self.input_storages: set = set()
        for n in graph.nodes:
            if n.op in ("placeholder", "get_attr"):
                key = storage_of(n)
                if key is not None:
                    self.input_storages.add(key)
            for target in written_args(n):
                value = tp.example_value(target)
                if value is None:
                    self._unknown.append(n)         # no fake value: assume it may write anything
                    continue
                key = storage_of(target)
                if key is not None:
                    self._writers[key].append(n)

    def writers(self, node: fx.Node, before: int | None = None, after: int | None = None) -> list[fx.Node]:
        """Nodes writing into the storage `node` views, with after < position < before."""
        key = storage_of(node)
        found = [] if key is None else self._writers.get(key, []) + self._unknown
        pos = self.position
        return [w for w in found
                if (before is None or pos[w] < before) and (after is None or pos[w] > after) and w is not node]

    def is_input_storage(self, node: fx.Node) -> bool:
        """True when `node` views the storage of a graph input or a module attribute."""
        key = storage_of(node)
        return key is not None and key in self.input_storages
