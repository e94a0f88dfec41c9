"""Kernels for FoX attention with Adaptive Computation Pruning (ACP).

Tree:
  reference.py   fp64 dense attention: the truth every fast path is compared to (never imports a kernel)
  plan.py        the ACP plan in torch: bound U, threshold delta, per-block start/end indices (no host sync)
  blocked.py     blocked PyTorch forward/backward that visits only kept tiles (CPU path, CUDA fallback)
  fox_triton/    Triton kernels: plan, forward, backward, launch/tuning
  dispatch.py    picks Triton or the blocked path for a call
"""
