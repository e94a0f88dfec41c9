"""Tests of the Triton kernels on CPU tensors through Triton's interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when a kernel module is first
imported, so these tests need a process started with TRITON_INTERPRET=1 and ACP_TRITON_ON_CPU=1
(the switch that routes the op's CPU calls to the kernels). tests/test_triton_interpreter.py
starts that process, so a plain `pytest` covers them; to run them directly:

    TRITON_INTERPRET=1 ACP_TRITON_ON_CPU=1 python -m pytest tests/triton_interpret

In any other process this folder is not collected, so no other test's kernels become interpreted.
"""
import os

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("ACP_TRITON_ON_CPU") != "1":
    collect_ignore_glob = ["test_*.py"]
