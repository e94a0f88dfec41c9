"""The layers of DESIGN.md section 3 and their dependency rules, enforced by reading every import.

    kernels/            -> kernels only (the fp64 reference is imported by nothing in the package);
                        kernels/fox_triton/* never imports the torch plan (kernels/plan.py): what both
                        plans share (threshold, pruning on/off, default scale) is in kernels/threshold.py
    foundation          _torch_private, config, checks: nothing of the package but each other
    op layer            ops, report_op, step_stats: kernels and the foundation
    patterns/ (pass)    patterns, the op layer and the foundation; never kernels, the API, the report,
                        the backend or the decorator
    top                 api, generation, backend, decorator, report, module_names, pruning_map, compilations, third_party, import_hook: anything
Private torch modules (torch._dynamo, torch._inductor, ...) are imported by _torch_private only.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"acp_compile": "acp_compile", "patterns": "acp_compile.patterns", "kernels": "acp_compile.kernels"}
FOUNDATION = {"acp_compile._torch_private", "acp_compile.config", "acp_compile.checks"}
OP_LAYER = {"acp_compile.ops", "acp_compile.report_op", "acp_compile.step_stats"}
TOP = {"acp_compile", "acp_compile.api", "acp_compile.backend", "acp_compile.decorator", "acp_compile.report",
       "acp_compile.pruning_map", "acp_compile.compilations", "acp_compile.third_party",
       "acp_compile.third_party_layers", "acp_compile.import_hook", "acp_compile.module_names", "acp_compile.generation",
       "acp_compile.cache", "acp_compile.cache.kv_cache", "acp_compile.cache.paged_decode", "acp_compile.cache.bounds"}
PRIVATE_TORCH = ("torch._dynamo", "torch._inductor", "torch._logging", "torch._guards", "torch._subclasses",
                 "torch.fx.experimental", "torch._higher_order_ops", "torch._functorch")


def _modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


def _imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports: `from a import b` counts as a.b when that is a module, else as a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES or _is_private_torch(sub) else node.module)
    return found


def _is_private_torch(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in PRIVATE_TORCH)


def _layer(module: str) -> str:
    if module.startswith("acp_compile.kernels"):
        return "kernels"
    if module.startswith("acp_compile.patterns"):
        return "patterns"
    if module in FOUNDATION:
        return "foundation"
    if module in OP_LAYER:
        return "op"
    if module in TOP:
        return "top"
    raise AssertionError(f"{module} belongs to no layer: add it to a layer in tests/test_dependencies.py and DESIGN.md")


MODULES = dict(_modules())
ALLOWED = {
    "kernels": {"kernels"},
    "foundation": {"foundation"},
    "op": {"kernels", "foundation", "op"},
    "patterns": {"patterns", "op", "foundation"},
    "top": {"kernels", "foundation", "op", "patterns", "top"},
}
def _package_imports(path) -> set[str]:
    return {m for m in _imports(path) if m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_what_its_layer_may(module):
    layer = _layer(module)
    wrong = sorted(m for m in _package_imports(MODULES[module]) if m != module and _layer(m) not in ALLOWED[layer]
                   and not (layer == "foundation" and m == module))
    assert not wrong, f"{module} ({layer}) imports {wrong}, which its layer may not (DESIGN.md section 3)"


def test_nothing_in_the_package_imports_the_reference():
    users = sorted(m for m, p in MODULES.items() if m != "acp_compile.kernels.reference"
                   and "acp_compile.kernels.reference" in _package_imports(p))
    assert not users, f"the fp64 reference defines correctness for tests; {users} import it"


def test_triton_kernels_do_not_import_the_torch_plan():
    users = sorted(m for m, p in MODULES.items() if m.startswith("acp_compile.kernels.fox_triton")
                   and "acp_compile.kernels.plan" in _package_imports(p))
    assert not users, f"{users} import kernels/plan.py; share helpers through kernels/threshold.py"


def test_private_torch_apis_are_touched_in_one_module():
    users = sorted(m for m, p in MODULES.items() if m != "acp_compile._torch_private"
                   and any(_is_private_torch(i) for i in _imports(p)))
    assert not users, f"{users} import private torch modules; go through acp_compile/_torch_private.py"


def test_the_rules_see_every_layer():
    layers = {_layer(m) for m in MODULES}
    assert layers == set(ALLOWED), layers
