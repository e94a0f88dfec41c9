"""How the blocked PyTorch path's time scales with the fraction of tiles ACP prunes, on CPU.

    python examples/benchmarks/cpu_blocked_scaling.py                       # T=4096, B=1, H=4, D=64, fp32
    python examples/benchmarks/cpu_blocked_scaling.py --T 1024 --reps 3     # quick
    python examples/benchmarks/cpu_blocked_scaling.py --markdown out.md     # also write the table

Inputs: q and k with unit-RMS rows (as after QK RMSNorm, so U = sqrt(D)), v normal, and every head
with the same per-token decay rate r (log f = -r * U(0.5, 1.5)); r sweeps from 0 (nothing prunable)
to strong decay (about 90% of the tiles skipped at log_eps = -10). For each r the script times the
op's forward (torch.ops.acp.fox_attention_fwd) and forward+backward (fwd then fox_attention_bwd),
with ACP (log_eps = -10) and with pruning off (log_eps = None): the four are timed in turn, --reps
rounds after one warm-up each, and the median (or --stat min) is reported. Times include the plan.
The "ideal" column is the dense time times (1 - pruned).
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time

import torch

import acp_compile  # noqa: F401  (registers torch.ops.acp)
from acp_compile.kernels import blocked
from acp_compile.kernels.plan import make_plan, skipped_fraction

RATES = [0.0, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.3]


def inputs(B, H, T, D, rate, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=g), dim=-1) * math.sqrt(D)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=g), dim=-1) * math.sqrt(D)
    v = torch.randn(B, H, T, D, generator=g)
    c = torch.cumsum(-rate * (0.5 + torch.rand(B, H, T, generator=g)), dim=-1)
    return q, k, v, c


def interleaved_ms(fns: dict, reps: int, clock, stat):
    """Times every function once per round, `reps` rounds, so that load from other processes hits all
    of them alike; returns {name: statistic of the times in ms}. One warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append((clock() - t0) * 1e3)
    pick = statistics.median if stat == "median" else min
    return {name: pick(ts) for name, ts in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--log-eps", type=float, default=-10.0)
    ap.add_argument("--rates", type=str, default=None, help="comma-separated decay rates per token")
    ap.add_argument("--markdown", type=str, default=None, help="also write the table to this file")
    ap.add_argument("--stat", choices=["median", "min"], default="median", help="statistic over the reps")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (use with --threads 1 on a shared, busy machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else RATES
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    header = (
        f"date {datetime.date.today().isoformat()}, CPU {cpu_name()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, python {platform.python_version()}\n"
        f"B={args.B}, H={args.H}, T={args.T}, D={args.D}, fp32, tiles {blocked.BLOCK_M}x{blocked.BLOCK_N}, "
        f"log_eps={args.log_eps}, {args.stat} of {args.reps} interleaved reps after a warm-up, {args.clock} clock, times in ms"
    )
    rows = [
        "| decay r (nats/token) | pruned tiles | fwd ACP | fwd dense | fwd ideal | fwd speed-up "
        "| fwd+bwd ACP | fwd+bwd dense | fwd+bwd ideal | fwd+bwd speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print(header)
    print("\n".join(rows), flush=True)
    for rate in rates:
        q, k, v, c = inputs(args.B, args.H, args.T, args.D, rate)
        scale = 1 / math.sqrt(args.D)
        pruned = skipped_fraction(make_plan(q, k, c, scale, args.log_eps, None, blocked.BLOCK_M, blocked.BLOCK_N)).mean().item()
        fns = {}
        for name, log_eps in (("acp", args.log_eps), ("dense", None)):
            o, lse, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None)
            do = torch.randn_like(o)

            def fwd(log_eps=log_eps):
                return torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None)

            def fwd_bwd(log_eps=log_eps, do=do):
                o, lse, _, _ = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, None)
                return torch.ops.acp.fox_attention_bwd(do, q, k, v, c, o, lse, None, log_eps, None)

            fns[name, "fwd"], fns[name, "fwd_bwd"] = fwd, fwd_bwd
        t = interleaved_ms(fns, args.reps, clock, args.stat)
        result = {name: (t[name, "fwd"], t[name, "fwd_bwd"]) for name in ("acp", "dense")}
        (fa, fba), (fd, fbd) = result["acp"], result["dense"]
        row = (
            f"| {rate:g} | {pruned:.2f} | {fa:.0f} | {fd:.0f} | {fd * (1 - pruned):.0f} | {fd / fa:.2f}x "
            f"| {fba:.0f} | {fbd:.0f} | {fbd * (1 - pruned):.0f} | {fbd / fba:.2f}x |"
        )
        rows.append(row)
        print(row, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header.replace("\n", "  \n") + "\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
