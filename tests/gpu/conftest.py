"""GPU test suite (run on the H200; skipped without CUDA, so CI on CPU skips every test here).

Every test in this folder is marked `gpu` and skipped when torch.cuda.is_available() is False.
W1-like gated inputs come from tests/helpers.py (fox_inputs(..., **W1_ON_CUDA)) and the fp64 reference on
sampled query rows from tests/sampled_reference.py (both outside the installed package; the benchmarks
that use them put tests/ on sys.path).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
