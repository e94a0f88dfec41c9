"""What an anchor returns: a proven FoX attention site (FoxMatch) or a near-miss with its reason.

Notation: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), c (B, Hq, Tk) fp32, exactly the op's contract
(acp_compile/ops.py). An anchor that meets other layouts (3D bmm views, (B, T, H, D) einsums,
repeated kv heads) hands over *builders* that emit the reshapes into the graph, and a `finish`
that turns the op's o (B, Hq, Tq, D) back into the value of the replaced node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch.fx as fx

MASK_FILL_MAX = -1e9            # a fill value at or below this counts as "masked" (-inf, finfo.min ...)

# A graph value the op needs: an existing node, or a builder that emits nodes and returns the last.
# Builders run with the graph's insertion point just before the replaced node.
Builder = Callable[[fx.Graph], fx.Node]
Operand = Union[fx.Node, Builder]


@dataclass
class FoxMatch:
    """A site proven to compute o = softmax(scale q k^T + c_i - c_j, causal) v.

    anchor       name of the anchor that proved it ("softmax_matmul", "sdpa", "flex", ...)
    replace      the node whose every use is redirected to the op's output
    q, k, v, c   operands in the op's layout (see module notes); c must be (B, Hq, Tk) fp32
    sm_scale     a float, None (the op's default 1/sqrt(D)), or an fx.Node producing a SymFloat
    finish       maps the op's o node (B, Hq, Tq, D) to the replaced node's value; None: o itself
    guards       runtime checks (patterns.guards.RuntimeGuard) that keep the proof true at call time
    region       nodes the rewrite makes dead; erased when they have no users left (optional)
    key_mask, doc_ids, empty_rows   padded batches and packed documents (patterns/segment_masks.py)
    """
    anchor: str
    replace: fx.Node
    q: Operand
    k: Operand
    v: Operand
    c: Operand
    sm_scale: Any = None
    finish: Callable[[fx.Graph, fx.Node], fx.Node] | None = None
    guards: tuple = ()
    region: tuple = field(default_factory=tuple)
    key_mask: Operand | None = None     # (B, Tk) bool, True = the key may be seen (padded batches)
    doc_ids: Operand | None = None      # (B, Tk) integer document ids compared for equality (any order:
                                        # emit sorts each row so that every id is one run, patterns/segment_masks.py)
    empty_rows: str | None = None       # rows with no visible key: None / "zero" (the op's 0), "nan" (eager's
                                        # softmax over -inf fills), "mean" (a finite fill: uniform over all keys)


@dataclass(frozen=True)
class NearMiss:
    """Attention-shaped code that was not proven to be FoX attention; the graph stays as it was."""
    anchor: str
    node: str       # name of the anchor node in the graph
    reason: str     # one sentence a user can act on

    def __str__(self) -> str:
        return f"{self.anchor} at {self.node}: {self.reason}"


class NotProven(Exception):
    """Raised inside an anchor's proof; the anchor turns it into a NearMiss with this reason."""
