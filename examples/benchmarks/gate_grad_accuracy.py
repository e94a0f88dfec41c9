"""Accuracy of d log_fgate (and dq, dk, dv) in bf16/fp16 against an fp64 autograd reference, for our op,
eager autograd in the same dtype, and (optionally) the FoX authors' Triton kernel.

  python examples/benchmarks/gate_grad_accuracy.py --T 1024 4096 --gates uniform2 w1 --dtype bf16
  (on a GPU add --authors PATH_TO_forgetting_attention.py to compare with the authors' kernel)

Inputs: q, k, v standard normal (B, H, T, D) in the dtype; log f fp32 (B, H, T) from one of
  uniform2  log f ~ U(-2, 0)
  w1        W1's gates: 3/4 of the heads -(30/1024) * U(0.5, 1.5), 1/4 global -1e-6 * U(0.5, 1.5)
Reference: fp64 autograd of the eager formula on the same (rounded) inputs, with the same do.
Eager: q k^T in the dtype, + (c_i - c_j) in fp32, causal mask, softmax in fp32, cast to the dtype, @ v
(the FoX model's spelling, examples/fox_model.py). Error: ||x - ref|| / ||ref|| over all entries, or over
the sampled query rows for the long T (--rows: dq only on those rows; d log f, dk, dv whole).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys

import torch


def make_inputs(B, H, T, D, gates, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype).to(device) for _ in range(3))
    if gates == "uniform2":
        log_f = -2.0 * torch.rand(B, H, T, generator=g)
    elif gates == "w1":
        rate = torch.full((H,), 30.0 / 1024)
        rate[H - max(1, H // 4):] = 1e-6
        log_f = -rate[None, :, None] * (0.5 + torch.rand(B, H, T, generator=g))
    else:
        raise ValueError(gates)
    do = torch.randn(B, H, T, D, generator=g).to(dtype).to(device)
    return q, k, v, log_f.float().to(device), do


def eager(q, k, v, log_f, sm_scale):
    """The FoX eager formula in q's dtype, softmax in fp32 (fp64 when q is fp64)."""
    T = q.shape[2]
    c = torch.cumsum(log_f, dim=-1)
    s = (q @ k.transpose(-1, -2)) * sm_scale
    s = s.to(c.dtype) + (c[..., :, None] - c[..., None, :])
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    return torch.softmax(s, dim=-1).to(v.dtype) @ v


def grads(fn, q, k, v, log_f, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, log_f)]
    o = fn(*leaves)
    o.backward(do.to(o.dtype))
    return [t.grad.double() for t in leaves]


def rel(x, ref):
    return (x.double() - ref).norm().item() / max(ref.norm().item(), 1e-300)


def chunked_reference(q, k, v, log_f, do, sm_scale):
    """fp64 autograd of the eager formula; on CUDA in fp64 as one graph (fine up to ~16k at B*H small)."""
    return grads(lambda *a: eager(*a, sm_scale), q.double(), k.double(), v.double(), log_f.double(), do.double())


def load_authors(path):
    spec = importlib.util.spec_from_file_location("fox_authors_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.forgetting_attention


def run(Ts, gates_list, dtype, device, B, H, D, authors_path=None, log_eps=-10.0):
    import acp_compile
    sm_scale = 1.0 / math.sqrt(D)
    authors = load_authors(authors_path) if authors_path else None
    rows = []
    for gates in gates_list:
        for T in Ts:
            q, k, v, log_f, do = make_inputs(B, H, T, D, gates, dtype, device)
            ref = chunked_reference(q, k, v, log_f, do, sm_scale)
            impls = {
                "ours": lambda q_, k_, v_, lf: acp_compile.fox_attention(q_, k_, v_, lf, log_eps=log_eps),
                "eager": lambda q_, k_, v_, lf: eager(q_, k_, v_, lf, sm_scale),
            }
            if authors is not None:
                impls["authors"] = lambda q_, k_, v_, lf: authors(q_, k_, v_, lf, head_first=True, sm_scale=sm_scale)
            for name, fn in impls.items():
                got = grads(fn, q, k, v, log_f, do)
                row = {"gates": gates, "T": T, "impl": name, "dtype": str(dtype).replace("torch.", "")}
                for key, x, r in zip(("dq", "dk", "dv", "dlogf"), got, ref):
                    row[key] = rel(x, r)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del ref
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[1024])
    ap.add_argument("--gates", nargs="+", default=["uniform2"])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--authors", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(a.T, a.gates, dtype, device, a.B, a.H, a.D, a.authors)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
