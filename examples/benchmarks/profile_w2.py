"""Where a W2 training step spends its GPU time: torch.profiler over a few steps of one (run, T).

Same model, data, autocast and optimizer as bench_w2.py (whose pieces it reuses); prints the kernels
sorted by total CUDA time and a split into attention (our acp kernels, or SDPA/softmax/bmm for the
eager attention) and everything else, and writes both to OUT/w2_profile_<run>_<T>.txt.

    python examples/benchmarks/profile_w2.py --run acp --T 16384 --out /tmp/prof
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_w2 import CONFIGS, EXAMPLES, RUN_OPTIONS, FoxLM, compile_model  # noqa: E402
from corpus import BatchSampler, load_corpus  # noqa: E402

ATTENTION_KERNEL_MARKERS = ("_fox_", "fox_bwd", "_plan_kernel", "_row_norm", "_bwd_preprocess")


def is_attention_kernel(name: str) -> bool:
    return any(m in name for m in ATTENTION_KERNEL_MARKERS)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", choices=list(RUN_OPTIONS), default="acp")
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", type=Path, default=EXAMPLES / "results")
    a = p.parse_args(argv)
    device = torch.device("cuda")
    B = a.tokens_per_step // a.T
    torch.manual_seed(0)
    model = FoxLM(CONFIGS["125m"]()).to(device)
    compiled = compile_model(model, a.run)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batches = BatchSampler(load_corpus(max_bytes=4_000_000).train, B, a.T, seed=0)

    def step():
        x, y = batches.next_batch(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / a.steps / 1e3            # ms per step
    attn = sum(e.self_device_time_total for e in events if is_attention_kernel(e.key)) / a.steps / 1e3
    lines = [f"W2 profile: run={a.run} T={a.T} B={B}, {torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"GPU kernel time per step: {total:.2f} ms; acp attention kernels {attn:.2f} ms; the rest {total - attn:.2f} ms", "",
             "ms/step  calls/step  kernel"]
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: a.top]:
        lines.append(f"{e.self_device_time_total / a.steps / 1e3:8.3f}  {e.count / a.steps:6.0f}  {e.key[:150]}")
    text = "\n".join(lines)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"w2_profile_{a.run}_{a.T}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
