"""Every private torch API the package uses, in one place (torch 2.11 to 2.13).

Nothing else in acp_compile imports `torch._dynamo`, `torch._inductor`, `torch._logging` or
`torch.fx.experimental`; when torch moves one of these, this file is the only one to fix.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

LOG_NAME = "acp_compile"          # TORCH_LOGS="+acp_compile" shows debug lines, "acp_compile" info lines


def register_torch_log() -> None:
    """Makes TORCH_LOGS="+acp_compile" reach the `acp_compile` logger (idempotent)."""
    try:
        from torch._logging import _internal as logging_internal
    except ImportError:  # pragma: no cover - torch without the logging registry
        return
    registry = logging_internal.log_registry
    if LOG_NAME in getattr(registry, "log_alias_to_log_qnames", {}):
        return
    logging_internal.register_log(LOG_NAME, LOG_NAME)
    # TORCH_LOGS was parsed when torch was imported, before this alias existed: parse it again,
    # only when it names us (re-parsing resets settings made with torch._logging.set_logs).
    import os
    if LOG_NAME not in os.environ.get("TORCH_LOGS", ""):
        return
    try:
        logging_internal._init_logs()
    except Exception:  # pragma: no cover - never let logging setup break compilation
        pass


def torch_log_registered() -> bool:
    """True when TORCH_LOGS knows the name "acp_compile"."""
    from torch._logging import _internal as logging_internal
    return LOG_NAME in logging_internal.log_registry.log_alias_to_log_qnames


def inductor_config():
    """torch._inductor.config (tests patch fx_graph_cache through it)."""
    from torch._inductor import config
    return config


def acp_counters() -> "Any":
    """torch._dynamo.utils.counters["acp"]: a Counter keyed by event name."""
    from torch._dynamo.utils import counters
    return counters["acp"]


def compile_fx_inner_backend(name: str) -> Callable:
    """The backend that compiles the rewritten graph: "inductor" (compile_fx), "aot_eager" or "eager"."""
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx
    from torch._dynamo.backends.registry import lookup_backend
    return lookup_backend(name)


def inductor_mode_options(mode: str | None) -> dict | None:
    """Inductor config overrides of torch.compile's `mode` (what the inductor backend itself does)."""
    if mode is None or mode == "default":
        return None
    from torch._inductor import list_mode_options
    return list_mode_options(mode)


def concrete_int(value: Any) -> int:
    """A Python int for an int or a SymInt, read from its hint: never adds a guard or specialises."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if hint is None:
            hint = value.node.shape_env.size_hint(value.node.expr)
        return int(hint)
    return int(value)


def sym_expr(value: Any):
    """The sympy expression of a SymInt/SymFloat, or a sympy number for a Python number."""
    import sympy
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return value.node.expr
    if isinstance(value, bool):
        raise TypeError("a bool is not a size or a scale")
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, float):
        return sympy.Float(value)
    raise TypeError(f"not a number or symbolic number: {value!r}")


def is_symbolic(value: Any) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def sym_sqrt_functions() -> tuple:
    """The callables Dynamo records for math.sqrt of a symbolic size."""
    import math
    fns = [math.sqrt]
    sym_sqrt = getattr(torch, "_sym_sqrt", None)
    if sym_sqrt is not None:
        fns.append(sym_sqrt)
    return tuple(fns)


def tracing_compiler_fn() -> Any:
    """The backend callable of the graph Dynamo is tracing right now (the head of its wrapper chain,
    e.g. WrapBackendDebug -> _TorchCompileWrapper -> backend), or None when not tracing."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        return InstructionTranslator.current_tx().output.compiler_fn
    except Exception:   # noqa: BLE001 - not tracing, or torch moved it: callers treat None as "not acp"
        return None


def flex_attention_op() -> Any:
    """The higher-order op that Dynamo records for torch.nn.attention.flex_attention calls."""
    return torch.ops.higher_order.flex_attention


def tensor_version(t: torch.Tensor) -> int:
    """The in-place modification counter of a tensor (host side, no device sync)."""
    return t._version


def example_value(node: torch.fx.Node) -> Any:
    """The fake value Dynamo recorded for a node (a FakeTensor, SymInt, tuple ...), or None."""
    meta = node.meta
    if "example_value" in meta:
        return meta["example_value"]
    return meta.get("val")


def fx_graph_cache_counters() -> dict:
    """Hit/miss counts of inductor's FX graph cache (tests use them)."""
    from torch._dynamo.utils import counters
    return counters["inductor"]


def reset_dynamo() -> None:
    torch._dynamo.reset()


def logger() -> logging.Logger:
    return logging.getLogger(LOG_NAME)


def to_plain_sympy(expr):
    """Rewrites torch's own sympy functions (OpaqueUnaryFn_sqrt, ToFloat, FloatTrueDiv, FloatPow,
    PowByNatural, IntTrueDiv) into plain sympy so that sympy can simplify the expression.
    Raises ValueError for a function it does not know (the caller then stays unsure)."""
    import sympy

    def conv(e):
        if e.is_Atom:
            return e
        args = [conv(a) for a in e.args]
        name = type(e).__name__
        if name == "ToFloat":
            return args[0]
        if name == "OpaqueUnaryFn_sqrt":
            return sympy.sqrt(args[0])
        if name in ("FloatTrueDiv", "IntTrueDiv"):
            return args[0] / args[1]
        if name in ("FloatPow", "PowByNatural"):
            return args[0] ** args[1]
        if isinstance(e, (sympy.Add, sympy.Mul, sympy.Pow)):
            return e.func(*args)
        raise ValueError(f"unknown symbolic function {name}")

    return conv(expr)


def statically_equal(a: Any, b: Any) -> bool:
    """a == b for ints or SymInts, decided on their expressions: adds no guard, False when unsure."""
    if not is_symbolic(a) and not is_symbolic(b):
        return a == b
    try:
        import sympy
        return sympy.expand(sym_expr(a) - sym_expr(b)) == 0
    except Exception:
        return False


def storage_key(value: Any) -> Any:
    """A hashable key of the storage a (fake) tensor views: equal keys mean the tensors alias.
    None for anything that is not a tensor with a storage (numbers, tuples, sparse tensors)."""
    if not isinstance(value, torch.Tensor):
        return None
    try:
        from torch.multiprocessing.reductions import StorageWeakRef
        return ("storage", StorageWeakRef(value.untyped_storage()).cdata)
    except Exception:  # noqa: BLE001 - no storage (sparse, nested ...): the caller stays conservative
        return None


def graph_input_source(node: torch.fx.Node) -> str | None:
    """Where Dynamo took a placeholder's value from ("L['x']", "L['self']._buffers['mask']"), or None."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return None
    name = getattr(source, "name", None)
    try:
        return name() if callable(name) else str(name)
    except Exception:  # noqa: BLE001
        return None


def propagate_fake_values(nodes: list, example_inputs: list) -> None:
    """Runs `nodes` (new nodes, in graph order) on the fake values of what they read, under the fake
    mode of the graph, and records the results as their example values; raises what the ops raise."""
    # The mode of the recorded values themselves (the tracing context may hold another one).
    mode = None
    for n in nodes:
        for a in n.all_input_nodes:
            mode = mode or getattr(example_value(a), "fake_mode", None)
    if mode is None:
        from torch._guards import detect_fake_mode
        mode = detect_fake_mode(example_inputs)
    if mode is None:
        raise RuntimeError("no fake mode found for the graph's values")

    from torch._subclasses.fake_tensor import FakeTensor

    def value(a):
        if isinstance(a, torch.fx.Node):
            v = example_value(a)
            if v is None:
                raise RuntimeError(f"no fake value recorded for {a.name}")
            return mode.from_tensor(v) if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) else v
        return a

    with mode:
        for n in nodes:
            args = torch.fx.node.map_aggregate(n.args, value)
            kwargs = torch.fx.node.map_aggregate(n.kwargs, value)
            if n.op == "call_method":
                out = getattr(args[0], n.target)(*args[1:], **kwargs)
            elif n.op == "call_function":
                out = n.target(*args, **kwargs)
            else:
                raise RuntimeError(f"cannot run {n.op} {n.name} on fake values")
            n.meta["example_value"] = out


def has_no_data(value: Any) -> bool:
    """True for a tensor that carries no data to read: a FakeTensor (what DDP's graph splitter hands the
    backend as example inputs of each piece) or a tensor on the meta device."""
    if not isinstance(value, torch.Tensor):
        return False
    from torch._subclasses.fake_tensor import is_fake
    return bool(value.is_meta or is_fake(value))


def is_ddp_piece(gm: torch.fx.GraphModule) -> bool:
    """True when `gm` is one piece of a graph that DDP's optimizer (DDPOptimizer) split at bucket
    boundaries: it marks each piece with its compile reason before compiling it."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    return "DDPOptimizer" in str(getattr(reason, "reason", "") or "")


def is_dynamo_control_flow(err: BaseException) -> bool:
    """True for the exceptions torch raises on purpose while compiling (e.g. a restart of the analysis
    with a Python float specialised), which a backend must let through."""
    try:
        from torch._dynamo.exc import RestartAnalysis
    except ImportError:  # pragma: no cover
        return False
    return isinstance(err, RestartAnalysis)
