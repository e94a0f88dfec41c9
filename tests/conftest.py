"""Shared test set-up: hypothesis profiles, input builders and the output-poisoning fixture.

Hypothesis profiles: "ci" (derandomized, so CI runs are repeatable) is loaded when the environment
variable CI is set; "dev" (fresh random examples each run) otherwise. Tests set their own bounded
max_examples; both profiles disable the per-example deadline (first calls compile or warm up).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fox_inputs(
    B=1, Hq=2, Hkv=None, Tq=None, Tk=64, D=16, *, dtype=torch.float32, strength=0.0, qk_scale=1.0,
    gate="monotone", seed=0, device="cpu",
):
    """Random q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D) and c (B, Hq, Tk) fp32.

    gate "monotone": c = cumsum(log f), log f = -strength * U(0.5, 1.5) per token (c never increases);
    gate "walk": c is a random walk with steps N(-strength/2, strength^2): it drifts down but is
                 not monotone (about a third of the steps go up);
    gate "mixed": like "monotone" but the second half of the heads get a 1e-6 (global) decay.
    q and k are standard normal times qk_scale (q/k scale controls the bound U).
    """
    Hkv = Hq if Hkv is None else Hkv
    Tq = Tk if Tq is None else Tq
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Tq, D, generator=g) * qk_scale).to(dtype)
    k = (torch.randn(B, Hkv, Tk, D, generator=g) * qk_scale).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    if gate == "walk":
        steps = (torch.randn(B, Hq, Tk, generator=g) - 0.5) * strength
    else:
        steps = -strength * (0.5 + torch.rand(B, Hq, Tk, generator=g))
        if gate == "mixed":
            steps[:, Hq // 2:] = -1e-6
    c = torch.cumsum(steps, dim=-1).float()
    return tuple(t.to(device) for t in (q, k, v, c))


def default_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)


@pytest.fixture
def poison():
    """Every torch.empty / empty_like in the test is NaN-filled, so an unwritten output shows."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        probe = torch.empty(4)
        assert torch.isnan(probe).all(), "poisoning is not active: fill_uninitialized_memory had no effect"
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)
