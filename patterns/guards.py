"""Run-time guards: host-side checks that keep a compile-time proof true at call time.

A mask read from a registered buffer (nanoGPT's `self.bias[:, :, :T, :T]`) is data, not code: the
proof evaluated it at compile time. Before every call the guard compares, for the tensors the
mask was built from, (data pointer, version counter, shape) and the sizes it depends on with what
it last verified. Only when one changed does it evaluate the mask again (one device sync). When
the mask stops being causal, the backend runs the graph compiled without the rewrite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from acp_compile import _torch_private as tp


@dataclass
class MaskGuard:
    """Re-verifies one site's mask when its inputs change.

    indices   positions (in the compiled graph's inputs) of the tensors and sizes the mask reads
    verify    verify(inputs) -> bool, evaluates the mask on these inputs and checks it is causal
    site      the site's name, for the log line
    """
    indices: tuple[int, ...]
    verify: Callable[[list], bool]
    site: str
    _verified: set = field(default_factory=set)
    _rejected: set = field(default_factory=set)

    def key(self, inputs: list) -> tuple:
        parts = []
        for i in self.indices:
            x = inputs[i]
            if isinstance(x, torch.Tensor):
                parts.append((x.data_ptr(), tp.tensor_version(x), tuple(x.shape)))
            else:
                parts.append(tp.concrete_int(x) if isinstance(x, torch.SymInt) else x)
        return tuple(parts)

    def seed(self, inputs: list) -> None:
        """Records the compile-time inputs as verified (the proof just evaluated them)."""
        self._verified.add(self.key(inputs))

    def check(self, inputs: list) -> bool:
        k = self.key(inputs)
        if k in self._verified:
            return True
        if k in self._rejected:
            return False
        ok = False
        try:
            ok = bool(self.verify(inputs))
        except Exception as err:
            tp.logger().info("acp: re-verifying the mask of %s failed (%s); using the unrewritten graph", self.site, err)
        (self._verified if ok else self._rejected).add(k)
        if not ok:
            tp.logger().warning(
                "acp: the causal mask of %s changed at run time; this call runs the graph without the FoX rewrite",
                self.site,
            )
        return ok
