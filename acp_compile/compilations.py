"""What the pass did, for users and tests: one record per graph compiled under backend "acp".

    import acp_compile
    model = torch.compile(model, backend="acp")
    model(x)
    for rec in acp_compile.compilations():          # most recent last, at most MAX_RECORDS kept
        print(rec.sites, [str(m) for m in rec.near_misses], rec.pass_seconds)
    acp_compile.clear_compilations()

`torch._dynamo.utils.counters["acp"]` ("fox_attention", "near_miss") stays for tools that read
Dynamo's counters; this module is the public way.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch.fx as fx

MAX_RECORDS = 256


@dataclass(frozen=True)
class Compilation:
    sites: tuple             # names of the rewritten attention sites ("layers.3.attn"), in graph order
    near_misses: tuple       # NearMiss records: .anchor, .node, .reason (attention-like, left alone)
    guards: int              # run-time guards the compiled code checks before each call
    pass_seconds: float      # time the pass took on this graph
    graph: fx.GraphModule    # the rewritten graph (before the inner backend compiled it)
    fell_back: str | None = None   # why the original graph was compiled instead, when it was


_RECORDS: deque = deque(maxlen=MAX_RECORDS)


def compilations() -> list[Compilation]:
    """Records of the graphs compiled since the last clear_compilations(), oldest first."""
    return list(_RECORDS)


def clear_compilations() -> None:
    _RECORDS.clear()


def add(record: Compilation) -> None:
    _RECORDS.append(record)
