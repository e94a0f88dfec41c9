"""Registration of known third-party FoX code when its module is imported after acp_compile.

    call_after_import(module_names, callback)    # callback() runs once each named module has executed

The redirections of third_party.py and third_party_layers.py must be in place before Dynamo traces the
first frame that calls them. Registering when the backend is first called is too late for that frame (its
fused norms then graph-break into their own kernels), and Dynamo's compile-start callbacks are dropped by
torch._dynamo.reset(). A finder on sys.meta_path sees every import: for a named module it wraps the loader
that would have been used, and calls the callback right after the module's code has run. Modules imported
before acp_compile are registered at its import instead (acp_compile/backend.py).
"""
from __future__ import annotations

import importlib.abc
import sys
from typing import Callable, Iterable


class _LoaderThenCallback(importlib.abc.Loader):
    """The original loader, followed by callback() once the module has executed."""

    def __init__(self, loader, callback: Callable[[], None]):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):             # get_source, is_package, ... of the original loader
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, names: frozenset, callback: Callable[[], None]):
        self.names, self.callback = names, callback

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderThenCallback(spec.loader, self.callback)
                return spec
        return None


def call_after_import(module_names: Iterable[str], callback: Callable[[], None]) -> None:
    """Installs (once per callback) a finder that runs callback() after any of module_names is imported."""
    names = frozenset(module_names)
    for finder in sys.meta_path:
        if isinstance(finder, _AfterImport) and finder.callback is callback:
            finder.names = finder.names | names
            return
    sys.meta_path.insert(0, _AfterImport(names, callback))
