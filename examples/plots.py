"""PNG plots for train.py --compare and the W2 benchmark. Needs matplotlib (the `examples` extra);
importing this module without it raises ImportError, which the callers turn into a message."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUN_STYLE = {"acp": ("tab:blue", "-"), "inductor": ("tab:gray", "--"), "acp-no-prune": ("tab:orange", ":")}


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_losses(payload: dict, path: Path) -> Path:
    """Loss curves of every run (top) and each run's training loss minus the dense acp-no-prune one
    (bottom: pruning's effect next to the backend-to-backend noise of the inductor run)."""
    fig, (ax, diff_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    runs = payload["runs"]
    for name, run in runs.items():
        color, style = RUN_STYLE.get(name, (None, "-"))
        ax.plot(run["steps"], _smooth(run["train_loss"]), color=color, linestyle=style, label=f"{name} (train)")
        ax.plot(run["eval_steps"], run["heldout_loss"], color=color, linestyle="none", marker="o",
                label=f"{name} (held-out)")
    base = runs.get("acp-no-prune")
    if base is not None:
        for name, run in runs.items():
            if name == "acp-no-prune":
                continue
            color, style = RUN_STYLE.get(name, (None, "-"))
            diff_ax.plot(run["steps"], [a - b for a, b in zip(run["train_loss"], base["train_loss"])],
                         color=color, linestyle=style, label=f"{name} - acp-no-prune")
        diff_ax.axhline(0, color="black", linewidth=0.6)
        diff_ax.legend(fontsize=8)
    diff_ax.set(xlabel="step", ylabel="loss difference")
    diff_ax.grid(alpha=0.3)
    s = payload["settings"]
    ax.set(ylabel="loss (nats per byte)",
           title=f"FoX {s['config']}: {s['batch_size']}x{s['seq_len']} bytes per step, seed {s['seed']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_skipped(payload: dict, run_name: str, path: Path) -> Path:
    """Skipped-tile fraction over training, one line per (layer, head)."""
    run = payload["runs"][run_name]
    per_eval = run["skipped_per_head"]                       # [eval][layer][head]
    n_layers, n_heads = len(per_eval[0]), len(per_eval[0][0])
    names = run.get("sites") or [f"layer {i}" for i in range(n_layers)]
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 3.2), sharey=True, squeeze=False)
    for layer in range(n_layers):
        ax = axes[0][layer]
        for head in range(n_heads):
            ax.plot(run["eval_steps"], [e[layer][head] for e in per_eval], marker=".", label=f"head {head}")
        ax.set(title=names[layer], xlabel="step", ylim=(-0.02, 1.0))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of causal tiles skipped")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"ACP skipped tiles per layer and head ({run_name})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_compare(payload: dict, out_dir: Path) -> list[Path]:
    paths = [plot_losses(payload, out_dir / "loss_curves.png")]
    for name, run in payload["runs"].items():
        if any(any(any(h > 0 for h in layer) for layer in e) for e in run["skipped_per_head"]):
            paths.append(plot_skipped(payload, name, out_dir / f"skipped_tiles_{name}.png"))
    return paths


def plot_w2(results: list[dict], path: Path) -> Path:
    """Bar chart of tokens/s per sequence length and run; a missing bar says why (OOM, not run)."""
    seq_lens = sorted({r["seq_len"] for r in results})
    runs = list(dict.fromkeys(r["run"] for r in results))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    width = 0.8 / len(runs)
    labelled = set()
    for i, run in enumerate(runs):
        color = RUN_STYLE.get(run, (None, "-"))[0]
        for j, T in enumerate(seq_lens):
            r = next((r for r in results if r["run"] == run and r["seq_len"] == T), None)
            x = j + (i - (len(runs) - 1) / 2) * width
            if r is None or not r.get("tokens_per_s"):
                why = (r.get("status", "n/a") if r else "n/a").split(" (")[0]
                ax.text(x, 5, f"{run}: {why}", rotation=90, ha="center", va="bottom", fontsize=7, color=color)
                continue
            ax.bar(x, r["tokens_per_s"] / 1e3, width, color=color, label=None if run in labelled else run)
            labelled.add(run)
            ax.text(x, r["tokens_per_s"] / 1e3 + 3, f"{r['tokens_per_s'] / 1e3:.0f}k", ha="center", fontsize=8)
    ax.set_xticks(range(len(seq_lens)), [f"T={T // 1024}k (B={32768 // T})" if T >= 1024 else f"T={T}"
                                         for T in seq_lens])
    ax.set(ylabel="training throughput (k tokens/s)", title="FoX 125M, 32768 tokens per step, bf16, H200")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_w2_steps(results: list[dict], path: Path) -> Path:
    """A long W2 run step by step: tokens/s of each run (top), and for the acp run the skipped fraction of the
    causal keys and the paper's bound U (bottom; acp_compile.step_stats), at the longest T recorded."""
    T = max(r["seq_len"] for r in results if r.get("per_step_stats"))
    fig, (ax, stats_ax) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True)
    for r in results:
        if r["seq_len"] != T or not r.get("step_s_all"):
            continue
        color, style = RUN_STYLE.get(r["run"], (None, "-"))
        steps = range(1, len(r["step_s_all"]) + 1)
        tokens = r["batch"] * r["seq_len"]
        tps = [tokens / t / 1e3 if t > 0 else float("nan") for t in r["step_s_all"]]
        ax.plot(list(steps)[2:], tps[2:], color=color, linestyle=style, label=r["run"])   # step 1-2: compiling
    ax.set(ylabel="k tokens/s", title=f"W2 step by step at T={T}")
    ax.grid(alpha=0.3)
    ax.legend()
    acp = next((r for r in results if r["seq_len"] == T and r["run"] == "acp" and r.get("per_step_stats")),
               next(r for r in results if r["seq_len"] == T and r.get("per_step_stats")))
    stats = acp["per_step_stats"]
    steps = list(range(1, len(stats) + 1))
    stats_ax.plot(steps, [100 * s.get("skipped_fraction", float("nan")) for s in stats], color="tab:blue",
                  label=f"{acp['run']}: skipped causal keys (%)")
    for r in results:                     # the backward's exact-form dk/dv programs, when a Triton backward ran
        fractions = [s.get("exact_kv_fraction") for s in r.get("per_step_stats") or []]
        if r["seq_len"] == T and any(f is not None for f in fractions):
            color, style = RUN_STYLE.get(r["run"], (None, "-"))
            stats_ax.plot(range(1, len(fractions) + 1), [100 * f if f is not None else float("nan") for f in fractions],
                          color=color, linestyle="-.", label=f"{r['run']}: exact dk/dv programs (%)")
    stats_ax.set(xlabel="training step", ylabel="%")
    u_ax = stats_ax.twinx()
    u_ax.plot(steps, [s.get("u_paper_max", float("nan")) for s in stats], color="tab:red", linestyle="--",
              label="paper's U (max over layers, heads)")
    u_ax.set(ylabel="U (nats)")
    lines = stats_ax.get_lines() + u_ax.get_lines()
    stats_ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
    stats_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
