"""What the Triton kernels cover, and the switch that runs them on CPU tensors under the interpreter.

Covered (the dispatcher falls back to the blocked PyTorch path for anything else, with one log line
per reason on the "acp_compile" logger, never an error):
  device   CUDA with compute capability >= 8.0 (Ampere, Hopper and newer)
  dtype    float16, bfloat16, float32 (float32 runs its matrix products in TF32: about 10 mantissa
           bits, like torch's allow_tf32; use float64 for an exact result, which takes the blocked path)
  head dim 1 .. 256 for q, k (D) and for v (Dv, which may differ from D), each padded to a power of
           two >= 16 inside the kernels, with masks
  shapes   any strides, grouped-query attention (Hq a multiple of Hkv), Tq <= Tk, any T

Interpreter switch (for CI, which has no GPU): on CPU tensors the Triton path is taken only when BOTH
  ACP_TRITON_ON_CPU=1   and   TRITON_INTERPRET=1
are set in the environment before triton is first imported (Triton reads TRITON_INTERPRET when a
kernel is decorated, i.e. when kernels/fox_triton/forward.py is imported). bfloat16 is not covered
under the interpreter (numpy has no bfloat16; Triton's interpreter gets it wrong), so it falls back.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

logger = logging.getLogger("acp_compile")

MAX_HEAD_DIM = 256
MIN_CAPABILITY = (8, 0)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_DTYPES = (torch.float16, torch.float32)

_reported: set[str] = set()


def interpreter_on_cpu() -> bool:
    """True when the documented switch routes CPU tensors to the Triton kernels (interpreted)."""
    return os.environ.get("ACP_TRITON_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency; a broken install falls back
        return False
    return True


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, c: Tensor) -> str | None:
    """None when the Triton kernels cover this call, else a sentence saying why not (for the log)."""
    dev = q.device
    if dev.type == "cuda":
        cap = _capability(dev.index if dev.index is not None else torch.cuda.current_device())
        if cap < MIN_CAPABILITY:
            return f"GPU compute capability {cap[0]}.{cap[1]} is below 8.0 (the Triton kernels need Ampere or newer)"
        dtypes = GPU_DTYPES
    elif dev.type == "cpu":
        if not interpreter_on_cpu():
            return "CPU tensors (set ACP_TRITON_ON_CPU=1 and TRITON_INTERPRET=1 to run the Triton kernels interpreted)"
        dtypes = INTERPRETER_DTYPES
    else:
        return f"device type {dev.type!r} has no Triton kernels"
    if q.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"dtype {q.dtype} on {dev.type} (Triton kernels cover {names})"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if v.shape[-1] > MAX_HEAD_DIM:
        return f"value head dim {v.shape[-1]} > {MAX_HEAD_DIM}"
    if c.dtype not in (torch.float32, torch.float64):
        return f"gate dtype {c.dtype}"
    if not _triton_importable():
        return "triton cannot be imported"
    return None


def supported(q: Tensor, k: Tensor, v: Tensor, c: Tensor) -> bool:
    return unsupported_reason(q, k, v, c) is None


def log_fallback_once(what: str, reason: str) -> None:
    """One INFO line per distinct (what, reason), e.g. ("forward", "dtype torch.float64 ...")."""
    key = f"{what}: {reason}"
    if key not in _reported:
        _reported.add(key)
        logger.info("acp_compile: %s runs on the blocked PyTorch path: %s", what, reason)
