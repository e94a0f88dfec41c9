"""Options of the acp backend, the decorator and the op, parsed once into a frozen config."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping


INNER_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class ACPConfig:
    log_eps: float | None = -10.0   # natural log of the per-row pruned-mass tolerance; None: dense
    prune: bool = True              # False: the op runs dense (same kernels, no tile skipped)
    strict: bool = False            # True: a near-miss (attention not proven FoX) raises instead of falling back
    report: bool = False            # True: record the skipped-tile fraction per site and call (costs a sync)
    inner_backend: str = "inductor"  # what compiles the rewritten graph: "inductor" | "aot_eager" | "eager"

    def __post_init__(self) -> None:
        if self.log_eps is not None:
            if not isinstance(self.log_eps, (int, float)) or isinstance(self.log_eps, bool):
                raise TypeError(f"acp option log_eps must be a float or None, got {self.log_eps!r}")
            if math.isnan(self.log_eps) or self.log_eps > 0:
                raise ValueError(
                    f"acp option log_eps must be <= 0 (it is log(eps), eps <= 1) or -inf/None for no pruning; "
                    f"got {self.log_eps!r}"
                )
            object.__setattr__(self, "log_eps", float(self.log_eps))
        if self.inner_backend not in INNER_BACKENDS:
            raise ValueError(
                f"acp option inner_backend must be one of {INNER_BACKENDS}, got {self.inner_backend!r}"
            )
        for name in ("prune", "strict", "report"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"acp option {name} must be True or False, got {getattr(self, name)!r}")

    @property
    def effective_log_eps(self) -> float | None:
        """What the op receives: None when pruning is switched off."""
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
