"""Train the FoX model of fox_model.py on the Python standard library's source, under torch.compile.

    python examples/train.py                       # short CPU run with backend="acp"
    python examples/train.py --backend inductor    # the same model under the default backend
    python examples/train.py --no-prune            # acp with pruning switched off in the op
    python examples/train.py --compare             # all three, same seed and batches; JSON + PNG plots

The model file knows nothing about acp_compile; this script only picks the torch.compile backend.
At the end it prints the training and held-out loss, tokens per second and the fraction of
attention tiles that ACP skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import BatchSampler, load_corpus  # noqa: E402
from fox_model import CONFIGS, FoxLM  # noqa: E402

RUNS = {  # name -> (torch.compile backend or None for eager, prune)
    "acp": ("acp", True),
    "inductor": ("inductor", False),
    "acp-no-prune": ("acp", False),
    "eager": (None, False),
}
COMPARE_RUNS = ("acp", "inductor", "acp-no-prune")


@dataclass
class TrainSettings:
    config: str = "small"
    seq_len: int = 512
    batch_size: int = 4
    steps: int = 80
    lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.1
    seed: int = 0
    device: str = "cpu"
    log_eps: float = -10.0
    eval_every: int = 20
    eval_batches: int = 2
    max_corpus_bytes: int | None = 8_000_000
    progress: bool = True
    inner_backend: str = "inductor"     # what compiles the rest of the graph under acp ("aot_eager": quick)
    report: bool = True                 # acp records skipped tiles per call (one host sync per attention call)


@dataclass
class RunResult:
    name: str
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    heldout_loss: list[float] = field(default_factory=list)
    skipped_per_head: list[list[list[float]]] = field(default_factory=list)   # [eval][site][head]
    sites: list[str] = field(default_factory=list)   # attention sites of the report, in model order
    tokens_per_s: float = float("nan")          # after the first (compiling) step
    first_step_s: float = float("nan")          # includes compilation
    total_s: float = float("nan")
    skipped_fraction: float = float("nan")      # over all attention tiles of the last evaluation
    acp_counts: dict = field(default_factory=dict)  # attention sites the acp pass rewrote, near-misses


def compile_for(model: torch.nn.Module, run: str, log_eps: float, report: bool = True, inner: str = "inductor"):
    """report=True records the skipped tiles of every call (one host sync per attention call)."""
    backend, prune = RUNS[run]
    if backend is None:
        return model
    if backend == "acp":
        return torch.compile(model, backend="acp", options={"log_eps": log_eps, "prune": prune, "report": report,
                                                              "inner_backend": inner})
    return torch.compile(model, backend=backend)


def reported_skips(n_layers: int, n_heads: int, uses_acp: bool) -> tuple[list[str], list[list[float]]]:
    """Site names and [site][head] fractions of causal tiles skipped in each site's last call, from the
    acp pass's report (batch-averaged). Without acp (or without a report) every tile was computed."""
    from acp_compile import report
    records = sorted(report.sites(), key=lambda r: _natural_key(r.site)) if uses_acp else []
    if not records:   # no acp: every tile computed; acp without a report (--no-report): unknown
        value = float("nan") if uses_acp else 0.0
        return [f"blocks.{i}.attn" for i in range(n_layers)], [[value] * n_heads for _ in range(n_layers)]
    return [r.site for r in records], [r.skipped.mean(dim=0).tolist() for r in records]


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in name.replace("#", ".").split(".")]


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def acp_counts() -> dict:
    """What the acp pass did so far: attention sites rewritten ("fox_attention") and near-misses."""
    import acp_compile
    records = acp_compile.compilations()
    return {"fox_attention": sum(len(r.sites) for r in records),
            "near_miss": sum(len(r.near_misses) for r in records)}


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def heldout_loss(model, sampler: BatchSampler, n_batches: int, device) -> float:
    losses = []
    for _ in range(n_batches):
        x, y = sampler.next_batch(device)
        with autocast_for(device):
            losses.append(model(x, y).item())
    return sum(losses) / len(losses)


def train_one(run: str, s: TrainSettings, corpus=None, save: Path | None = None) -> RunResult:
    device = torch.device(s.device)
    corpus = corpus if corpus is not None else load_corpus(max_bytes=s.max_corpus_bytes)
    torch.manual_seed(s.seed)
    model = FoxLM(CONFIGS[s.config]()).to(device)
    compiled = compile_for(model, run, s.log_eps, report=s.report, inner=s.inner_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                                  betas=(0.9, 0.95), fused=device.type == "cuda")
    train_batches = BatchSampler(corpus.train, s.batch_size, s.seq_len, seed=s.seed)
    cfg = model.cfg
    if RUNS[run][0] == "acp":
        from acp_compile import report
        report.reset()
        # A fresh Dynamo cache, so the counts below are this run's rewrites: code compiled earlier in the
        # same process (another model of the same classes) would otherwise be reused without the pass running.
        torch.compiler.reset()
        counts_before = acp_counts()
    result = RunResult(name=run)
    bar = tqdm(total=s.steps, desc=run, disable=not s.progress, file=sys.stderr, mininterval=0.5,
               dynamic_ncols=True, leave=True)
    tokens_per_step = s.batch_size * s.seq_len
    start = time.perf_counter()
    steady_start = None
    for step in range(1, s.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, s)
        x, y = train_batches.next_batch(device)
        with autocast_for(device):
            loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()                       # syncs, so the timing below is honest
        now = time.perf_counter()
        if step == 1:
            result.first_step_s = now - start
            steady_start = now
            rate = tokens_per_step / (now - start)
        else:
            rate = tokens_per_step * (step - 1) / (now - steady_start)
        result.steps.append(step)
        result.train_loss.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate / 1e3:.2f}k", refresh=False)
        bar.update(1)
        if step % s.eval_every == 0 or step == s.steps:
            pause = time.perf_counter()
            result.eval_steps.append(step)
            # The skipped tiles of this step's forward, as the op computed them (acp's report);
            # other backends run the model's own attention, which computes every tile.
            uses_acp = RUNS[run][0] == "acp"
            result.sites, skipped = reported_skips(cfg.n_layers, cfg.n_heads, uses_acp)
            result.skipped_per_head.append(skipped)
            # Held-out loss with the uncompiled model: the same weights, and no second compilation.
            result.heldout_loss.append(heldout_loss(model, BatchSampler(
                corpus.heldout, s.batch_size, s.seq_len, seed=s.seed + 1), s.eval_batches, device))
            steady_start += time.perf_counter() - pause   # evaluation is not training time
    bar.close()
    result.total_s = time.perf_counter() - start
    result.tokens_per_s = tokens_per_step * (s.steps - 1) / (time.perf_counter() - steady_start) if s.steps > 1 else rate
    last = result.skipped_per_head[-1]
    result.skipped_fraction = sum(map(sum, last)) / sum(map(len, last))
    if RUNS[run][0] == "acp":
        after = acp_counts()
        result.acp_counts = {k: after.get(k, 0) - counts_before.get(k, 0) for k in after}
    if save is not None:
        torch.save({"config": s.config, "model": model.state_dict()}, save)
        print(f"saved the trained weights to {save}")
    return result


def print_summary(r: RunResult, s: TrainSettings) -> None:
    print(f"[{r.name}] {s.steps} steps of {s.batch_size}x{s.seq_len} tokens ({s.config} config, {s.device}): "
          f"train loss {r.train_loss[-1]:.3f}, held-out loss {r.heldout_loss[-1]:.3f}, "
          f"{r.tokens_per_s / 1e3:.2f}k tokens/s (first step incl. compile {r.first_step_s:.1f} s), "
          f"total {r.total_s:.0f} s")
    if RUNS[r.name][0] == "acp":
        print(f"[{r.name}] acp pass: {r.acp_counts.get('fox_attention', 0)} attention rewrites (once per compiled graph) to the "
              f"pruned op, {r.acp_counts.get('near_miss', 0)} near-misses (TORCH_LOGS=+acp_compile says why)")
    if RUNS[r.name][1] and math.isnan(r.skipped_fraction):
        print(f"[{r.name}] skipped tiles not recorded (--no-report)")
    elif RUNS[r.name][1]:
        print(f"[{r.name}] ACP skipped {100 * r.skipped_fraction:.1f}% of the causal attention tiles "
              f"(acp_compile.report, last training step); per layer: "
              + ", ".join(f"{100 * sum(h) / len(h):.0f}%" for h in r.skipped_per_head[-1]))
    else:
        print(f"[{r.name}] pruning off: every causal attention tile computed")


def compare(s: TrainSettings, out_dir: Path) -> dict[str, RunResult]:
    corpus = load_corpus(max_bytes=s.max_corpus_bytes)
    results = {}
    for run in COMPARE_RUNS:
        results[run] = train_one(run, s, corpus)
        print_summary(results[run], s)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"settings": asdict(s), "torch": torch.__version__, "runs": {k: asdict(v) for k, v in results.items()}}
    (out_dir / "compare.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {out_dir / 'compare.json'}")
    try:
        from plots import plot_compare
    except ImportError as e:
        print(f"plots skipped ({e}); install the examples extra: pip install 'acp-compile[examples]'")
        return results
    for path in plot_compare(payload, out_dir):
        print(f"wrote {path}")
    return results


def parse_args(argv=None) -> tuple[argparse.Namespace, TrainSettings]:
    d = TrainSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["acp", "inductor", "eager"], default="acp")
    p.add_argument("--no-prune", action="store_true", help="acp backend with pruning switched off in the op")
    p.add_argument("--compare", action="store_true", help="train under acp, inductor and acp without pruning")
    p.add_argument("--config", choices=sorted(CONFIGS), default=d.config)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--log-eps", type=float, default=d.log_eps, help="log of the per-row pruned-mass tolerance")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--max-corpus-bytes", type=int, default=d.max_corpus_bytes,
                   help="read at most this many bytes of the stdlib's source (0: all)")
    p.add_argument("--out-dir", type=Path, default=Path("examples/results/compare"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--inner-backend", choices=["inductor", "aot_eager"], default=d.inner_backend,
                   help="what compiles the rest of the graph under acp (aot_eager compiles fast, runs slower)")
    p.add_argument("--no-report", action="store_true",
                   help="do not record skipped tiles (the report syncs with the GPU once per attention call)")
    p.add_argument("--save", type=Path, default=None, help="write the trained weights here (for generate.py)")
    a = p.parse_args(argv)
    if a.no_prune and a.backend != "acp":
        p.error("--no-prune switches pruning off in the acp backend; use it with --backend acp")
    s = TrainSettings(config=a.config, seq_len=a.seq_len, batch_size=a.batch_size, steps=a.steps, lr=a.lr,
                      seed=a.seed, device=a.device, log_eps=a.log_eps, eval_every=a.eval_every,
                      max_corpus_bytes=a.max_corpus_bytes or None, progress=not a.no_progress,
                      inner_backend=a.inner_backend, report=not a.no_report)
    return a, s


def main(argv=None) -> None:
    a, s = parse_args(argv)
    if a.compare:
        compare(s, a.out_dir)
        return
    run = "acp-no-prune" if a.no_prune else a.backend
    result = train_one(run, s, save=a.save)
    print_summary(result, s)


if __name__ == "__main__":
    main()
