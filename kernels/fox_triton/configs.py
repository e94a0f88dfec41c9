"""Launch configurations of the Triton forward kernel: a table, not autotuning.

The ACP plan depends on the tile size (start/end are block indices), so the block sizes must be
known before the plan is computed; a table keyed by (GPU generation, padded head dim, element size)
gives them without a timing run, and keeps CUDA graphs and torch.compile free of autotune launches.

Sources: the Hopper rows were measured on an H200 (torch 2.11, triton 3.6) by
examples/benchmarks/gpu_round.sh's config sweep on workload W1 shapes (see the results under
examples/results/); the Ampere rows are conservative choices that fit its 164 KiB of shared memory
(not measured here: no Ampere GPU was available). The interpreter rows are small so that CPU tests
with T around 100 cross several tiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (padded head dim upper bound, element bytes) -> config; the first row whose bound >= D_PAD wins.
HOPPER_FWD = (
    (32, 2, FwdConfig(128, 64, 4, 3)),
    (64, 2, FwdConfig(128, 64, 4, 3)),
    (128, 2, FwdConfig(128, 64, 8, 3)),
    (256, 2, FwdConfig(64, 64, 4, 2)),
    (64, 4, FwdConfig(64, 64, 4, 2)),
    (128, 4, FwdConfig(64, 32, 4, 2)),
    (256, 4, FwdConfig(32, 32, 4, 1)),
)
AMPERE_FWD = (
    (64, 2, FwdConfig(128, 64, 4, 3)),
    (128, 2, FwdConfig(128, 32, 4, 3)),
    (256, 2, FwdConfig(64, 32, 4, 2)),
    (64, 4, FwdConfig(64, 32, 4, 2)),
    (128, 4, FwdConfig(32, 32, 4, 2)),
    (256, 4, FwdConfig(32, 16, 4, 1)),
)
INTERPRETER_FWD = FwdConfig(32, 16, 4, 1)


def padded_head_dim(d: int) -> int:
    """Power of two >= max(d, 16): tl.arange and tl.dot need it; masks cover the padding."""
    p = 16
    while p < d:
        p *= 2
    return p


def forward_config(q: torch.Tensor) -> FwdConfig:
    if q.device.type != "cuda":
        return INTERPRETER_FWD
    major, _ = torch.cuda.get_device_capability(q.device)
    table = HOPPER_FWD if major >= 9 else AMPERE_FWD
    d_pad, size = padded_head_dim(q.shape[-1]), q.element_size()
    for bound, elem, cfg in table:
        if elem == size and d_pad <= bound:
            return cfg
    raise ValueError(f"no forward config for head dim {q.shape[-1]} and {q.dtype}; supported head dims are <= 256")
