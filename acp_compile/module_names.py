"""The module path of a compiled attention site, found when the graph runs (for the report).

    site_name_at_run_time(site, anchor, anchor_path) -> "layers.3.attn"

`anchor` is a parameter of the site's module or of a module around it; `anchor_path` is
"<that module's path in the frame>|<the parameter's path below it>|<the site's module path in the
frame>" (patterns/site_anchor.py). The module that holds `anchor` is found among the
live nn.Modules (one scan of the garbage collector's objects, cached by parameter identity and redone
only when an unknown parameter arrives: the report is a debugging aid that already syncs with the
device), and its path is read from the root down, leaving out the wrappers that do not belong to the
user's model: DDP's and DataParallel's `module`, torch.compile's `_orig_mod`, FSDP1's
`_fsdp_wrapped_module` and activation checkpointing's `_checkpoint_wrapped_module`. When no module
holds it, the compile-time name stays.
"""
from __future__ import annotations

import gc
import re
import weakref
from typing import Optional

import torch
from torch import Tensor

_WRAPPER_CHILDREN = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_PARALLEL_WRAPPERS = ("DistributedDataParallel", "DataParallel")

_paths: dict[int, tuple[weakref.ref, str]] = {}     # id(parameter) -> (weak ref, path from the root)


def site_name_at_run_time(site: str, anchor: Optional[Tensor], anchor_path: str) -> str:
    parts = anchor_path.split("|")
    if anchor is None or len(parts) != 3:
        return site
    anchor_module, param_path, site_module = parts
    full = _parameter_path(anchor)
    if full is None or not (full == param_path or full.endswith("." + param_path)):
        return site
    root = full[: len(full) - len(param_path)].rstrip(".")          # the anchor module's path from the root
    below = site_module[len(anchor_module):].lstrip(".") if site_module.startswith(anchor_module) else ""
    name = ".".join(x for x in (root, below) if x)
    if not name:
        return site
    tag = re.search(r"#\d+$", site)
    return name + (tag.group(0) if tag else "")


def _parameter_path(p: Tensor) -> Optional[str]:
    hit = _paths.get(id(p))
    if hit is not None and hit[0]() is p:
        return hit[1]
    _scan()
    hit = _paths.get(id(p))
    return hit[1] if hit is not None and hit[0]() is p else None


def _scan() -> None:
    """Records the path from the root of every parameter of every live module."""
    modules = [o for o in gc.get_objects() if _is_module(o)]
    parent: dict[int, tuple[torch.nn.Module, str]] = {}
    for m in modules:
        for name, child in m._modules.items():
            if child is not None and id(child) not in parent:
                parent[id(child)] = (m, name)
    for m in modules:
        prefix = _module_path(m, parent)
        for name, p in m._parameters.items():
            if p is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            old = _paths.get(id(p))
            # a parameter shared by several modules keeps the longest path (the one from the outer root)
            if old is None or old[0]() is not p or len(path) > len(old[1]):
                _paths[id(p)] = (weakref.ref(p), path)


def _is_module(obj) -> bool:
    if isinstance(obj, (weakref.ProxyType, weakref.CallableProxyType)):
        return False                              # a proxy's isinstance raises once its target died
    try:
        return isinstance(obj, torch.nn.Module)
    except ReferenceError:
        return False


def _module_path(m: torch.nn.Module, parent: dict) -> str:
    parts = []
    seen = set()
    while id(m) in parent and id(m) not in seen:
        seen.add(id(m))
        up, name = parent[id(m)]
        wrapper = name in _WRAPPER_CHILDREN or (name == "module" and type(up).__name__ in _PARALLEL_WRAPPERS)
        if not wrapper:
            parts.append(name)
        m = up
    return ".".join(reversed(parts))
