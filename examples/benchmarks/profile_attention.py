"""Per-kernel GPU time of one W1 forward + backward (torch.profiler), to see where a regression sits.

  python examples/benchmarks/profile_attention.py --T 16384 --variant ours_acp30
  PYTHONPATH=<old tree shim> python profile_attention.py --bench-dir <old tree>/examples/benchmarks

Imports bench_attention from --bench-dir (default: this folder), so an older tree's variants can be
profiled with the same workload. Prints one JSON line per kernel: name, calls per step, us per step.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--variant", default="ours_acp30")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tag", default="")
    ap.add_argument("--bench-dir", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--no-recorded", action="store_true",
                    help="the backward ignores the forward's recorded set (each kernel's own paper plan)")
    args = ap.parse_args()
    sys.path.insert(0, args.bench_dir)
    import bench_attention as ba
    if args.no_recorded:
        from acp_compile.kernels.fox_triton import backward as bw
        inner = bw._backward
        bw._backward = lambda *a, keep_from=None, **kw: inner(*a, keep_from=None, **kw) if len(a) < 13 else inner(*a[:12])

    q, k, v, c = ba.w1_inputs(args.T)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, c)]
    run = ba.variants(args.T, False)[args.variant](*leaves)         # make(q, k, v, c) -> run()
    do = torch.randn_like(q)

    def step():
        run().backward(do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    acc = defaultdict(lambda: [0, 0.0])
    per_launch = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name][0] += 1
            acc[e.name][1] += e.device_time
            if e.name.startswith(("fox_", "_fox")):
                per_launch[e.name].append(round(e.device_time, 1))
    for name, times in per_launch.items():         # launches of one step, in order (one-FMA, exact, ...)
        n = len(times) // args.steps
        print(json.dumps({"tag": args.tag, "kernel": name, "first_step_launches_us": times[:n]}))
    for fn in _jit_functions():
        print(json.dumps({"tag": args.tag, **fn}))
    total = sum(t for _, t in acc.values()) / args.steps
    for name, (n, t) in sorted(acc.items(), key=lambda kv: -kv[1][1]):
        print(json.dumps({"tag": args.tag, "kernel": name[:90], "calls": n / args.steps,
                          "us": round(t / args.steps, 1)}))
    print(json.dumps({"tag": args.tag, "kernel": "TOTAL", "us": round(total, 1)}))


def _jit_functions():
    """n_regs / n_spills of every compiled variant of our kernels (Triton's per-device caches)."""
    out = []
    try:
        from acp_compile.kernels.fox_triton import backward_dkdv, backward_dq, forward
        for jf in (backward_dkdv.fox_bwd_dkdv_kernel, backward_dq.fox_bwd_dq_kernel, forward._fox_fwd_kernel):
            for cache in getattr(jf, "device_caches", {}).values():
                for key, kern in cache[0].items():
                    out.append({"kernel": jf.__name__, "n_regs": getattr(kern, "n_regs", None),
                                "n_spills": getattr(kern, "n_spills", None), "key": str(key)[-160:]})
    except Exception as e:  # noqa: BLE001  (diagnostics only)
        out.append({"error": repr(e)})
    return out


if __name__ == "__main__":
    main()
