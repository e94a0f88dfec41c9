"""The anchor registry: the places where the pass starts looking for FoX attention.

An anchor is any object with
    name: str
    candidates(graph: torch.fx.Graph) -> Iterable[torch.fx.Node]
        cheap scan: nodes that might end an attention (a softmax, an SDPA call, a flex op)
    match(node: torch.fx.Node, ctx: patterns.context.MatchContext) -> FoxMatch | NearMiss | None
        the proof. FoxMatch: proven, rewrite it. NearMiss: attention-like but not proven FoX
        (counted, logged, an error in strict mode). None: not attention at all (ignored).
        It must not modify the graph; the pass emits the op from the FoxMatch (patterns/emit.py).

Anchors run in registration order; a node already claimed by an earlier match is skipped.
Built-in anchors are loaded on first use; an extra module registers its anchor at import with
`register_anchor(MyAnchor())`.
"""
from __future__ import annotations

import importlib
from typing import Iterable, Protocol, runtime_checkable

import torch.fx as fx

from acp_compile.patterns.match import FoxMatch, NearMiss

# Modules whose import registers an anchor. A module that is not there yet is skipped.
BUILTIN_ANCHOR_MODULES = (
    "acp_compile.patterns.softmax_anchor",
    "acp_compile.patterns.sdpa_anchor",
    "acp_compile.patterns.flex_anchor",
)


@runtime_checkable
class Anchor(Protocol):
    name: str

    def candidates(self, graph: fx.Graph) -> Iterable[fx.Node]: ...

    def match(self, node: fx.Node, ctx) -> FoxMatch | NearMiss | None: ...


_ANCHORS: list[Anchor] = []
_loaded = False


def register_anchor(anchor: Anchor) -> Anchor:
    """Adds an anchor (once per name; a second registration under the same name replaces it)."""
    if not isinstance(anchor, Anchor):
        raise TypeError(f"register_anchor: {anchor!r} lacks name/candidates/match (see patterns/registry.py)")
    for i, existing in enumerate(_ANCHORS):
        if existing.name == anchor.name:
            _ANCHORS[i] = anchor
            return anchor
    _ANCHORS.append(anchor)
    return anchor


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_ANCHOR_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                _skip(module, err)
        except Exception as err:  # a broken optional anchor must not break compilation
            _skip(module, err)


def _skip(module: str, err: Exception) -> None:
    import logging
    logging.getLogger("acp_compile").warning("acp: anchor module %s not loaded: %s: %s", module, type(err).__name__, err)


def anchors() -> tuple[Anchor, ...]:
    _load_builtin()
    return tuple(_ANCHORS)
