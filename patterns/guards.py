"""Run-time guards: host-side checks that keep a compile-time proof true at call time.

A causal mask that is built from values the compiled graph receives as inputs is proven at
compile time for the example inputs only. Before every call the guard looks at those inputs, by
kind (`GuardedInput.kind`):

  "size"          a symbolic size (dynamic shapes): the mask is re-verified once for every new
                  value (cached). A mask built from sizes and module attributes (a sliding window
                  on the module, a prefix length) can be causal at one length and not at another.
  "module_state"  a module buffer, parameter or tensor attribute (a source under L['self']):
                  trusted while it is the same tensor object (weak reference), at the same address,
                  with the same version counter and shape; any change re-verifies it (one device sync).
  "shape"         a tensor passed to the compiled function of which only the sizes are read (a bias
                  built from q.size()): keyed by its shape, dtype and device, like a size.
  "data"          any other tensor passed to the compiled function (a padding mask built per
                  call): a fresh tensor can land at the address of an old one with the same
                  version, so nothing about it is cached; its mask is re-verified on every call.
                  The pass only accepts this on the CPU (patterns/logits.py refuses it on devices
                  where reading the result would synchronise).

When the mask is not causal for a call, the backend runs the graph compiled without the rewrite
for that call (acp_compile/backend.py), and logs it once per guard.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from acp_compile import _torch_private as tp

MAX_CACHED_KEYS = 512


@dataclass(frozen=True)
class GuardedInput:
    index: int      # position in the compiled graph's inputs
    kind: str       # "size" | "shape" | "module_state" | "data" (module notes)


def input_kind(source: str | None, example) -> str:
    """How a graph input the mask reads is trusted (module notes)."""
    if not isinstance(example, torch.Tensor):
        return "size"
    if source is not None and ("._buffers[" in source or "._parameters[" in source or source.startswith("L['self']")):
        return "module_state"
    return "data"


@dataclass
class MaskGuard:
    """Re-verifies one site's mask when what it is built from changes.

    inputs    the graph inputs the mask reads (GuardedInput)
    verify    verify(inputs) -> bool: evaluates the mask on these inputs and checks it is causal
    site      the site's name, for the log line
    failure   the log line's words when verify says no ({site} is the site); a bias guard
              (patterns/static_bias.py) says the bias is not c_i - c_j
    """
    inputs: tuple
    verify: Callable[[list], bool]
    site: str
    failure: str = "the mask of {site} is not causal"
    _verified: dict = field(default_factory=dict)   # key -> weak references of the module state
    _rejected: dict = field(default_factory=dict)
    _warned: bool = False

    @property
    def reads_data(self) -> bool:
        return any(g.kind == "data" for g in self.inputs)

    def _key(self, inputs: list) -> tuple:
        parts, tensors = [], []
        for g in self.inputs:
            x = inputs[g.index]
            if g.kind == "module_state":
                parts.append((id(x), x.data_ptr(), tp.tensor_version(x), tuple(x.shape), tuple(x.stride()), x.device))
                tensors.append(x)
            elif g.kind == "shape":
                parts.append((tuple(x.shape), x.dtype, x.device))
            else:
                parts.append(tp.concrete_int(x) if isinstance(x, torch.SymInt) else x)
        return tuple(parts), tensors

    @staticmethod
    def _same_objects(refs: list, tensors: list) -> bool:
        return len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors))

    def seed(self, inputs: list) -> None:
        """Records the compile-time inputs as verified (the proof just evaluated them); never for
        data inputs, and only when the inputs are real tensors."""
        if self.reads_data or any(tp.has_no_data(inputs[g.index]) for g in self.inputs):
            return
        try:
            key, tensors = self._key(inputs)
            self._verified[key] = [weakref.ref(t) for t in tensors]
        except Exception:  # noqa: BLE001 - fake example inputs: the first real call verifies
            pass

    def check(self, inputs: list) -> bool:
        if any(tp.has_no_data(inputs[g.index]) for g in self.inputs):
            # A call on fake values computes no data (DDP's graph splitter runs each compiled piece on
            # its fake example inputs at compile time, to propagate shapes): nothing to verify, and
            # nothing is cached; the first call on real values verifies.
            return True
        if self.reads_data:
            return self._run_verify(inputs)
        key, tensors = self._key(inputs)
        refs = self._verified.get(key)
        if refs is not None and self._same_objects(refs, tensors):
            return True
        refs = self._rejected.get(key)
        if refs is not None and self._same_objects(refs, tensors):
            return False
        ok = self._run_verify(inputs)
        table = self._verified if ok else self._rejected
        if len(table) >= MAX_CACHED_KEYS:
            table.clear()
        table[key] = [weakref.ref(t) for t in tensors]
        return ok

    def _run_verify(self, inputs: list) -> bool:
        ok = False
        try:
            ok = bool(self.verify(inputs))
        except Exception as err:  # noqa: BLE001 - an unverifiable mask is not causal
            tp.logger().info("acp: re-verifying the proof at %s failed (%s); using the unrewritten graph", self.site, err)
        if not ok and not self._warned:
            self._warned = True
            tp.logger().warning(
                "acp: %s for this call (its inputs or sizes changed); such calls run the graph without the FoX "
                "rewrite", self.failure.format(site=self.site),
            )
        return ok
