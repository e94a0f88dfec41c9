"""Observers of values the kernels compute anyway: a diagnostic hook with no effect on any result.

    observe.add(fn); ...; observe.remove(fn)      fn(name: str, values: dict[str, Tensor]) -> None
    observe.emit("backward_exact_modes", kv=..., q=...)   (called by the kernels; free without observers)

The kernels layer may import nothing above it, so an upper layer that wants a kernel's intermediate (the
per-step statistics of acp_compile/step_stats.py) registers a callback here. Names emitted:
  backward_exact_modes   kv (B, Hkv, Nk) and q (B, Hq, Mq) int8: which dk/dv and dq programs of a Triton
                         backward take the exact form (kernels/fox_triton/backward.py, exact_modes)
An observer must not write to what it is given, and must not sync if the caller is being captured.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

Observer = Callable[[str, dict[str, Tensor]], None]
_observers: list[Observer] = []


def add(fn: Observer) -> None:
    _observers.append(fn)


def remove(fn: Observer) -> None:
    if fn in _observers:
        _observers.remove(fn)


def emit(name: str, **values: Tensor) -> None:
    for fn in tuple(_observers):
        fn(name, values)
