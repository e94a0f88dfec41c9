"""Which parameter names a compiled attention site when the graph runs (report names under FSDP2).

One compiled graph can serve many modules. Under FSDP2 each block's forward is a frame of its own,
compiled once and reused for every block (Dynamo inlines nn.Modules and lifts their parameters to
graph inputs), so a site's compile-time name is relative to that frame ("attn"), the same for every
block. The pass therefore hands the report op one parameter of the site's module (a graph input)
with that parameter's path below the module; acp_compile/report.py finds, when the graph runs, which
module holds that tensor and names the site after that module's path from the root ("layers.3.attn").

    find_anchor(gm, node) -> Anchor | None      (None: no parameter of the site's module or an
                                                 ancestor is a graph input; the compile-time name stays)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

from acp_compile._torch_private import graph_input_source


@dataclass(frozen=True)
class Anchor:
    placeholder: fx.Node     # the graph input holding the parameter
    param_path: str          # its path below `module` ("q_proj.weight")
    module: str              # the path in the frame of the module holding it ("attn"; "" for the frame's own)
    site_module: str         # the path in the frame of the site's innermost module (`module` or below it)

    def encoded(self) -> str:
        """The report op's anchor_path string (read back by acp_compile/module_names.py)."""
        return f"{self.module}|{self.param_path}|{self.site_module}"


def dotted(source: str) -> str:
    """"L['self']._modules['layers']._modules['0']._parameters['weight']" or "L['self'].layers[0].weight"
    -> "layers.0.weight": the path below the frame's root object (the first item names that object)."""
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", source).strip(".")
    parts = [p for p in path.split(".") if p not in ("_modules", "_parameters", "_buffers")]
    return ".".join(parts[2:] if parts[:1] == ["L"] else parts[1:])


def _module_stack(node: fx.Node) -> list[str]:
    """Frame-relative paths of the modules around `node`, outermost first."""
    out = []
    for value in (node.meta.get("nn_module_stack") or {}).values():
        source = value[0] if isinstance(value, tuple) else str(value)
        out.append(dotted(source))
    return out


def find_anchor(gm: fx.GraphModule, node: fx.Node) -> Anchor | None:
    params = []
    for p in gm.graph.nodes:
        if p.op != "placeholder":
            continue
        source = graph_input_source(p) or ""
        if "_parameters" in source:
            params.append((p, dotted(source)))
    stack = _module_stack(node)
    site_module = stack[-1] if stack else ""
    for module in [*reversed(stack), ""]:                     # deepest module first, the frame's own last
        prefix = module + "." if module else ""
        for p, path in params:
            if path and path.startswith(prefix):
                return Anchor(p, path[len(prefix):], module, site_module)
    return None
