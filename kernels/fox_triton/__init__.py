"""Triton kernels for FoX attention with ACP: the device plan, the forward and the backward.

  support.py   what the kernels cover, and the CPU interpreter switch (ACP_TRITON_ON_CPU=1 + TRITON_INTERPRET=1)
  common.py    shared constants (LOG2E, LN2) and jit helpers (load_rows, store_rows); the kernels' naming dialect
  configs.py   launch configurations (a measured table keyed by GPU generation, head dim and dtype)
  plan.py      compute_plan(...) -> (start, end) on the device, same semantics as kernels/plan.py
  forward.py   forward(...) -> (o, lse)
  backward.py  backward(...) -> (dq, dk, dv, dc)
Modules are imported lazily by kernels/dispatch.py, so importing acp_compile does not import triton.
"""
