"""Options of the acp backend, the decorator and the op, parsed once into a frozen config."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from acp_compile.checks import check_certificate, normalize_log_eps


INNER_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class ACPConfig:
    log_eps: float | None = -10.0   # natural log of the per-row pruned-mass tolerance; None: dense
    prune: bool = True              # False: the op runs dense (same kernels, no tile skipped)
    strict: bool = False            # True: a near-miss (attention not proven FoX) raises instead of falling back
    report: bool = False            # True: record the skipped-tile fraction per site and call (costs a sync)
    inner_backend: str = "inductor"  # what compiles the rewritten graph: "inductor" | "aot_eager" | "eager"
    certificate: str = "online"     # which tiles may be skipped: "online" (DESIGN.md 1.1) | "paper" (2U rule)

    def __post_init__(self) -> None:
        # The op's own parser: -inf becomes None (dense), the one spelling of "dense" below.
        object.__setattr__(self, "log_eps", normalize_log_eps(self.log_eps, who="acp option log_eps"))
        if self.inner_backend not in INNER_BACKENDS:
            raise ValueError(
                f"acp option inner_backend must be one of {INNER_BACKENDS}, got {self.inner_backend!r}"
            )
        check_certificate(self.certificate, who="acp option certificate")
        for name in ("prune", "strict", "report"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"acp option {name} must be True or False, got {getattr(self, name)!r}")

    @property
    def op_log_eps(self) -> float | None:
        """The log_eps the op receives: None (dense) when pruning is off or log_eps is None."""
        return self.log_eps if self.prune else None

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **overrides: Any) -> "ACPConfig":
        merged = dict(options or {})
        merged.update(overrides)
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(merged) - set(valid))
        if unknown:
            raise ValueError(f"unknown acp option(s) {unknown}; valid options are {valid}")
        return cls(**merged)
