"""Benchmark of FoX attention kernels on workload W1 (DESIGN.md section 5), one run, one table.

W1: bf16, H = 16 heads, head dim 128, B * T = 32768 tokens, causal; 12 local heads
(log f = -(30/1024) u, u ~ U(0.5, 1.5)) and 4 global heads (log f = -1e-6 u); q, k, v standard normal.

Variants (forward, and forward + backward through autograd):
  ours_dense      our Triton kernels, ACP off (log_eps=None)
  ours_acp30      ACP at a fixed delta = -30: the op's u_bound is set to U = (log_eps - log T + 30) / 2,
                  so that delta = log_eps - log T - 2U = -30 (this is the benchmark's hook; U is then
                  not a proven bound on |scale q.k|, so the eps guarantee does not apply)
  ours_auto       ACP with the paper's certified threshold (certificate="paper", log_eps = -10, U from the data)
  ours_online     ACP with the online certificate (certificate="online", the default; DESIGN.md 1.1),
                  log_eps = -10, the op computing the norm statistics itself (a direct call)
  ours_online_norms  the same with q_norm and k_norm given (computed outside the timed region): what a
                  compiled model pays when inductor fuses the norms into q's and k's producers
  sdpa_flash, sdpa_cudnn   torch SDPA, causal, without a gate (torch.nn.attention.sdpa_kernel)
  flex_dense      FlexAttention, FoX score_mod (two copies of c: one indexed by query, one by key,
                  since indexing one tensor twice is refused in the backward), causal block mask built once
  flex_acp30      the same with an ACP block mask built per call (inside the timed region) from our
                  device plan at 128 x 128 tiles and delta = -30
Reported: median ms (triton.testing.do_bench), dense-equivalent TFLOP/s (causal FLOPs of the dense
problem: 2 * B * H * T^2 * D forward, 2.5 times that for the backward), pruned fraction of the
forward's causal tiles, time over ideal (time / (ours_dense time * (1 - pruned))), the plan's own
time, and the peak memory of forward + backward.

  python examples/benchmarks/bench_attention.py --out examples/results            # full run
  python examples/benchmarks/bench_attention.py --T 4096 16384 --no-flex          # quicker
  python examples/benchmarks/bench_attention.py --sweep                            # forward config sweep
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import triton

import acp_compile  # noqa: F401  (registers torch.ops.acp)
from acp_compile.kernels.fox_triton.configs import FwdConfig, forward_config, override_string
from acp_compile.kernels.fox_triton.forward import launch_forward
from acp_compile.kernels.fox_triton.plan import compute_plan
from acp_compile.kernels.plan import causal_last_key_block

H, D, TOKENS = 16, 128, 32768
N_GLOBAL = 4
LOG_EPS = -10.0
FIXED_DELTA = -30.0


def w1_inputs(T: int, seed: int = 0, D: int = D):
    B = TOKENS // T
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    rate = torch.full((H,), 30.0 / 1024, device="cuda")
    rate[H - N_GLOBAL:] = 1e-6
    log_f = -rate[None, :, None] * (0.5 + torch.rand(B, H, T, device="cuda", generator=g))
    c = torch.cumsum(log_f, dim=-1)
    return q, k, v, c


def u_for_delta(T: int, delta: float = FIXED_DELTA) -> torch.Tensor:
    """The u_bound that makes delta = log_eps - log T - 2U equal to `delta`."""
    return torch.tensor((LOG_EPS - math.log(T) - delta) / 2, device="cuda")


def dense_flops(B: int, T: int, backward: bool) -> float:
    fwd = 2.0 * B * H * T * T * D          # two matmuls of 2*T*T*D, halved by the causal mask
    return fwd * 3.5 if backward else fwd


def pruned_fraction(start: torch.Tensor, T: int, bm: int, bn: int) -> float:
    causal = (causal_last_key_block(T, T, bm, bn, start.device).double() + 1).sum().item()
    return start.double().sum().item() / (causal * start.shape[0] * start.shape[1])


def bench(fn, grad_to_none=None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def peak_memory_gb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


# --- variants: each returns a forward closure over leaf tensors -------------------------------------------------

def ours(log_eps, u_bound, certificate="paper", given_norms=False):
    def make(q, k, v, c):
        q_norm = k_norm = None
        if given_norms:
            from acp_compile.ops import row_norms
            q_norm, k_norm = row_norms(q.detach()), row_norms(k.detach())
        return lambda: torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, u_bound, certificate=certificate,
                                                       q_norm=q_norm, k_norm=k_norm)[0]
    return make


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def make(q, k, v, c):
        def run():
            with sdpa_kernel(which):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run
    return make


_flex_compiled = None


def flex(acp: bool):
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def make(q, k, v, c):
        B, _, T, _ = q.shape
        c_key = c.detach().clone().requires_grad_(c.requires_grad)   # second copy: indexed by key

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + c[b, h, q_idx] - c_key[b, h, kv_idx]

        if not acp:
            mask = create_block_mask(causal, None, None, T, T, device="cuda")

            def run_dense():
                return _flex_compiled(q, k, v, score_mod=score_mod, block_mask=mask)
            run_dense.second_gate = c_key
            return run_dense
        u = u_for_delta(T).expand(B, H)
        blocks = T // 128
        ar = torch.arange(blocks, device="cuda", dtype=torch.int32)

        def run():
            start, _ = compute_plan(q, k, c, D ** -0.5, LOG_EPS, u, 128, 128)          # (B, H, M)
            full_num = ar - start                                                     # keys [start, m): full
            full_idx = torch.clamp(start[..., None] + ar, max=blocks - 1)             # (B, H, M, M)
            part_num = torch.ones_like(start)
            part_idx = ((ar[:, None] + ar[None, :]) % blocks).expand(B, H, blocks, blocks).contiguous()  # diagonal first
            mask = BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=128, mask_mod=causal)
            return _flex_compiled(q, k, v, score_mod=score_mod, block_mask=mask)
        run.second_gate = c_key
        return run
    return make


def variants(T, flex_on):
    out = {
        "ours_dense": ours(None, None),
        "ours_acp30": ours(LOG_EPS, u_for_delta(T)),
        "ours_auto": ours(LOG_EPS, None),
        "ours_online": ours(LOG_EPS, None, "online"),
        "ours_online_norms": ours(LOG_EPS, None, "online", given_norms=True),
        "sdpa_flash": sdpa("flash"),
        "sdpa_cudnn": sdpa("cudnn"),
    }
    if flex_on:
        out["flex_dense"] = flex(False)
        out["flex_acp30"] = flex(True)
    return out


def measure_variant(name, make, T, do_backward, mem):
    q, k, v, c = w1_inputs(T)
    B = q.shape[0]
    row = {"T": T, "B": B, "variant": name}
    try:
        fwd = make(q, k, v, c)
        with torch.no_grad():
            row["fwd_ms"] = bench(fwd)
        row["fwd_tflops"] = dense_flops(B, T, False) / row["fwd_ms"] / 1e9
        if do_backward:
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, c)]
            fwd_g = make(*leaves)
            extra = [fwd_g.second_gate] if hasattr(fwd_g, "second_gate") else []
            do = torch.randn_like(q)

            def step():
                fwd_g().backward(do)
            row["fwdbwd_ms"] = bench(step, grad_to_none=leaves + extra)
            row["fwdbwd_tflops"] = dense_flops(B, T, True) / row["fwdbwd_ms"] / 1e9
            if mem:
                row["peak_fwdbwd_gb"] = peak_memory_gb(step)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:   # a variant that does not run on this stack is recorded, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    torch.cuda.empty_cache()
    return row


def plan_stats(T):
    q, k, v, c = w1_inputs(T)
    cfg = forward_config(q)
    s30, _ = compute_plan(q, k, c, D ** -0.5, LOG_EPS, u_for_delta(T), cfg.block_m, cfg.block_n)
    sauto, _ = compute_plan(q, k, c, D ** -0.5, LOG_EPS, None, cfg.block_m, cfg.block_n)
    s128, _ = compute_plan(q, k, c, D ** -0.5, LOG_EPS, u_for_delta(T), 128, 128)
    u = u_for_delta(T)
    keep_from = torch.ops.acp.fox_attention_fwd(q, k, v, c, None, LOG_EPS, None, certificate="online")[3]   # (B, H, T)
    s_online = keep_from[..., ::cfg.block_m] // cfg.block_n                                     # (B, H, M)
    return {
        "T": T, "block_m": cfg.block_m, "block_n": cfg.block_n, "tma": cfg.tma, "num_warps": cfg.num_warps,
        "heads_fastest": cfg.heads_fastest, "newest_first": cfg.newest_first,
        "num_stages": cfg.num_stages,
        "pruned_acp30": pruned_fraction(s30, T, cfg.block_m, cfg.block_n),
        "pruned_auto": pruned_fraction(sauto, T, cfg.block_m, cfg.block_n),
        "pruned_online": pruned_fraction(s_online, T, cfg.block_m, cfg.block_n),
        "pruned_acp30_128x128": pruned_fraction(s128, T, 128, 128),
        "plan_ms_given_u": bench(lambda: compute_plan(q, k, c, D ** -0.5, LOG_EPS, u, cfg.block_m, cfg.block_n)),
        "plan_ms_auto_u": bench(lambda: compute_plan(q, k, c, D ** -0.5, LOG_EPS, None, cfg.block_m, cfg.block_n)),
    }


def derive(rows, plans):
    by = {(r["T"], r["variant"]): r for r in rows}
    for r in rows:
        T = r["T"]
        cudnn = by.get((T, "sdpa_cudnn"), {})
        dense = by.get((T, "ours_dense"), {})
        pruned = {"ours_acp30": plans[T]["pruned_acp30"], "ours_auto": plans[T]["pruned_auto"],
                  "ours_online": plans[T]["pruned_online"], "ours_online_norms": plans[T]["pruned_online"]}.get(r["variant"])
        if pruned is not None:
            r["pruned"] = pruned
        for key in ("fwd_ms", "fwdbwd_ms"):
            if key in r and key in cudnn:
                r[key.replace("_ms", "_vs_cudnn")] = r[key] / cudnn[key]
            if pruned is not None and key in r and key in dense:
                r[key.replace("_ms", "_over_ideal")] = r[key] / (dense[key] * (1 - pruned))
        if r["variant"].startswith("ours") and "fwd_ms" in r:
            r["plan_share_of_fwd"] = (plans[T]["plan_ms_auto_u"] if r["variant"] == "ours_auto"
                                      else plans[T]["plan_ms_given_u"] if r["variant"] == "ours_acp30" else 0.0) / r["fwd_ms"]


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(rows, plans, meta):
    lines = [f"W1 (bf16, H=16, D=128, B*T=32768, causal), {meta['gpu']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, {meta['date']}", "",
             "| T | variant | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | pruned | fwd / cuDNN | "
             "fwd+bwd / cuDNN | fwd over ideal | fwd+bwd over ideal | peak fwd+bwd GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['T']} | {r['variant']} | {r['error']} |  |  |  |  |  |  |  |  |  |")
            continue
        lines.append("| {T} | {variant} | {a} | {b} | {c} | {d} | {e} | {f} | {g} | {h} | {i} | {j} |".format(
            T=r["T"], variant=r["variant"], a=fmt(r.get("fwd_ms"), ".3f"), b=fmt(r.get("fwd_tflops"), ".0f"),
            c=fmt(r.get("fwdbwd_ms"), ".3f"), d=fmt(r.get("fwdbwd_tflops"), ".0f"), e=fmt(r.get("pruned")),
            f=fmt(r.get("fwd_vs_cudnn")), g=fmt(r.get("fwdbwd_vs_cudnn")), h=fmt(r.get("fwd_over_ideal")),
            i=fmt(r.get("fwdbwd_over_ideal")), j=fmt(r.get("peak_fwdbwd_gb"))))
    lines += ["", "| T | forward tiles | pruned (delta=-30) | pruned (auto) | pruned (online) | pruned at 128x128 (delta=-30) | "
              "plan ms (u given) | plan ms (U from data) |", "|---|---|---|---|---|---|---|---|"]
    for T, p in plans.items():
        tiles = f"{p['block_m']}x{p['block_n']}, {p['num_warps']} warps, {p['num_stages']} stages{', TMA' if p['tma'] else ''}{', heads fastest' if p['heads_fastest'] else ''}{', newest first' if p.get('newest_first') else ''}"
        lines.append(f"| {T} | {tiles} | {p['pruned_acp30']:.3f} | {p['pruned_auto']:.3f} | {p['pruned_online']:.3f} | "
                     f"{p['pruned_acp30_128x128']:.3f} | {p['plan_ms_given_u']:.4f} | {p['plan_ms_auto_u']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward + backward")):
        for name in dict.fromkeys(r["variant"] for r in rows):
            pts = [(r["T"], r[key]) for r in rows if r["variant"] == name and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (B = 32768 / T)")
        ax.set_ylabel("median ms")
        ax.set_title(f"W1 {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


SWEEP = {   # FwdConfig(block_m, block_n, warps, stages, tma, heads_fastest, newest_first)
    128: [FwdConfig(128, 128, 8, 3, True), FwdConfig(128, 128, 8, 3, True, False, True),
          FwdConfig(128, 128, 8, 3, False, False, True), FwdConfig(128, 128, 8, 2, True, False, True)],
    64: [FwdConfig(128, 64, 4, 3), FwdConfig(128, 128, 8, 3, False, False, True), FwdConfig(128, 128, 8, 3, True, False, True)],
}


def sweep(Ts, head_dims=(128, 64)):
    """Times forward configs (dense and ACP delta=-30); returns rows and the ACP_FWD_CONFIG string of the best."""
    out, picks = [], []
    for d in head_dims:
        scores = {}
        for T in (Ts if d == 128 else Ts[-1:]):
            q, k, v, c = w1_inputs(T, D=d)
            best = {}
            rows_T = []
            for cfg in SWEEP[d]:
                try:
                    start, _ = compute_plan(q, k, c, d ** -0.5, LOG_EPS, u_for_delta(T), cfg.block_m, cfg.block_n)
                    dense = bench(lambda: launch_forward(q, k, v, c, d ** -0.5, None, cfg))
                    acp = bench(lambda: launch_forward(q, k, v, c, d ** -0.5, start, cfg))
                    pr = pruned_fraction(start, T, cfg.block_m, cfg.block_n)
                    row = dict(D=d, T=T, cfg=list(cfg.__dict__.values()), dense_ms=dense, acp30_ms=acp, pruned=pr,
                               dense_tflops=dense_flops(q.shape[0], T, False) / dense / 1e9 * d / D,
                               acp_over_ideal=acp / (dense * (1 - pr)))
                    best["dense"] = min(best.get("dense", 1e9), dense)
                    best["acp"] = min(best.get("acp", 1e9), acp)
                    rows_T.append((cfg, dense, acp))
                except Exception as e:
                    row = dict(D=d, T=T, cfg=list(cfg.__dict__.values()), error=f"{type(e).__name__}: {str(e)[:300]}")
                print(json.dumps(row), flush=True)
                out.append(row)
            for cfg, dense, acp in rows_T:
                scores[cfg] = scores.get(cfg, 0.0) + dense / best["dense"] + acp / best["acp"]
            del q, k, v, c
            torch.cuda.empty_cache()
        n_T = len(Ts if d == 128 else Ts[-1:])
        full = {cfg: sc for cfg, sc in scores.items() if sum(1 for r in out if r.get("D") == d and r.get("cfg") == list(cfg.__dict__.values()) and "error" not in r) == n_T}
        if full:
            cfg = min(full, key=full.get)
            picks.append(override_string(d, cfg))
    return out, ";".join(picks)


def save(out: Path, rows, plans, meta) -> str:
    derive(rows, plans)
    md = markdown(rows, plans, meta)
    (out / "attention_w1.json").write_text(json.dumps({"meta": meta, "plans": plans, "rows": rows}, indent=1))
    (out / "attention_w1.md").write_text(md)
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--out", default="examples/results")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--flex-T", type=int, nargs="*", help="run FlexAttention only at these T (default: all)")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64], help="head dims of the --sweep")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--sweep", action="store_true", help="time forward configurations instead")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "fwd_config_override": os.environ.get("ACP_FWD_CONFIG", ""),
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")}
    print(json.dumps(meta), flush=True)
    if args.sweep:
        res, pick = sweep(args.T, tuple(args.head_dims))
        print("picked ACP_FWD_CONFIG=" + pick, flush=True)
        (out / "attention_fwd_config_sweep.json").write_text(json.dumps({"meta": meta, "rows": res, "pick": pick}, indent=1))
        (out / "attention_fwd_config_pick.txt").write_text(pick + "\n")
        return
    rows, plans = [], {}
    for T in args.T:
        t0 = time.time()
        plans[T] = plan_stats(T)
        print(json.dumps(plans[T]), flush=True)
        flex_on = not args.no_flex and (not args.flex_T or T in args.flex_T)
        for name, make in variants(T, flex_on).items():
            if args.only and name not in args.only:
                continue
            row = measure_variant(name, make, T, not args.no_backward, mem=(T == max(args.T)))
            print(json.dumps(row), flush=True)
            rows.append(row)
        print(f"# T={T} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        md = save(out, rows, plans, meta)      # after every T, so a run cut short still leaves results
    print(md)
    try:
        plot(rows, out / "attention_w1.png")
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)


if __name__ == "__main__":
    main()
