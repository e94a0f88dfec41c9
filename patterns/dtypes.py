"""The dtype an attention site computes in, and the casts that give the op its operands in it.

Eager attention runs its products (q k^T, P v, or SDPA) in one dtype: the operands' own or, inside
an autocast region, autocast's low-precision dtype. Under autocast the operands may be fp32 or mixed
(an fp32 RMSNorm output next to a bf16 v) while the products' fake values carry bf16/fp16. The op
then receives q, k, v cast to that dtype, as autocast casts them for the products, so it returns
what the replaced node returned. Anything else with mixed dtypes is not proven.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from acp_compile.patterns import graph_utils as gu
from acp_compile.patterns.match import Builder, NotProven, Operand

AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


def _dtypes(nodes: Iterable) -> set:
    found = {getattr(gu.fake(n), "dtype", None) for n in nodes if isinstance(n, fx.Node)}
    found.discard(None)
    return found


def _names(dtypes: set) -> str:
    return ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))


def operand_cast(operands: Iterable, products: Iterable) -> torch.dtype | None:
    """The dtype to cast q, k, v to (autocast), or None when they already run in their own dtype."""
    operand_dtypes, product_dtypes = _dtypes(operands), _dtypes(products)
    if len(product_dtypes) > 1:
        raise NotProven(f"the attention's products run in different dtypes ({_names(product_dtypes)})")
    if product_dtypes and operand_dtypes and operand_dtypes != product_dtypes:
        (dtype,) = product_dtypes
        if dtype in AUTOCAST_DTYPES:
            return dtype
        raise NotProven(f"q, k and v ({_names(operand_dtypes)}) differ from the dtype their products run in ({_names(product_dtypes)})")
    if len(operand_dtypes) > 1:
        raise NotProven(f"q, k and v have different dtypes ({_names(operand_dtypes)})")
    return None


def cast_operand(x: Operand, dtype: torch.dtype) -> Builder:
    """A builder emitting `x.to(dtype)` once (x a node or another builder); later calls return that node."""
    cell: dict = {}

    def build(graph: fx.Graph) -> fx.Node:
        if "node" not in cell:
            node = x if isinstance(x, fx.Node) else x(graph)
            cell["node"] = graph.call_method("to", (node, dtype))
        return cell["node"]
    return build
