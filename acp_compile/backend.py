"""The torch.compile backend `acp`: rewrite FoX attention in the Dynamo graph, then compile.

    torch.compile(model, backend="acp")                             # found through the entry point
    torch.compile(model, backend="acp", options={"log_eps": -8.0})  # options: see ACPConfig
    torch.compile(model, backend="acp", mode="max-autotune")        # mode goes on to inductor

Steps, once per graph Dynamo hands over:
  1. options -> frozen ACPConfig (unknown keys raise, listing the valid ones)
  2. patterns.rewrite_graph rewrites the graph in place; a copy of the graph from before is kept
  3. the inner backend compiles the rewritten graph: inductor's compile_fx (default, with the
     mode's config), or "aot_eager"/"eager" (option inner_backend, for fast tests and debugging)
  4. when a proof depends on data or sizes (a causal mask read from a buffer, or built from a
     symbolic length), the compiled function is wrapped by host-side guards
     (patterns/guards.py); a call whose mask is not causal runs the original graph
An unexpected error in the pass, or in compiling the rewritten graph, never reaches the user: the
original graph is compiled instead and the reason is logged (strict mode raises).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile import compilations
from acp_compile.config import ACPConfig
from acp_compile.patterns.rewrite import NearMissError, copy_graph_module, rewrite_graph
from acp_compile.import_hook import call_after_import
from acp_compile.third_party import KNOWN_FOX_FUNCTIONS
from acp_compile.third_party_layers import KNOWN_LAYER_FUNCTIONS, register_known_third_party

tp.register_torch_log()
# Known third-party FoX functions (fla, the FoX authors') already imported by the model's code are
# redirected to our op while Dynamo traces for this backend; torch.compile resolves the backend
# (importing this module) before it traces. Their fused helper layers (norms, GLU linears, ...) are
# traced as plain PyTorch the same way (third_party_layers.py).
register_known_third_party()
# A FoX library imported after this module (acp_compile imported first, then the model built, then
# torch.compile) is registered as soon as it is imported: registering in the backend entry below comes
# too late for the first frame, which Dynamo has traced by then (its fused norms then graph-break into
# their own kernels).
call_after_import({k.module for k in KNOWN_FOX_FUNCTIONS} | {k.module for k in KNOWN_LAYER_FUNCTIONS},
                  register_known_third_party)
log = tp.logger()

def acp(gm: fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | None = None,
        mode: str | None = None) -> Callable:
    """Dynamo backend entry point (declared under the torch_dynamo_backends entry-point group)."""
    config = options if isinstance(options, ACPConfig) else ACPConfig.from_options(options)
    register_known_third_party()     # idempotent; catches a FoX library the import hook did not see
    return compile_graph(gm, example_inputs, config, mode)


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: ACPConfig, mode: str | None = None) -> Callable:
    if config.report and mode in ("reduce-overhead", "max-autotune"):
        raise ValueError(
            f"acp option report=True reads the plan back to the host on every call, which CUDA graphs "
            f"(mode={mode!r}) cannot replay; use report=False with this mode, or mode='default' to report"
        )
    original = copy_graph_module(gm)
    t0 = time.perf_counter()
    try:
        result = rewrite_graph(gm, example_inputs, config)
    except NearMissError:
        raise
    except Exception as err:  # noqa: BLE001 - a bug in the pass must not change or break the program
        if config.strict or tp.is_dynamo_control_flow(err):
            raise
        log.warning("acp: the pass failed (%s: %s); compiling the graph without the FoX rewrite",
                    type(err).__name__, err, exc_info=log.isEnabledFor(10))
        _record(None, time.perf_counter() - t0, original(), f"the pass failed: {type(err).__name__}: {err}")
        return _inner_compile(original(), example_inputs, config, mode)
    seconds = time.perf_counter() - t0
    log.debug("acp: pass took %.1f ms on a graph of %d nodes", 1e3 * seconds, len(gm.graph.nodes))
    try:
        compiled = _inner_compile(result.gm, example_inputs, config, mode)
    except Exception as err:  # noqa: BLE001
        if not result.sites or config.strict or tp.is_dynamo_control_flow(err):
            raise
        log.warning("acp: compiling the rewritten graph failed (%s: %s); compiling it without the FoX rewrite "
                    "of %s", type(err).__name__, err, ", ".join(result.sites), exc_info=log.isEnabledFor(10))
        _record(result, seconds, result.gm, f"compiling the rewritten graph failed: {type(err).__name__}: {err}")
        return _inner_compile(original(), example_inputs, config, mode)
    _record(result, seconds, result.gm, None)
    if not result.guards:
        return compiled
    for g in result.guards:
        g.seed(list(example_inputs))
    return _guarded(compiled, result.guards, original)


def _record(result, seconds: float, graph: fx.GraphModule, fell_back: str | None) -> None:
    compilations.add(compilations.Compilation(
        sites=tuple(result.sites) if result else (), near_misses=tuple(result.near_misses) if result else (),
        guards=len(result.guards) if result else 0, pass_seconds=seconds, graph=graph, fell_back=fell_back,
    ))


def _inner_compile(gm: fx.GraphModule, example_inputs: list, config: ACPConfig, mode: str | None) -> Callable:
    inner = tp.compile_fx_inner_backend(config.inner_backend)
    if config.inner_backend == "inductor":
        patches = tp.inductor_mode_options(mode)
        if patches:
            return inner(gm, example_inputs, config_patches=patches)
        return inner(gm, example_inputs)
    return inner(gm, example_inputs)


def _guarded(compiled: Callable, guards: list, original: Callable[[], fx.GraphModule]) -> Callable:
    """Runs `compiled` while every guard holds; otherwise the original (unrewritten) graph, eagerly."""
    def call_original(inputs: list):
        return original()(*inputs)

    def run(*args):
        inputs = list(args)
        if all(g.check(inputs) for g in guards):
            return compiled(*args)
        return call_original(inputs)
    return run
