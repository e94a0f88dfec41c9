"""Chooses the implementation for one call of the FoX attention op.

Triton kernels on CUDA tensors the kernels cover (and on CPU tensors when the interpreter switch
ACP_TRITON_ON_CPU=1 is set together with TRITON_INTERPRET=1); the blocked PyTorch path otherwise.
"""
from __future__ import annotations

from torch import Tensor

from acp_compile.kernels import blocked
from acp_compile.kernels.plan import default_scale, make_plan



def _scale(q: Tensor, sm_scale: float | None) -> float:
    return default_scale(q.shape[-1]) if sm_scale is None else sm_scale


def blocked_plan(q, k, c, sm_scale, log_eps, u_bound):
    return make_plan(q, k, c, sm_scale, log_eps, u_bound, blocked.BLOCK_M, blocked.BLOCK_N)


def forward(q, k, v, c, sm_scale, log_eps, u_bound):
    scale = _scale(q, sm_scale)
    plan = blocked_plan(q, k, c, scale, log_eps, u_bound)
    return blocked.forward(q, k, v, c, scale, plan)


def backward(do, q, k, v, c, o, lse, sm_scale, log_eps, u_bound):
    scale = _scale(q, sm_scale)
    plan = blocked_plan(q, k, c, scale, log_eps, u_bound)
    return blocked.backward(do, q, k, v, c, o, lse, scale, plan)
