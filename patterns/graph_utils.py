"""Small queries on Dynamo FX graphs: targets by meaning, in-place effects, view chains.

Dynamo records one operation under several spellings (operator.matmul, torch.matmul, a
call_method "matmul"); `is_op(node, "matmul")` answers for all of them.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from acp_compile import _torch_private as tp

# name -> callables of call_function nodes; call_method nodes match on the name itself.
_FUNCTIONS: dict[str, tuple] = {
    "matmul": (operator.matmul, torch.matmul),
    "bmm": (torch.bmm,),
    "baddbmm": (torch.baddbmm,),
    "einsum": (torch.einsum, torch.functional.einsum),
    "softmax": (torch.softmax, F.softmax, torch.nn.functional.softmax, torch.special.softmax),
    "add": (operator.add, torch.add, operator.iadd),
    "sub": (operator.sub, torch.sub, torch.subtract, operator.isub),
    "mul": (operator.mul, torch.mul, torch.multiply, operator.imul),
    "div": (operator.truediv, torch.div, torch.divide, torch.true_divide, operator.itruediv),
    "neg": (operator.neg, torch.neg, torch.negative),
    "masked_fill": (torch.masked_fill,),
    "where": (torch.where,),
    "dropout": (F.dropout, torch.dropout, torch.nn.functional.dropout),
    "sdpa": (F.scaled_dot_product_attention,),
    "transpose": (torch.transpose, torch.swapaxes, torch.swapdims),
    "permute": (torch.permute,),
    "reshape": (torch.reshape,),
    "flatten": (torch.flatten,),
    "unsqueeze": (torch.unsqueeze,),
    "repeat_interleave": (torch.repeat_interleave,),
    "getitem": (operator.getitem,),
}
_METHODS: dict[str, tuple[str, ...]] = {
    "matmul": ("matmul", "__matmul__"),
    "bmm": ("bmm",),
    "baddbmm": ("baddbmm",),
    "softmax": ("softmax",),
    "add": ("add", "add_", "__add__", "__iadd__"),
    "sub": ("sub", "sub_", "subtract", "__sub__", "__isub__"),
    "mul": ("mul", "mul_", "multiply", "__mul__", "__imul__"),
    "div": ("div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"),
    "neg": ("neg", "neg_", "negative", "__neg__"),
    "masked_fill": ("masked_fill", "masked_fill_"),
    "where": ("where",),
    "transpose": ("transpose", "swapaxes", "swapdims"),
    "permute": ("permute",),
    "reshape": ("reshape", "view"),
    "flatten": ("flatten",),
    "unsqueeze": ("unsqueeze",),
    "repeat_interleave": ("repeat_interleave",),
    "expand": ("expand",),
    "cast": ("float", "half", "bfloat16", "double", "to", "type", "type_as"),
}
_INPLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior)


def is_op(node: Any, name: str) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in _FUNCTIONS.get(name, ())
    if node.op == "call_method":
        return node.target in _METHODS.get(name, ())
    return False


def is_inplace(node: fx.Node) -> bool:
    """True for a node that writes into its first argument (x.add_(...), x += y, x.masked_fill_(...))."""
    if node.op == "call_method":
        t = node.target
        return t.endswith("_") and not t.startswith("_")
    return node.op == "call_function" and node.target in _INPLACE_FUNCTIONS


def fake(node: Any) -> Any:
    """The fake value of a node (FakeTensor, SymInt ...), the value itself for a constant."""
    return tp.example_value(node) if isinstance(node, fx.Node) else node


def shape(node: Any) -> tuple | None:
    v = fake(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def writes_into_first_argument(node: fx.Node) -> bool:
    """x.add_(...), x += y, x.masked_fill_(...) and item assignment x[i] = y."""
    return is_inplace(node) or (node.op == "call_function" and node.target is operator.setitem)


def effective_value(node: fx.Node, consumer: fx.Node, pos: dict[fx.Node, int]) -> fx.Node:
    """The node whose value `consumer` reads when it reads `node`: the last in-place op on `node`
    recorded before `consumer` (Dynamo keeps `att.masked_fill_(m, x)` and `att[m] = x` as separate
    users of `att`)."""
    writers = [u for u in node.users if writes_into_first_argument(u) and u.args and u.args[0] is node
               and pos[u] < pos[consumer]]
    if not writers:
        return node
    # Later in-place ops on the same tensor also take `node` as their first argument: the last one
    # before the consumer holds the value; walking down from it reaches the earlier ones in turn.
    return max(writers, key=pos.__getitem__)


def is_scalar_value(x: Any) -> bool:
    """A Python number or a node producing a symbolic number (not a tensor)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    if isinstance(x, fx.Node):
        v = fake(x)
        return isinstance(v, (torch.SymInt, torch.SymFloat, int, float)) and not isinstance(v, bool)
    return False


_METADATA_METHODS = ("size", "dim", "ndimension", "numel", "nelement", "get_device")
_METADATA_ATTRIBUTES = ("shape", "dtype", "device", "ndim", "layout", "is_cuda")


def reads_metadata_only(node: fx.Node) -> bool:
    """x.size(), x.shape, x.dim(), x.dtype ... : a call that reads what a tensor is, not its values."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) == 2 and node.args[1] in _METADATA_ATTRIBUTES
        return node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default)
    return False
