"""Known third-party FoX functions, redirected to our op while Dynamo traces a model for backend "acp".

    register_known_fox_functions()      # idempotent and cheap; call it where backend "acp" is set up

Functions (when their module is already imported; a missing package is skipped silently):
  fla.ops.forgetting_attn.parallel_forgetting_attn(q, k, v, g, scale=None, window_size=None, cu_seqlens=None)
      q (B, T, Hq, D), k and v (B, T, Hkv, D), g (B, T, Hq) log forget gate; older releases also take
      head_first (then (B, H, T, ...)).
  forgetting_transformer.forgetting_attention(q, k, v, log_fgate, *, head_first=False, seq_start=None,
                                              sm_scale=None[, adaptive_threshold=None])
      the FoX authors' kernel: same layouts, Tq <= Tk with the queries last.
Both compute o = softmax(scale q.k + c_i - c_j, causal) v with c = cumsum(log f) in fp32, which is
acp_compile.fox_attention(q, k, v, log_f, sm_scale=scale, layout="bthd"|"bhtd").

Substituted only when the call is one the op computes exactly: no window_size; k and v alike but for
the value head dim; Tq == Tk for fla. The authors' seq_start (a (B,) count of left-padding keys, as
their model passes for batched generation) becomes the op's key_padding_mask (key j visible when
j >= seq_start[b]); their kernel, like the op, returns 0 (and lse -inf) for a row with no visible key.
fla's cu_seqlens (varlen: B = 1, documents packed into one row, the gate's cumsum restarting per
document) is the op's cu_seqlens: c_i - c_j inside a document does not depend on where the cumsum
restarts. The authors' own ACP threshold
(adaptive_threshold, which their model computes from its log_pruning_tolerance as
tolerance - log(Tk) - 2U) is the op's: a tile is skipped when its decay is below it, so it is passed on
as log_eps = 0 and u_bound = -(threshold + log(Tk)) / 2 ("auto" is their tolerance -10 with the op's own
bound). The backend's log_eps applies to calls without one; with log_eps=None or prune=False every call
is dense. Any other call,
and every call traced for a backend other than "acp", runs the original function's own code (a copy of
the function object, so the substitution does not catch it again). Eager calls are never touched.

Mechanism: torch.compiler.substitute_in_graph registers a polyfill that Dynamo inlines in place of the
original. Which backend is tracing, and its options, are read at trace time by one function marked
torch.compiler.assume_constant_result, so the decision is a constant of the traced graph.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from acp_compile._torch_private import acp_counters, logger

log = logger()


@dataclass(frozen=True)
class KnownFox:
    """A third-party FoX function and how its arguments map onto ours."""
    module: str                 # where it is imported from
    attr: str
    gate: str                   # name of the log-forget-gate parameter
    scale: str                  # name of the scale parameter
    unsupported: tuple          # parameters that must be None (or absent) for the op to be exact
    same_length: bool           # True: the function needs Tq == Tk
    threshold: str | None = None    # name of the function's own ACP threshold parameter, if any
    left_padding: str | None = None  # name of a (B,) count of left-padding keys (the op's key_padding_mask)
    varlen: str | None = None       # name of a flash-attn style cu_seqlens (the op's cu_seqlens, B = 1)


KNOWN_FOX_FUNCTIONS = (
    KnownFox("fla.ops.forgetting_attn", "parallel_forgetting_attn", gate="g", scale="scale",
             unsupported=("window_size",), same_length=True, varlen="cu_seqlens"),
    KnownFox("forgetting_transformer", "forgetting_attention", gate="log_fgate", scale="sm_scale",
             unsupported=(), same_length=False, threshold="adaptive_threshold", left_padding="seq_start"),
)

_registered: dict[int, Callable] = {}     # id(original function) -> the polyfill Dynamo inlines


def register_known_fox_functions(import_missing: bool = False) -> list[str]:
    """Registers the substitution for every known FoX function whose module is already imported (or,
    with import_missing=True, importable: fla takes seconds to import); returns their names. Cheap and
    idempotent: call it again after importing a FoX library late."""
    names = []
    for known in KNOWN_FOX_FUNCTIONS:
        fn = _import(known, import_missing)
        if fn is not None and register_fox_function(fn, known):
            names.append(f"{known.module}.{known.attr}")
    return names


def register_fox_function(fn: Callable, known: KnownFox) -> bool:
    """Makes Dynamo trace `fn` as our op under backend "acp" (idempotent; False when not possible)."""
    if id(fn) in _registered:
        return True
    if not isinstance(fn, types.FunctionType):
        log.debug("acp: %s is not a plain Python function; calls to it are left as they are", known.attr)
        return False
    signature = inspect.signature(fn)
    names = list(signature.parameters)
    if names[:3] != ["q", "k", "v"] or known.gate not in names or known.scale not in names:
        log.info("acp: %s.%s has an unknown signature %s; calls to it are left as they are",
                 known.module, known.attr, signature)
        return False
    polyfill = _make_polyfill(fn, known, signature)
    try:
        torch.compiler.substitute_in_graph(fn, skip_signature_check=True)(polyfill)
    except ValueError as err:          # already substituted by someone else: leave theirs in place
        log.info("acp: %s.%s is already substituted (%s); ours is not added", known.module, known.attr, err)
        return False
    _registered[id(fn)] = polyfill
    return True


def _import(known: KnownFox, import_missing: bool):
    module = sys.modules.get(known.module)
    if module is None and import_missing:
        try:
            module = importlib.import_module(known.module)
        except Exception:   # noqa: BLE001 - not installed, or it fails to import without a GPU
            return None
    return getattr(module, known.attr, None)


def _copy_of(fn: types.FunctionType) -> types.FunctionType:
    """The same code as a new function object, which Dynamo traces as ordinary user code."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    return copy


def _make_polyfill(fn: types.FunctionType, known: KnownFox, signature: inspect.Signature) -> Callable:
    original = _copy_of(fn)
    positional = [n for n, p in signature.parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    defaults = {n: p.default for n, p in signature.parameters.items() if p.default is not p.empty}
    accepted = frozenset(signature.parameters)
    label = f"{known.module}.{known.attr}"
    # Plain constants only in the closure: Dynamo inlines this function and cannot wrap a dataclass.
    gate_name, scale_name, unsupported, same_length = known.gate, known.scale, known.unsupported, known.same_length
    threshold_name, left_padding_name, varlen_name = known.threshold, known.left_padding, known.varlen

    @functools.wraps(fn)
    def polyfill(*args, **kwargs):
        params = dict(defaults)
        params.update(zip(positional, args))
        params.update(kwargs)
        q, k, v, gate = params["q"], params["k"], params["v"], params[gate_name]
        head_first = bool(params.get("head_first", False))
        # A branch, not bool(): under dynamic shapes the test is a SymBool, which a branch turns into
        # a guard and a constant (assume_constant_result takes constants only).
        cu_seqlens = params.get(varlen_name) if varlen_name is not None else None
        exact = (True if len(args) <= len(positional) and all(name in accepted for name in kwargs)
                 and all(params.get(name) is None for name in unsupported)
                 and _shapes_supported(q, k, v, gate, head_first, same_length)
                 and _varlen_supported(cu_seqlens, q) else False)
        log_eps = _acp_log_eps(label, exact)
        if log_eps == "original":
            return original(*args, **kwargs)
        from acp_compile.api import fox_attention
        threshold = params.get(threshold_name) if threshold_name is not None else None
        u_bound = None
        certificate = _acp_certificate()
        if threshold is not None and log_eps is not None:
            # the layer's own fixed threshold is a paper-rule delta: only that rule reads it
            log_eps, u_bound = _threshold_as_bound(threshold, k.shape[2 if head_first else 1], q)
            certificate = "paper"
        key_padding_mask = None
        if left_padding_name is not None and params.get(left_padding_name) is not None:
            # seq_start[b] left-padding keys: key j of row b is visible when j >= seq_start[b]
            Tk = k.shape[2 if head_first else 1]
            start = params[left_padding_name]
            key_padding_mask = torch.arange(Tk, device=k.device)[None, :] >= start.to(k.device)[:, None]
        return fox_attention(q, k, v, gate, sm_scale=params.get(scale_name), log_eps=log_eps, u_bound=u_bound,
                             layout="bhtd" if head_first else "bthd", certificate=certificate,
                             key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)

    return polyfill


def _threshold_as_bound(threshold, Tk, q):
    """The op's (log_eps, u_bound) that skip exactly the tiles a FoX-authors threshold skips: the op
    skips a tile when its decay is below log_eps - log(Tk) - 2 u_bound."""
    if isinstance(threshold, str):            # "auto": their tolerance -10 with the bound from q and k
        return -10.0, None
    threshold = torch.as_tensor(threshold, dtype=torch.float32, device=q.device)
    return 0.0, (-(threshold + math.log(Tk)) / 2).clamp_min(0.0)


def _shapes_supported(q, k, v, gate, head_first: bool, same_length: bool) -> bool:
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v, gate)):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or gate.dim() != 3 or k.shape[:3] != v.shape[:3]:
        return False
    t_axis, h_axis = (2, 1) if head_first else (1, 2)
    Tq, Tk, Hq, Hkv = q.shape[t_axis], k.shape[t_axis], q.shape[h_axis], k.shape[h_axis]
    gate_shape = (q.shape[0], Hq, Tk) if head_first else (q.shape[0], Tk, Hq)
    return (q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3] and tuple(gate.shape) == gate_shape
            and Hq % Hkv == 0 and (Tq == Tk if same_length else Tq <= Tk))


def _varlen_supported(cu_seqlens, q) -> bool:
    """No cu_seqlens, or a 1-d integer tensor on q's device with a batch of 1 (the varlen layout)."""
    if cu_seqlens is None:
        return True
    return (isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2
            and not cu_seqlens.dtype.is_floating_point and cu_seqlens.dtype != torch.bool
            and cu_seqlens.device == q.device and q.shape[0] == 1)


@torch.compiler.assume_constant_result
def _acp_log_eps(label: str, exact: bool):
    """At trace time: "original" unless backend "acp" is tracing and the call is exact; else the op's
    log_eps from the backend's options (a float, or None for dense). Counts and logs the decision."""
    config = _tracing_acp_config()
    if config is None:
        return "original"
    if not exact:
        acp_counters()["near_miss"] += 1
        log.info("acp near-miss: %s called with options or shapes the op does not cover (window_size, "
                 "cu_seqlens with a batch above 1, a head or batch mismatch, or Tq > Tk); left as it is", label)
        return "original"
    acp_counters()["fox_attention"] += 1
    acp_counters()["fox_substituted"] += 1
    log.debug("acp: %s redirected to acp::fox_attention_fwd (log_eps=%s)", label, config.op_log_eps)
    return config.op_log_eps


@torch.compiler.assume_constant_result
def _acp_certificate() -> str:
    """At trace time: the certificate option of the acp backend being traced for ("online" by default)."""
    config = _tracing_acp_config()
    return "online" if config is None else config.certificate


def _tracing_acp_config():
    """The ACPConfig of the backend Dynamo is tracing for, when that backend is acp; else None.

    Recognised: the function acp_compile.backend.acp (backend="acp", options from torch.compile) and
    any backend object with an `acp_config` attribute (acp_compile.decorator.ACPBackend).
    The compiler_fn chain (WrapBackendDebug -> _TorchCompileWrapper -> the backend) comes from
    acp_compile._torch_private, the one module that touches Dynamo internals.
    """
    from acp_compile import _torch_private as tp
    from acp_compile.config import ACPConfig
    fn: Any = tp.tracing_compiler_fn()
    options, seen = None, set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if isinstance(getattr(fn, "acp_config", None), ACPConfig):
            return fn.acp_config
        kwargs = getattr(fn, "kwargs", None)
        if isinstance(kwargs, dict) and kwargs.get("options") is not None:
            options = kwargs["options"]
        if getattr(fn, "__module__", None) == "acp_compile.backend" and getattr(fn, "__name__", "") == "acp":
            return options if isinstance(options, ACPConfig) else ACPConfig.from_options(options)
        fn = (getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
              or getattr(fn, "__wrapped__", None))
    return None
