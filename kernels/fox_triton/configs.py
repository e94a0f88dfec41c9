"""Launch configurations of the Triton forward kernel: a table, not autotuning.

The ACP plan depends on the tile size (start/end are block indices), so the block sizes must be
known before the plan is computed; a table keyed by (GPU generation, padded head dim, element size)
gives them without a timing run, and keeps CUDA graphs and torch.compile free of autotune launches.

Sources: the Hopper D=128 16-bit row was measured on an H200 (torch 2.11, triton 3.6, 2026-11-29) by
examples/benchmarks/gpu_round.sh's config sweep on workload W1 (examples/results/attention_fwd_config_sweep.json:
128x128 tiles with 8 warps and 3 stages beat 128x64 and 64x64 by 10-20%; tensor-descriptor loads and plain
loads were within 4% of each other; launching every head's heaviest block first was 5-15% slower);
a second sweep (10:15 UTC, same file) found newest-first tile order 3-4% faster dense (4.84 vs
5.02 ms at 16k, 0.784 vs 0.816 ms at 2k) and equal with ACP (1.85 ms), while two other ideas lost or
tied and were dropped: rescaling the accumulator only when a row's max grew by more than 2^8 (a branch
per tile: 6% slower dense) and Triton's warp_specialize on the key loop (2% slower alone);
the other Hopper rows are by analogy (not measured); the Ampere rows are conservative choices that
fit its 164 KiB of shared memory (not measured here: no Ampere GPU was available). The interpreter rows are small so that CPU tests
with T around 100 cross several tiles.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False     # tensor-descriptor (TMA) loads/stores where the GPU and the strides allow
    heads_fastest: bool = False   # launch order: grid (B * Hq, Mq) instead of (Mq, Hq, B)
    newest_first: bool = False    # visit key blocks from the diagonal back instead of from start[m]
    cert_chunk: int = 1           # online certificate: key blocks visited between two stop tests


# (padded head dim upper bound, element bytes) -> config; the first row whose bound >= D_PAD wins.
HOPPER_FWD = (
    (32, 2, FwdConfig(128, 64, 4, 3)),        # D <= 32: not measured (GPU-tested)
    (64, 2, FwdConfig(128, 128, 8, 3, False, False, True, cert_chunk=2)),   # D = 64: not swept; D=128's best shape
    # measured: 4.84 ms dense / 1.85 ms ACP at W1 16k; cert_chunk 2 (online fwd+bwd 8.81 ms against 9.02
    # for 1 and 8.90 for 4, fwd 2.59 / 2.85 / 2.50 ms; examples/results/cert_chunk_h200.jsonl)
    (128, 2, FwdConfig(128, 128, 8, 3, True, False, True, cert_chunk=2)),
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


def parse_override(text: str) -> dict[int, FwdConfig]:
    """"128:128,128,8,3,1,0;64:128,64,4,3" -> {padded head dim: config} (16-bit dtypes only);
    fields: block_m, block_n, num_warps, num_stages, then optional 0/1 flags in FwdConfig's order
    (tma, heads_fastest, newest_first)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        d, _, rest = part.partition(":")
        bm, bn, w, st, *flags = (int(x) for x in rest.split(","))
        out[int(d)] = FwdConfig(bm, bn, w, st, *(bool(f) for f in flags))
    return out


def override_string(head_dim: int, cfg: FwdConfig) -> str:
    """The parse_override spelling of one config (inverse of parse_override for one head dim)."""
    fields = list(cfg.__dict__.values())
    return f"{head_dim}:" + ",".join(str(int(f)) for f in fields)


def forward_config(q: torch.Tensor, dv: int | None = None) -> FwdConfig:
    """The table's config for q and a value head dim dv (None: q's head dim), keyed by the larger of the
    two padded head dims (the q tile and the o accumulator must both fit); the environment variable
    ACP_FWD_CONFIG (format of parse_override) overrides it for 16-bit CUDA inputs of the head dims it
    names (a tuning hook for the benchmark)."""
    if q.device.type != "cuda":
        return INTERPRETER_FWD
    d_pad = max(padded_head_dim(q.shape[-1]), padded_head_dim(q.shape[-1] if dv is None else dv))
    override = os.environ.get("ACP_FWD_CONFIG")
    if override and q.element_size() == 2:
        cfg = parse_override(override).get(d_pad)
        if cfg is not None:
            return cfg
    major, _ = torch.cuda.get_device_capability(q.device)
    table = HOPPER_FWD if major >= 9 else AMPERE_FWD
    size = q.element_size()
    for bound, elem, cfg in table:
        if elem == size and d_pad <= bound:
            return cfg
    raise ValueError(f"no forward config for head dims {q.shape[-1]}, {dv} and {q.dtype}; supported head dims are <= 256")


# Above this spread of c (nats) over the rows a program holds fixed (a query block in the forward and
# dq kernels, a key block in the dk/dv kernel), the kernels form c_i - c_j per entry (one more
# subtraction per logit) instead of measuring c from one reference per block, whose rounding grows
# with the spread: at most spread * 2^-24 * log2(e) per logit, 1.4e-6 at 16 nats. W1's local heads
# spread about 4 nats over 128 rows, so they take the one-FMA path; a hard reset or a steep decay
# (-50 per token) takes the exact one. ACP_C_SPAN_LIMIT overrides it (benchmarks: -1 = always exact).
C_SPAN_LIMIT = 16.0


def c_span_limit() -> float:
    value = os.environ.get("ACP_C_SPAN_LIMIT")
    return C_SPAN_LIMIT if value is None else float(value)


def cert_chunk(config: FwdConfig) -> int:
    """Key blocks the certified forward visits between two stop tests: config.cert_chunk, or the
    ACP_CERT_CHUNK environment variable (a positive int; for measurements)."""
    value = os.environ.get("ACP_CERT_CHUNK")
    chunk = config.cert_chunk if value is None else int(value)
    if chunk < 1:
        raise ValueError(f"ACP_CERT_CHUNK must be a positive int, got {value!r}")
    return chunk
