"""The custom op the pass emits when reporting is on:
acp::report_site(q, k, c, site, sm_scale, log_eps, keep_from, anchor, anchor_path).

keep_from (B, Hq, Tq) int32, optional: the kept set the attention op's forward recorded (its fourth
output); the report then shows exactly what was computed, whichever certificate decided it.
anchor, optional: a parameter of the site's module (a graph input) and anchor_path its path below
that module, so that the report can name the site after the module that runs it (one compiled graph
may serve every block under FSDP2; patterns/site_anchor.py).

It returns a zero scalar that the pass adds to the attention's output, so neither AOTAutograd nor
inductor can drop it; when the compiled graph runs, it hands its arguments to the recorder that
acp_compile/report.py installs (set_recorder). The pass knows this op, never the report itself.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

_recorder: list = []      # at most one callable: record(q, k, c, site, sm_scale, log_eps, keep_from, anchor, anchor_path)


def set_recorder(record: Callable) -> None:
    _recorder[:] = [record]


@torch.library.custom_op("acp::report_site", mutates_args=())
def report_site(q: Tensor, k: Tensor, c: Tensor, site_name: str,
                sm_scale: Optional[float], log_eps: Optional[float], keep_from: Optional[Tensor] = None,
                anchor: Optional[Tensor] = None, anchor_path: str = "") -> Tensor:
    if not _recorder:
        raise RuntimeError("acp::report_site ran with no recorder installed; import acp_compile (whose report "
                           "module installs it) before running a graph compiled with options={'report': True}")
    _recorder[0](q, k, c, site_name, sm_scale, log_eps, keep_from, anchor, anchor_path)
    return q.new_zeros(())


@report_site.register_fake
def _report_site_fake(q, k, c, site_name, sm_scale, log_eps, keep_from=None, anchor=None, anchor_path=""):
    return q.new_zeros(())


def _no_grad(ctx, grad):
    return None, None, None, None, None, None, None, None, None


report_site.register_autograd(_no_grad)
