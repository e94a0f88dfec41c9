"""Per-site pruning report: which fraction of tiles ACP skipped, per (batch, head), in the last call.

Switch it on with options={"report": True} (off by default: it reads the plan back to the host,
one device sync per site and call, and cannot run under CUDA graphs).

    model = torch.compile(model, backend="acp", options={"report": True})
    model(x)
    for rec in acp_compile.report.sites():            # one record per rewritten attention site
        print(rec.site, rec.calls, rec.skipped.mean())   # rec.skipped: (B, Hq) fp32, last call
    acp_compile.report.draw_pruning_map("layers.0.attn", head=0, batch=0, path="map.png")

Site names are the module path of the attention ("layers.3.attn", "#2" appended when one module
holds several), or the graph node's name outside modules. The path is resolved when the graph runs
(module_names.py), so it stays the module path from the root when one compiled graph serves every
block (FSDP2, per-block compile) and leaves out wrappers (DDP's `module`, `_orig_mod`). Numbers come from the same plan the
kernels use (kernels/dispatch.py forward_plan: the forward's tile sizes), computed for the forward call.

Mechanism: the pass adds `o = o + acp::report_site(q, k, c, site, ...)` (acp_compile/report_op.py),
an opaque custom op returning a zero scalar; its result feeds the output, so neither AOTAutograd nor
inductor can drop it, and it calls `record` below when the compiled graph runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from acp_compile import module_names, report_op
from acp_compile.kernels import dispatch
from acp_compile.kernels.plan import kept_tiles, recorded_plan, skipped_fraction


@dataclass
class SiteRecord:
    site: str                 # name of the attention site
    calls: int                # forward calls recorded
    skipped: Tensor           # (B, Hq) fp32 on CPU: fraction of causal tiles skipped in the last call
    kept_tiles: Tensor        # (B, Hq, Mq, Nk) bool on CPU: tiles computed in the last call
    block_m: int              # tile rows (queries)
    block_n: int              # tile columns (keys)
    seq_q: int                # Tq of the last call
    seq_k: int                # Tk of the last call


_RECORDS: dict[str, SiteRecord] = {}


def sites() -> list[SiteRecord]:
    """Records of every site seen since the last reset(), in first-call order."""
    return list(_RECORDS.values())


def site(name: str) -> SiteRecord:
    if name not in _RECORDS:
        known = ", ".join(_RECORDS) or "none yet (compile with options={'report': True} and run the model)"
        raise KeyError(f"no report for site {name!r}; recorded sites: {known}")
    return _RECORDS[name]


def reset() -> None:
    _RECORDS.clear()


def draw_pruning_map(site_name: str, head: int = 0, batch: int = 0, path: str = "pruning_map.png") -> str:
    """Writes the pruning map (computed vs skipped tiles) of one site, batch element and head as a PNG."""
    from acp_compile.pruning_map import causal_tile_mask, write_pruning_map_png
    rec = site(site_name)
    B, H = rec.kept_tiles.shape[:2]
    if not (0 <= batch < B and 0 <= head < H):
        raise IndexError(f"site {site_name!r} has batch size {B} and {H} heads; got batch={batch}, head={head}")
    causal = causal_tile_mask(rec.seq_q, rec.seq_k, rec.block_m, rec.block_n)
    write_pruning_map_png(rec.kept_tiles[batch, head], path, causal_tiles=causal)
    return path


def record(q: Tensor, k: Tensor, c: Tensor, site_name: str, sm_scale: Optional[float], log_eps: Optional[float],
           keep_from: Optional[Tensor] = None, anchor: Optional[Tensor] = None, anchor_path: str = "") -> None:
    """Stores the kept tiles of one call under the site's name (syncs with the device): those the forward
    recorded (keep_from, either certificate), or the paper rule's plan when keep_from is None. The name
    is the path of the module that runs the site when `anchor` (one of its parameters) can be found,
    else `site_name`."""
    site_name = module_names.site_name_at_run_time(site_name, anchor, anchor_path)
    with torch.no_grad():
        if keep_from is not None:
            bm, bn = dispatch.forward_tile_sizes(q, k, k, c)
            plan = recorded_plan(keep_from, k.shape[2], bm, bn)
        else:
            plan = dispatch.forward_plan(q, k, c, sm_scale, log_eps)
        bm, bn = plan.block_m, plan.block_n
        skipped = skipped_fraction(plan).cpu()
        kept = kept_tiles(plan).cpu()
    prev = _RECORDS.get(site_name)
    _RECORDS[site_name] = SiteRecord(site_name, (prev.calls if prev else 0) + 1, skipped, kept, bm, bn,
                                     q.shape[2], k.shape[2])


report_op.set_recorder(record)
