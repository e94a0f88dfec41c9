"""`acp`: compile a model class, a model instance or a function with the acp backend.

    @acp                                   # a class: every instance runs its forward compiled
    class Model(torch.nn.Module): ...

    @acp(log_eps=-8.0, dynamic=True)       # acp options and torch.compile arguments, in any mix
    def attention_block(x): ...

    fast = acp(log_eps=-10.0)(model)       # an instance: returns the compiled module (shares parameters)

Keyword arguments named like torch.compile's (fullgraph, dynamic, mode, disable) go to torch.compile;
every other keyword is an acp option, validated by ACPConfig.from_options (an unknown key raises and
lists the valid ones). `mode` reaches both inductor and the acp backend: torch.compile refuses a mode
together with backend options, so the decorator hands torch.compile a backend object that carries them.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import torch

from acp_compile.config import ACPConfig

COMPILE_KWARGS = ("fullgraph", "dynamic", "mode", "disable")


class ACPBackend:
    """A torch.compile backend bound to one configuration and mode; calls acp_compile.backend.acp.

    `acp_config` is what acp_compile/third_party.py reads while Dynamo traces, to know that this backend
    is acp and which options it runs with.
    """

    def __init__(self, config: ACPConfig, mode: str | None = None) -> None:
        self.acp_config = config
        self.mode = mode

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from acp_compile import backend
        return backend.acp(gm, example_inputs, options=self.acp_config, mode=self.mode)

    def __repr__(self) -> str:
        return f"ACPBackend({self.acp_config}, mode={self.mode!r})"


def acp(obj: Any = None, /, *, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """Compile `obj` (an nn.Module subclass, an nn.Module instance or a function) with backend "acp".

    Used bare (`@acp`) or with arguments (`@acp(log_eps=-10.0, fullgraph=True)`); see the module notes.
    """
    compile_kwargs = {name: kwargs.pop(name) for name in COMPILE_KWARGS if name in kwargs}
    try:
        config = ACPConfig.from_options(options, **kwargs)
    except ValueError as err:
        raise ValueError(f"{err}; torch.compile arguments accepted as well: {list(COMPILE_KWARGS)}") from None
    backend = ACPBackend(config, compile_kwargs.pop("mode", None))
    _register_known_functions()

    def apply(target: Any) -> Any:
        if inspect.isclass(target):
            return _compile_class(target, backend, compile_kwargs)
        if isinstance(target, torch.nn.Module):
            return torch.compile(target, backend=backend, **compile_kwargs)
        if callable(target):
            return torch.compile(target, backend=backend, **compile_kwargs)
        raise TypeError(f"acp: expected an nn.Module subclass, an nn.Module or a function, got "
                        f"{type(target).__name__}; options go in keywords, e.g. @acp(log_eps=-10.0)")

    return apply if obj is None else apply(obj)


def _compile_class(cls: type, backend: ACPBackend, compile_kwargs: dict) -> type:
    """Wraps cls.__init__ so each new instance compiles its own forward (nn.Module.compile, in place)."""
    if not issubclass(cls, torch.nn.Module):
        raise TypeError(f"acp: a decorated class must subclass torch.nn.Module, {cls.__name__} does not; "
                        f"decorate its forward function instead")
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.compile(backend=backend, **compile_kwargs)

    cls.__init__ = __init__
    return cls


def _register_known_functions() -> None:
    """Third-party FoX functions already imported become our op under this backend (cheap, idempotent)."""
    from acp_compile.third_party_layers import register_known_third_party
    register_known_third_party()
