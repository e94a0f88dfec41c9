"""Workload W2 (DESIGN.md section 5): training throughput of the FoX model under torch.compile.

The 125M FoX Pro model of examples/fox_model.py (d_model 768, 12 layers, 12 heads of dim 64,
vocabulary 50304, the paper's forget-gate initialisation), 32768 tokens per step (B = 32768 / T),
one step = forward, backward and fused AdamW under bf16 autocast. Data: bytes of the Python
standard library's source (examples/corpus.py), the same batches for every run.

Runs (the model code is the same in all three; only the torch.compile call differs):
  acp            torch.compile(model, backend="acp")
  acp-no-prune   torch.compile(model, backend="acp", options={"prune": False})
  inductor       torch.compile(model)   (the eager attention, T x T scores, under inductor)
Per (run, T): tokens/s from the median of `steps` timed steps after `warmup` steps, peak memory
(torch.cuda.max_memory_allocated over all steps), the losses of every step, the attention sites
the pass rewrote, and for acp the fraction of causal tiles skipped (one extra forward compiled with
options={"report": True}, outside the timing). Out-of-memory is caught and recorded.

Each (run, T) runs in its own process (a clean allocator and peak; an OOM cannot poison the next);
the on-disk inductor/Triton caches are shared, so later processes compile faster. Results are
written after every configuration, so a time limit still leaves the finished ones.

    python examples/benchmarks/bench_w2.py --out examples/results                # the W2 run
    python examples/benchmarks/bench_w2.py --device cpu --config tiny --T 64 128 \
        --tokens-per-step 256 --warmup 1 --steps 2 --out /tmp/w2                  # smoke test on CPU
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(EXAMPLES))
from corpus import BatchSampler, load_corpus  # noqa: E402
from fox_model import CONFIGS, FoxLM  # noqa: E402

from acp_compile import step_stats  # noqa: E402

RUN_OPTIONS = {  # run -> (backend, acp options)
    "acp": ("acp", {}),
    "acp-no-prune": ("acp", {"prune": False}),
    "inductor": ("inductor", None),
}
# Priority order: the 16k acp/no-prune pair and the 4k acp/inductor pair first, the expected OOM last.
DEFAULT_ORDER = [(16384, "acp"), (16384, "acp-no-prune"), (4096, "acp"), (4096, "inductor"),
                 (4096, "acp-no-prune"), (8192, "acp"), (8192, "acp-no-prune"), (8192, "inductor"),
                 (16384, "inductor")]


def compile_model(model, run: str, report: bool = False):
    """report=True: a forward-only copy that records the plan per site; the rest of its graph runs
    under aot_eager (compiles in seconds; it is never timed)."""
    backend, options = RUN_OPTIONS[run]
    if backend == "inductor":
        return torch.compile(model)
    options = dict(options, report=True, inner_backend="aot_eager") if report else dict(options)
    try:
        return torch.compile(model, backend="acp", options=options)
    except Exception:  # the package is on PYTHONPATH without its entry point: pass the backend itself
        from acp_compile.backend import acp
        return torch.compile(model, backend=acp, options=options)


def acp_counters() -> dict:
    try:
        from acp_compile import _torch_private
        return dict(_torch_private.acp_counters())
    except ImportError:
        return {}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_one(run: str, T: int, a) -> dict:
    """One (run, T) in this process."""
    device = torch.device(a.device)
    B = a.tokens_per_step // T
    cfg = CONFIGS[a.config]() if a.config != "125m" else CONFIGS["125m"](vocab_size=a.vocab)
    out = {"run": run, "seq_len": T, "batch": B, "config": a.config, "status": "ok"}
    torch.manual_seed(a.seed)
    model = FoxLM(cfg).to(device)
    compiled = compile_model(model, run)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    corpus = load_corpus(max_bytes=a.corpus_bytes)
    batches = BatchSampler(corpus.train, B, T, seed=a.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, per_step = [], [], []
    record = a.per_step_stats and run.startswith("acp")     # both acp runs: the exact-mode fractions too
    t_start = time.perf_counter()
    try:
        for step in range(a.warmup + a.steps):
            x, y = batches.next_batch(device)
            sync(device)
            t0 = time.perf_counter()
            with step_stats.recording() if record else contextlib.nullcontext() as rec:
                with autocast:
                    loss = compiled(x, y)           # the loss is computed inside the compiled model
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if record:
                per_step.append(rec.summary())
            if step == 0:
                out["first_step_s"] = round(times[0], 2)          # includes compilation
    except torch.OutOfMemoryError as err:
        out.update(status="out of memory", error=str(err).splitlines()[0][:300])
    out["losses"] = losses
    out["acp_counters"] = acp_counters()
    if device.type == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 1e9, 2)
    if out["status"] == "ok":
        timed = times[a.warmup:]
        out["step_s_median"] = statistics.median(timed)
        out["step_s_all"] = [round(t, 4) for t in times]
        out["tokens_per_s"] = round(a.tokens_per_step / out["step_s_median"])
        out["tokens_per_s_windows"] = step_windows(times, a.tokens_per_step)
    if per_step:
        out["per_step_stats"] = per_step
        if run.startswith("acp") and out["acp_counters"].get("fox_attention", 0) == 0:
            out["status"] = "pass did not fire (no attention rewritten): the number is not an acp measurement"
    if run == "acp" and out["status"] == "ok" and a.report_skips and (not a.report_T or T in a.report_T):
        out["skipped"] = skipped_fractions(model, batches.next_batch(device)[0], autocast)
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    return out


WINDOWS = {"steps 3-8": (3, 8), "steps 40-50": (40, 50)}     # issue 13's targets, 1-based inclusive


def step_windows(times: list[float], tokens_per_step: int) -> dict:
    """tokens/s from the mean step time of each window of WINDOWS that the run covers."""
    out = {}
    for name, (lo, hi) in WINDOWS.items():
        if len(times) >= hi:
            out[name] = round(tokens_per_step / statistics.fmean(times[lo - 1:hi]))
    return out


def skipped_fractions(model, x, autocast) -> dict:
    """Fraction of causal tiles skipped per site and head, from the pass's report (one forward)."""
    from acp_compile import report
    report.reset()
    reporting = compile_model(model, "acp", report=True)
    with torch.no_grad(), autocast:
        reporting(x)
    sites = report.sites()
    per_site = {s.site: [round(v, 4) for v in s.skipped.mean(dim=0).tolist()] for s in sites}
    overall = sum(sum(v) for v in per_site.values()) / max(1, sum(len(v) for v in per_site.values()))
    return {"overall": round(overall, 4), "per_site_head": per_site,
            "tile": [sites[0].block_m, sites[0].block_n] if sites else None}


def environment(device: str) -> dict:
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def markdown_table(results: list[dict]) -> str:
    lines = ["| T (B) | run | tokens/s | peak memory (GB) | skipped tiles | loss after the steps | status |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["seq_len"], r["run"])):
        tps = f"{r['tokens_per_s'] / 1e3:.1f}k" if r.get("tokens_per_s") else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") is not None else "-"
        if r.get("skipped"):
            skipped = f"{100 * r['skipped']['overall']:.0f}%"
        else:   # pruning off computes every tile; an acp row without a report, or a failed run: unknown
            skipped = "0%" if r["run"] != "acp" and r.get("status") == "ok" else "-"
        loss = f"{r['losses'][-1]:.3f}" if r.get("losses") else "-"
        T = f"{r['seq_len'] // 1024}k" if r["seq_len"] >= 1024 else str(r["seq_len"])
        lines.append(f"| {T} ({r['batch']}) | {r['run']} | {tps} | {mem} | {skipped} | {loss} | {r['status']} |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> dict:
    def tps(run, T):
        r = next((r for r in results if r["run"] == run and r["seq_len"] == T and r.get("tokens_per_s")), None)
        return r["tokens_per_s"] if r else None
    out = {}
    for T in sorted({r["seq_len"] for r in results}):
        for other in ("acp-no-prune", "inductor"):
            a, b = tps("acp", T), tps(other, T)
            if a and b:
                out[f"acp/{other} at T={T}"] = round(a / b, 3)
    return out


def write_results(results: list[dict], env: dict, args: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"workload": "W2", "environment": env, "args": args, "ratios": ratios(results), "results": results}
    (out_dir / "w2_results.json").write_text(json.dumps(payload, indent=1, default=str))
    table = markdown_table(results)
    ratio_lines = "\n".join(f"- {k}: {v}x" for k, v in payload["ratios"].items())
    (out_dir / "w2_table.md").write_text(
        f"W2 on {env.get('gpu', 'cpu')}, torch {env['torch']}, triton {env['triton']}, {env['date_utc']}\n\n"
        f"{table}\n\n{ratio_lines}\n")
    try:
        from plots import plot_w2, plot_w2_steps
        plot_w2(results, out_dir / "w2_throughput.png")
        if any(r.get("per_step_stats") for r in results):
            plot_w2_steps(results, out_dir / "w2_per_step.png")
    except ImportError as err:
        print(f"plot skipped ({err})")


def orchestrate(a) -> None:
    order = [(T, run) for T, run in DEFAULT_ORDER if T in a.T and run in a.runs]
    order += [(T, run) for T in a.T for run in a.runs if (T, run) not in order]
    env = environment(a.device)
    print(json.dumps(env))
    results, t0 = [], time.perf_counter()
    for T, run in order:
        elapsed = time.perf_counter() - t0
        if elapsed + a.per_config_estimate_s > a.budget_s:
            results.append({"run": run, "seq_len": T, "batch": a.tokens_per_step // T,
                            "status": f"not run (time budget {a.budget_s:.0f} s)"})
            print(f"skip {run} T={T}: {elapsed:.0f} s used of the {a.budget_s:.0f} s budget", flush=True)
            write_results(results, env, vars(a) | {"passthrough": a.passthrough}, a.out)
            continue
        cmd = [sys.executable, __file__, "--one", run, str(T)] + a.passthrough
        print(f"== {run} T={T} (B={a.tokens_per_step // T}) at {elapsed:.0f} s", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=max(30.0, a.budget_s - elapsed))
            line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
            res = json.loads(line) if line else {
                "run": run, "seq_len": T, "batch": a.tokens_per_step // T,
                "status": f"crashed (exit {proc.returncode})", "error": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            res = {"run": run, "seq_len": T, "batch": a.tokens_per_step // T, "status": "timed out"}
        if res.get("status") != "ok":
            print((res.get("error") or "")[-1500:], flush=True)
        print(json.dumps({k: v for k, v in res.items() if k not in ("error",)}), flush=True)
        results.append(res)
        write_results(results, env, vars(a) | {"passthrough": a.passthrough}, a.out)
    print(markdown_table(results))
    print(json.dumps(ratios(results), indent=1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=2, metavar=("RUN", "T"), help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--runs", nargs="+", choices=list(RUN_OPTIONS), default=list(RUN_OPTIONS))
    p.add_argument("--config", choices=sorted(CONFIGS), default="125m")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    p.add_argument("--no-report-skips", dest="report_skips", action="store_false")
    p.add_argument("--per-step-stats", action="store_true",
                   help="acp runs: record the skipped fraction, the paper's bound U and the backward's exact-mode "
                        "fractions every step (acp_compile.step_stats; a few reductions per attention call, inside "
                        "the timed step)")
    p.add_argument("--report-T", type=int, nargs="*", default=None, help="report skipped tiles only at these T")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting configurations after this")
    p.add_argument("--per-config-estimate-s", type=float, default=45.0)
    p.add_argument("--out", type=Path, default=EXAMPLES / "results")
    a = p.parse_args(argv)
    # Everything a child process needs, forwarded as given.
    a.passthrough = ["--config", a.config, "--vocab", str(a.vocab), "--tokens-per-step", str(a.tokens_per_step),
                     "--warmup", str(a.warmup), "--steps", str(a.steps), "--lr", str(a.lr), "--seed", str(a.seed),
                     "--device", a.device, "--corpus-bytes", str(a.corpus_bytes)]
    if not a.report_skips:
        a.passthrough.append("--no-report-skips")
    if a.per_step_stats:
        a.passthrough.append("--per-step-stats")
    if a.report_T:
        a.passthrough += ["--report-T"] + [str(t) for t in a.report_T]
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.one:
        run, T = a.one[0], int(a.one[1])
        try:
            res = measure_one(run, T, a)
        except Exception as err:  # any failure becomes a recorded result, not a lost run
            res = {"run": run, "seq_len": T, "batch": a.tokens_per_step // T,
                   "status": f"failed: {type(err).__name__}", "error": f"{err}"[-1500:]}
        print(json.dumps(res), flush=True)
        return
    orchestrate(a)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
