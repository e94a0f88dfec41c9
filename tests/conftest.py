"""Shared test set-up: hypothesis profiles and the output-poisoning fixture (helpers are in helpers.py).

Hypothesis profiles: "ci" (derandomized, so CI runs are repeatable) is loaded when the environment
variable CI is set; "dev" (fresh random examples each run) otherwise. Tests set their own bounded
max_examples; both profiles disable the per-example deadline (first calls compile or warm up).
"""
from __future__ import annotations

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

# Under pytest-xdist (the README's `-n 2`) each worker is one process per core: one intra-op thread each,
# so two workers do not oversubscribe the CPU.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


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
