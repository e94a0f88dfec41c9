"""Host (CPU) time per call of the op on a small problem, where the GPU work is shorter than the
launches: what decode steps, small batches and many-layer models pay per attention call.

  python examples/benchmarks/bench_host_overhead.py [--profile]

For dense, online (default) and paper ACP, forward alone and forward + backward: the median host time of
one call (time.perf_counter around the call, GPU synchronised before each repetition) and, with
--profile, the 30 functions with the most cumulative and own time under cProfile for the online forward +
backward, and torch.profiler's table of ops and kernels per mode. JSON lines on stdout.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import acp_compile  # noqa: E402
from helpers import W1_ON_CUDA, fox_inputs  # noqa: E402

MODES = {"dense": dict(log_eps=None), "online": dict(), "paper": dict(certificate="paper")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    q, k, v, c = fox_inputs(1, 4, 4, args.T, args.T, 64, dtype=torch.bfloat16, **W1_ON_CUDA)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros_like(c[..., :1]))
    leaves = [t.detach().requires_grad_() for t in (q, k, v, log_f)]
    do = torch.randn_like(q)
    for name, kw in MODES.items():
        for grad in (False, True):
            def call():
                if grad:
                    acp_compile.fox_attention(*leaves, **kw).backward(do)
                else:
                    with torch.no_grad():
                        acp_compile.fox_attention(*leaves, **kw)
            for _ in range(3):
                call()
            times = []
            for _ in range(args.reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            print(json.dumps({"mode": name, "backward": grad, "T": args.T,
                              "host_ms": round(1e3 * statistics.median(times), 3)}), flush=True)
    if args.profile:
        kw = MODES["online"]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            acp_compile.fox_attention(*leaves, **kw).backward(do)
        prof.disable()
        torch.cuda.synchronize()
        for order in ("cumulative", "tottime"):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(order).print_stats(30)
            print(out.getvalue())
        # what each call launches: kernels and CPU-side aten ops, counted with torch.profiler
        from torch.profiler import ProfilerActivity, profile
        for name, kw in MODES.items():
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    acp_compile.fox_attention(*leaves, **kw).backward(do)
                torch.cuda.synchronize()
            print(f"== {name}: per forward + backward (5 calls)")
            print(p.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60))


if __name__ == "__main__":
    main()
