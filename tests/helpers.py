"""Test helpers, imported as `from helpers import ...` (pytest puts tests/ on sys.path: tests/ is not a
package, and tests/gpu and tests/triton_interpret are packages whose base folder is tests/).

`fox_inputs` is the one generator of gated FoX inputs for the tests (and the GPU benchmarks that put
tests/ on sys.path); every option keeps a former copy's draws, so a test's seed gives the tensors it
always had. `default_scale` is 1/sqrt(D); `requires_cuda` skips a test without a CUDA GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

W1_DECAY = 30.0 / 1024          # W1's local heads: about 30 nats over 1024 tokens
W1_ON_CUDA = dict(gate="w1", device="cuda", draw_on="device")      # the GPU tests' inputs: fox_inputs(..., **W1_ON_CUDA)


def default_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)


def fox_inputs(
    B=1, Hq=2, Hkv=None, Tq=None, Tk=64, D=16, *, dtype=torch.float32, strength=None, qk_scale=1.0,
    gate="monotone", seed=0, device="cpu", n_global=None, layout="bhtd", draw_on="cpu", log_f=False,
    gate_dtype=torch.float32, gate_seed=None, grad=None, Dv=None,
):
    """Random q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv) standard normal and c (B, Hq, Tk) =
    cumsum(log f); Dv defaults to D (and do is (B, Hq, Tq, Dv)).

    q and k are scaled by qk_scale (the q/k scale controls the bound U). The per-token log gates log f:
      "monotone"  -strength * U(0.5, 1.5) (c never increases);
      "walk"      N(-strength/2, strength^2): c drifts down but about a third of the steps go up;
      "mixed"     like "monotone" but the second half of the heads get a 1e-6 (global) decay;
      "uniform"   -strength * U(0, 1);
      "bump"      "uniform", then c rises by 0.8 strength Tk over [2 Tk/3, Tk - 8): any c_i - c_j bias;
      "w1"        W1's gates: heads [0, Hq - n_global) decay by -strength * U(0.5, 1.5) (default
                  strength W1_DECAY), the last n_global (default Hq // 4) by -1e-6 * U(0.5, 1.5);
      "logit"     N(strength, 1): forget-gate logits (the model applies logsigmoid), for log_f=True.
    strength defaults to 0 (W1_DECAY for "w1").

    Options:
      device      where the tensors are returned;
      draw_on     "cpu": drawn by a CPU generator in fp32, then cast to dtype and moved to device;
                  "device": drawn by a generator on device, q, k, v directly in dtype (the GPU tests' way);
      layout      "bthd": q, k, v (and do) are transposed views of (B, T, H, D) memory;
      log_f       return the per-token log gates (B, Hq, Tk) instead of their cumsum c;
      gate_dtype  dtype of the drawn gates (c keeps it);
      gate_seed   draw the gates from their own generator with this seed instead of after q, k, v;
      grad        also return do (B, Hq, Tq, D) in dtype, drawn "after_gate" or "before_gate".
    Returns (q, k, v, c), or (q, k, v, c, do) with grad.
    """
    Hkv = Hq if Hkv is None else Hkv
    Tq = Tk if Tq is None else Tq
    if strength is None:
        strength = W1_DECAY if gate == "w1" else 0.0
    on = torch.device(device) if draw_on == "device" else torch.device("cpu")
    g = torch.Generator(device=on).manual_seed(seed)
    gg = g if gate_seed is None else torch.Generator(device=on).manual_seed(gate_seed)

    def normal(H, T, scale=None, last=D):
        shape = (B, H, T, last) if layout == "bhtd" else (B, T, H, last)
        if draw_on == "device":
            x = torch.randn(shape, device=on, generator=g, dtype=dtype)
            x = x if scale is None else x * scale
        else:
            x = torch.randn(shape, generator=g)
            x = (x if scale is None else x * scale).to(dtype)
        return x if layout == "bhtd" else x.transpose(1, 2)

    def rand():
        return torch.rand(B, Hq, Tk, device=on, generator=gg, dtype=gate_dtype)

    q = normal(Hq, Tq, qk_scale)
    k = normal(Hkv, Tk, qk_scale)
    Dv = D if Dv is None else Dv
    v = normal(Hkv, Tk, last=Dv)
    do = normal(Hq, Tq, last=Dv) if grad == "before_gate" else None
    if gate == "walk":
        steps = (torch.randn(B, Hq, Tk, device=on, generator=gg, dtype=gate_dtype) - 0.5) * strength
    elif gate == "logit":
        steps = torch.randn(B, Hq, Tk, device=on, generator=gg, dtype=gate_dtype) + strength
    elif gate in ("uniform", "bump"):
        steps = -strength * rand()
    elif gate == "w1":
        n_global = Hq // 4 if n_global is None else n_global
        u = 0.5 + rand()
        rate = torch.full((Hq,), strength, device=on)
        rate[Hq - n_global:] = 1e-6
        steps = -rate[None, :, None] * u
    elif gate in ("monotone", "mixed"):
        steps = -strength * (0.5 + rand())
        if gate == "mixed":
            steps[:, Hq // 2:] = -1e-6
    else:
        raise ValueError(f"unknown gate {gate!r}")
    c = steps if log_f else torch.cumsum(steps, dim=-1)
    if gate == "bump" and not log_f:
        c[..., 2 * Tk // 3: Tk - 8] += 0.8 * strength * Tk
    if grad == "after_gate":
        do = normal(Hq, Tq, last=Dv)
    out = (q, k, v, c) if grad is None else (q, k, v, c, do)
    return tuple(t.to(device) for t in out)
