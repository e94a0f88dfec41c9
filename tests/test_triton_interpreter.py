"""Runs tests/triton_interpret (the Triton plan, forward and backward kernels on CPU tensors) in a
child pytest started with TRITON_INTERPRET=1 and ACP_TRITON_ON_CPU=1; see its conftest.py for why."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

FOLDER = pathlib.Path(__file__).parent / "triton_interpret"


def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", ACP_TRITON_ON_CPU="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(FOLDER), "-q", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, "interpreted Triton kernel tests failed:\n" + proc.stdout[-12000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary, f"the interpreted run collected no test: {summary}"
