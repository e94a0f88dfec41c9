"""Generation benchmark (issue 14 item 4): the example FoX model generates N tokens (greedy, batch B) with
acp_compile's paged KV cache, and records the step time and the cache's memory against the context length:

  evict     FoxKVCache, log_eps = -10, certified eviction on; its pool holds --evict-pool-fraction of the
            pages the others reserve (freed pages are reused; an overflow is detected and reported)
  no_evict  the same cache and decode (ACP skips key blocks), nothing evicted
  dense     the same cache with log_eps = None: every key read (the general op dense)

Each step is compiled once (static shapes; --compile inductor: mode="reduce-overhead", CUDA graphs). The whole
run keeps to --budget-s seconds (compiles included): each variant gets an equal share of what is left and
stops early when it runs out, saying so in the JSON. Output under --out: generate.json (date, GPU, versions,
settings, per variant the points (context, ms per step, cache bytes in use, CUDA bytes allocated)) and
generate.png (matplotlib, when installed).

  python examples/benchmarks/bench_generate.py --out $OUT                  # H200: 100k tokens, ~200 s
  python examples/benchmarks/bench_generate.py --smoke --out /tmp/gen      # CPU: tiny model, a few seconds
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(EXAMPLES))
import fox_model  # noqa: E402
from fox_cached import CachedFoxLM  # noqa: E402

VARIANTS = {"evict": dict(evict=True, log_eps=-10.0), "no_evict": dict(evict=False, log_eps=-10.0),
            "dense": dict(evict=False, log_eps=None)}


def model_config(name: str):
    if name == "small-paper-gates":       # 4 layers, 4 heads of 32; the paper's gate init: ~30 nats per 1024 tokens
        return fox_model.small_config(local_fgate_bias=fox_model.LOCAL_FGATE_BIAS)
    return fox_model.CONFIGS[name]()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def versions(device) -> dict:
    import triton
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}


def run_variant(name, model, a, device, deadline: float) -> dict:
    spec = VARIANTS[name]
    n_max = a.prompt + a.tokens + 1
    pool = None
    if spec["evict"] and device.type == "cuda" and a.evict_pool_fraction < 1:
        full = a.batch * model.cfg.n_heads * -(-n_max // a.page_size)
        pool = max(1, int(full * a.evict_pool_fraction))
    dec = CachedFoxLM(model, batch=a.batch, max_length=n_max, evict=spec["evict"], log_eps=spec["log_eps"],
                      page_size=a.page_size, pool_pages=pool, sync_checks=False)
    out = {"variant": name, **spec, "pool_pages_per_layer": dec.caches[0].n_pages}
    t0 = time.perf_counter()
    step = dec if a.compile == "none" else torch.compile(
        dec, fullgraph=True, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)
    prompt = torch.randint(0, model.cfg.vocab_size, (a.batch, a.prompt), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    with torch.no_grad():
        logits = dec.prefill(prompt)
        token = logits[:, -1:].argmax(-1)
        for _ in range(3):                                   # compile, record the CUDA graph
            logits = step(token)
            token = logits[:, -1:].argmax(-1)
        sync(device)
        out["compile_and_warmup_s"] = time.perf_counter() - t0
        points, done, reason = [], 3, "all tokens generated"
        while done < a.tokens:
            if time.perf_counter() > deadline:
                reason = "time budget"
                break
            n = min(a.record_every, a.tokens - done)
            sync(device)
            t = time.perf_counter()
            for _ in range(n):
                logits = step(token)
                token = logits[:, -1:].argmax(-1)
            sync(device)
            dt = time.perf_counter() - t
            done += n
            mem = dec.memory()
            points.append({"context": a.prompt + done, "step_ms": 1e3 * dt / n, "cache_in_use_bytes": mem["in_use"],
                           "cache_reserved_bytes": mem["reserved"],
                           "cuda_allocated_bytes": torch.cuda.memory_allocated() if device.type == "cuda" else None})
        bad = [bool(c.overflow) for c in dec.caches]
        out.update(tokens_generated=done, stopped_early=done < a.tokens, reason=reason, points=points,
                   overflow=any(bad), last_logits_finite=bool(torch.isfinite(logits).all()),
                   evicted_heads=[int((c.first > 0).sum()) for c in dec.caches],
                   peak_cache_bytes=dec.memory()["peak"],
                   peak_cuda_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)
        if any(bad):
            out["reason"] = ("pool overflow: the eviction pool was too small (outputs became NaN); "
                             "raise --evict-pool-fraction")
    del dec, step
    return out


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for v in result["variants"]:
        if not v.get("points"):
            continue
        x = [p["context"] for p in v["points"]]
        ax1.plot(x, [p["step_ms"] for p in v["points"]], label=v["variant"])
        ax2.plot(x, [p["cache_in_use_bytes"] / 2 ** 20 for p in v["points"]], label=v["variant"])
    ax1.set(xlabel="context length (tokens)", ylabel="ms per step (whole model)", title="step time")
    ax2.set(xlabel="context length (tokens)", ylabel="KV cache in use (MiB)", title="cache memory")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    m = result["meta"]
    fig.suptitle(f"{m['config']}, B={m['batch']}, {m['device']}, torch {m['torch']}, {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small-paper-gates", choices=["small-paper-gates", *fox_model.CONFIGS])
    ap.add_argument("--tokens", type=int, default=None, help="default: 100000 on CUDA, 200 with --smoke")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--record-every", type=int, default=None, help="steps per timed window (default N / 50)")
    ap.add_argument("--evict-pool-fraction", type=float, default=0.4)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--compile", choices=["inductor", "none"], default=None, help="default: inductor on CUDA")
    ap.add_argument("--budget-s", type=float, default=190.0)
    ap.add_argument("--smoke", action="store_true", help="CPU-sized: tiny model, 200 tokens, no compile")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if a.smoke:
        a.config, a.prompt = "tiny", min(a.prompt, 32)
        a.page_size = min(a.page_size, 16)
        a.compile = a.compile or "none"
    a.tokens = a.tokens or (200 if a.smoke or device.type != "cuda" else 100_000)
    a.record_every = a.record_every or max(1, a.tokens // 50)
    a.compile = a.compile or ("inductor" if device.type == "cuda" else "none")
    cfg = model_config(a.config)
    torch.manual_seed(0)
    model = fox_model.FoxLM(cfg).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    meta = {**versions(device), "config": a.config, "model": {k: getattr(cfg, k) for k in
            ("d_model", "n_layers", "n_heads", "head_dim", "vocab_size", "local_fgate_bias")},
            "batch": a.batch, "prompt": a.prompt, "tokens_asked": a.tokens, "page_size": a.page_size,
            "compile": a.compile, "budget_s": a.budget_s, "dtype": str(next(model.parameters()).dtype)}
    print(json.dumps(meta), flush=True)
    variants = []
    for i, name in enumerate(a.variants):
        left = a.budget_s - (time.perf_counter() - start)
        deadline = time.perf_counter() + left / (len(a.variants) - i)
        try:
            r = run_variant(name, model, a, device, deadline)
        except Exception as e:  # one variant must not lose the others
            r = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps({k: v for k, v in r.items() if k != "points"}), flush=True)
        variants.append(r)
    result = {"meta": {**meta, "wall_s": time.perf_counter() - start}, "variants": variants}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "generate.json").write_text(json.dumps(result, indent=1))
    result["plotted"] = plot(result, a.out / "generate.png")
    print(f"wrote {a.out / 'generate.json'}" + (f" and {a.out / 'generate.png'}" if result["plotted"] else ""))
    return result


if __name__ == "__main__":
    main()
