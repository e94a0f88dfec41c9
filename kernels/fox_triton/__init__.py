"""Triton kernels for FoX attention with ACP (plan, forward, backward)."""
