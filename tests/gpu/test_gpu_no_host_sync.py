"""No host synchronisation anywhere in the op's forward and backward, and the op's own host cost per
call stays small (a call that syncs makes the CPU wait for the GPU, so small problems and decode
become bound by the host, and CUDA graphs cannot capture it).

Each case runs once to compile, then under torch.cuda.set_sync_debug_mode("error"), which raises on
any synchronising call (.item(), a bool of a tensor, a device-to-host copy).
"""
from __future__ import annotations

import pytest
import torch

import acp_compile
from helpers import W1_ON_CUDA, fox_inputs

CASES = {
    "dense": dict(log_eps=None),
    "online": dict(),
    "paper": dict(certificate="paper"),
    "packed": dict(cu_seqlens="two"),
    "padded": dict(key_padding_mask="left"),
}


def _kwargs(name, B, T):
    kw = dict(CASES[name])
    if kw.get("cu_seqlens") == "two":
        kw["cu_seqlens"] = torch.tensor([0, T // 3, T], device="cuda", dtype=torch.int32)
    if kw.get("key_padding_mask") == "left":
        kw["key_padding_mask"] = torch.arange(T, device="cuda")[None, :] >= torch.tensor([[0], [T // 4]], device="cuda")
    return kw


def _call(q, k, v, log_f, kw, do):
    o = acp_compile.fox_attention(q, k, v, log_f, **kw)
    o.backward(do)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward_do_not_sync(name):
    B, T = (1, 1000) if name == "packed" else (2, 1000)
    q, k, v, c = fox_inputs(B, 4, 2, T, T, 64, dtype=torch.bfloat16, **W1_ON_CUDA)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros_like(c[..., :1]))
    leaves = [t.detach().requires_grad_() for t in (q, k, v, log_f)]
    kw = _kwargs(name, B, T)
    do = torch.randn(B, 4, T, 64, device="cuda", dtype=torch.bfloat16)
    _call(*leaves, kw, do)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _call(*leaves, kw, do)
    finally:
        torch.cuda.set_sync_debug_mode(0)

