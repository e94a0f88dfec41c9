"""Tunes and times the Triton FoX backward on the GPU (one device call), workload W1 of DESIGN.md section 5.

  python examples/benchmarks/tune_backward.py --out $OUT [--budget-s 300]

1. smoke: the backward against a chunked fp32 reference on sampled rows/columns (T = 4096).
2. sweep: each backward kernel alone (dk/dv/dc kernel; dq kernel) over candidate tile sizes,
   warps and stages, dense and with ACP at delta = -30, for D = 128 (W1: H = 16, B * T = 32768)
   and D = 64 (W2-like: H = 12), at T = 4096 and 16384. Kernel TFLOP/s count the dense causal
   work the kernel does (dk/dv: 4 T^2 D / 2 per head, dq: 3 T^2 D / 2).
3. compare: with the shipped configuration table (backward.default_config), forward + backward of the op (autograd) against SDPA
   cuDNN and flash without a gate, dense / ACP at delta = -30 / ACP automatic; backward alone.
Prints JSON lines and writes backward_tuning.json under --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch
import triton

import acp_compile  # noqa: F401  (registers torch.ops.acp)
from acp_compile.kernels.fox_triton import backward as bw
from acp_compile.kernels.fox_triton.forward import forward
from acp_compile.kernels.fox_triton.plan import compute_plan
from acp_compile.kernels.plan import causal_last_key_block

TOKENS = 32768
LOG_EPS = -10.0
FIXED_DELTA = -30.0
T0 = time.time()


def log(row):
    row = dict(row, t=round(time.time() - T0, 1))
    print(json.dumps(row), flush=True)
    return row


def inputs(T, H, D, n_global, seed=0):
    B = TOKENS // T
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    rate = torch.full((H,), 30.0 / 1024, device="cuda")
    rate[H - n_global:] = 1e-6
    c = torch.cumsum(-rate[None, :, None] * (0.5 + torch.rand(B, H, T, device="cuda", generator=g)), dim=-1)
    return q, k, v, c, do


def u_for_delta(T):
    return torch.tensor((LOG_EPS - math.log(T) - FIXED_DELTA) / 2, device="cuda")


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def fwd_flops(q):
    B, H, T, D = q.shape
    return 2.0 * B * H * T * T * D            # causal: two matmuls of 2 T^2 D, halved


def pruned(start, T, bm, bn):
    causal = (causal_last_key_block(T, T, bm, bn, start.device).double() + 1).sum().item()
    return start.double().sum().item() / (causal * start.shape[0] * start.shape[1])


# Round 1 (2026-11-29) swept 9 + 8 (D = 128) and 5 + 5 (D = 64) candidates; these are the winners
# and their neighbours (round 2).
KV_CANDS = {
    128: [(64, 128, 8, 3), (64, 128, 8, 4), (128, 128, 8, 2), (128, 64, 8, 3), (32, 128, 8, 4), (64, 64, 4, 4)],
    64: [(32, 128, 4, 3), (32, 128, 4, 4), (64, 128, 8, 4)],
}
Q_CANDS = {
    128: [(128, 32, 4, 3), (128, 32, 4, 4), (128, 64, 4, 3), (128, 32, 8, 4), (256, 32, 8, 3), (128, 16, 4, 4)],
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3)],
}


def regs(handle):
    return {"n_regs": getattr(handle, "n_regs", None), "n_spills": getattr(handle, "n_spills", None)}


def smoke():
    import sys
    tests = Path(__file__).resolve().parents[2] / "tests"
    sys.path[:0] = [str(tests / "gpu"), str(tests)]             # test_gpu_backward imports helpers from tests/
    from test_gpu_backward import chunked_reference_grads, sample_indices
    q, k, v, c, do = inputs(4096, 4, 128, 1)
    q, k, v, c, do = q[:1], k[:1, :2], v[:1, :2], c[:1], do[:1]        # GQA 2
    scale = 128 ** -0.5
    o, lse = forward(q, k, v, c, scale, LOG_EPS, None)
    got = bw.backward(do, q, k, v, c, o, lse, scale, LOG_EPS, None)
    rows, cols = sample_indices(4096), sample_indices(4096, seed=1)
    want = chunked_reference_grads(q, k, v, c, do, scale, rows, cols)
    cc = cols.cuda()
    got = (got[0][:, :, rows.cuda()], got[1][:, :, cc], got[2][:, :, cc], got[3][:, :, cc])
    out = {}
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dc")):
        err = (g.float() - w).abs().max().item()
        out[name] = dict(max_err=err, ref_max=w.abs().max().item(),
                         rel_rms=((g.float() - w).norm() / w.norm()).item(), nan=bool(torch.isnan(g).any()))
    return log({"step": "smoke", **out})


def sweep(D, H, n_global, Ts, deadline):
    rows = []
    best = {}
    for T in Ts:
        q, k, v, c, do = inputs(T, H, D, n_global)
        scale = D ** -0.5
        o, lse = forward(q, k, v, c, scale, None, None)
        delta, row = bw.preprocess(do, o, lse)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dc = torch.empty_like(c)
        F = fwd_flops(q)
        u = u_for_delta(T)
        for (bm, bn, w, s) in KV_CANDS[D]:
            if time.time() > deadline:
                break
            cfg = bw.BackwardConfig(bm, bn, 128, 32, w, s, 4, 3)
            r = {"step": "sweep_dkdv", "D": D, "T": T, "cfg": [bm, bn, w, s]}
            try:
                r.update(regs(bw.launch_dkdv(q, k, v, c, do, row, delta, None, None, dk, dv, dc, scale, cfg)))
                r["dense_ms"] = bench(lambda: bw.launch_dkdv(q, k, v, c, do, row, delta, None, None, dk, dv, dc, scale, cfg))
                r["dense_tflops"] = 2 * F / r["dense_ms"] / 1e9
                st, en = bw.plan_indices(q, k, c, scale, LOG_EPS, u, bm, bn)
                r["acp30_ms"] = bench(lambda: bw.launch_dkdv(q, k, v, c, do, row, delta, st, en, dk, dv, dc, scale, cfg))
                r["pruned"] = pruned(st, T, bm, bn)
                r["acp_over_ideal"] = r["acp30_ms"] / (r["dense_ms"] * (1 - r["pruned"]))
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            rows.append(log(r))
        for (bm, bn, w, s) in Q_CANDS[D]:
            if time.time() > deadline:
                break
            cfg = bw.BackwardConfig(32, 128, bm, bn, 4, 3, w, s)
            r = {"step": "sweep_dq", "D": D, "T": T, "cfg": [bm, bn, w, s]}
            try:
                r.update(regs(bw.launch_dq(q, k, v, c, do, row, delta, None, dq, dc, scale, cfg)))
                r["dense_ms"] = bench(lambda: bw.launch_dq(q, k, v, c, do, row, delta, None, dq, dc, scale, cfg))
                r["dense_tflops"] = 1.5 * F / r["dense_ms"] / 1e9
                st, _ = bw.plan_indices(q, k, c, scale, LOG_EPS, u, bm, bn)
                r["acp30_ms"] = bench(lambda: bw.launch_dq(q, k, v, c, do, row, delta, st, dq, dc, scale, cfg))
                r["pruned"] = pruned(st, T, bm, bn)
                r["acp_over_ideal"] = r["acp30_ms"] / (r["dense_ms"] * (1 - r["pruned"]))
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            rows.append(log(r))
        r = {"step": "preprocess", "D": D, "T": T, "ms": bench(lambda: bw.preprocess(do, o, lse))}
        r["plan_ms"] = bench(lambda: bw.plan_indices(q, k, c, scale, LOG_EPS, u, 32, 128))
        rows.append(log(r))
        del q, k, v, c, do, o, lse, dq, dk, dv, dc
        torch.cuda.empty_cache()
    # Best by the sum over T of dense time (the largest T dominates).
    for kind in ("sweep_dkdv", "sweep_dq"):
        score = {}
        for r in rows:
            if r["step"] == kind and "acp30_ms" in r:
                score.setdefault(tuple(r["cfg"]), []).append(r["dense_ms"] + r["acp30_ms"])
        full = {cfg: sum(v) for cfg, v in score.items() if len(v) == len(Ts)}
        if full:
            best[kind] = list(min(full, key=full.get))
    return rows, best


def compare(D, H, n_global, Ts, cfg, deadline):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    orig_default = bw.default_config
    bw.default_config = lambda q: cfg
    rows = []
    try:
        for T in Ts:
            if time.time() > deadline:
                break
            q, k, v, c, do = inputs(T, H, D, n_global)
            scale = D ** -0.5
            F = fwd_flops(q)
            u = u_for_delta(T)
            res = {"step": "compare", "D": D, "T": T, "B": q.shape[0]}
            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    lv = [t.detach().clone().requires_grad_() for t in (q, k, v)]

                    def sdpa_step():
                        with sdpa_kernel(backend):
                            torch.nn.functional.scaled_dot_product_attention(*lv, is_causal=True).backward(do)

                    def sdpa_fwd():
                        with sdpa_kernel(backend), torch.no_grad():
                            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                    res[f"{name}_fwd_ms"] = bench(sdpa_fwd)
                    res[f"{name}_fwdbwd_ms"] = triton.testing.do_bench(sdpa_step, warmup=10, rep=60, grad_to_none=lv,
                                                                       return_mode="median")
                except Exception as e:
                    res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            for name, log_eps, ub in (("dense", None, None), ("acp30", LOG_EPS, u), ("auto", LOG_EPS, None)):
                lv = [t.detach().clone().requires_grad_() for t in (q, k, v, c)]

                def step():
                    torch.ops.acp.fox_attention_fwd(*lv, None, log_eps, ub)[0].backward(do)

                def fwd_only():
                    with torch.no_grad():
                        torch.ops.acp.fox_attention_fwd(q, k, v, c, None, log_eps, ub)
                res[f"ours_{name}_fwd_ms"] = bench(fwd_only)
                res[f"ours_{name}_fwdbwd_ms"] = triton.testing.do_bench(step, warmup=10, rep=60, grad_to_none=lv,
                                                                        return_mode="median")
                o, lse = forward(q, k, v, c, scale, log_eps, ub)
                res[f"ours_{name}_bwd_ms"] = bench(lambda: bw.backward(do, q, k, v, c, o, lse, scale, log_eps, ub, cfg))
                if log_eps is not None:
                    st, _ = bw.plan_indices(q, k, c, scale, log_eps, ub, cfg.kv_block_m, cfg.kv_block_n)
                    res[f"ours_{name}_pruned_bwd_kv"] = pruned(st, T, cfg.kv_block_m, cfg.kv_block_n)
            res["ours_dense_fwdbwd_tflops"] = 3.5 * F / res["ours_dense_fwdbwd_ms"] / 1e9
            res["ours_dense_bwd_tflops"] = 2.5 * F / res["ours_dense_bwd_ms"] / 1e9
            if "cudnn_fwdbwd_ms" in res:
                res["cudnn_fwdbwd_tflops"] = 3.5 * F / res["cudnn_fwdbwd_ms"] / 1e9
                for name in ("dense", "acp30", "auto"):
                    res[f"ours_{name}_fwdbwd_vs_cudnn"] = res[f"ours_{name}_fwdbwd_ms"] / res["cudnn_fwdbwd_ms"]
                res["ours_dense_bwd_vs_cudnn_bwd"] = res["ours_dense_bwd_ms"] / (res["cudnn_fwdbwd_ms"] - res["cudnn_fwd_ms"])
            if "ours_acp30_pruned_bwd_kv" in res:
                p = res["ours_acp30_pruned_bwd_kv"]
                res["ours_acp30_bwd_over_ideal"] = res["ours_acp30_bwd_ms"] / (res["ours_dense_bwd_ms"] * (1 - p))
            rows.append(log(res))
            del q, k, v, c, do
            torch.cuda.empty_cache()
    finally:
        bw.default_config = orig_default
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="examples/results")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget for sweep + compare")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-smoke", action="store_true")
    ap.add_argument("--compare-T", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")}
    log({"step": "meta", **meta})
    result = {"meta": meta, "smoke": None if args.skip_smoke else smoke()}
    end = T0 + args.budget_s
    best = {}
    rows = []
    if not args.skip_sweep:
        r128, b128 = sweep(128, 16, 4, [2048, 16384], T0 + 0.55 * args.budget_s)
        r64, b64 = sweep(64, 12, 3, [4096, 16384], T0 + 0.75 * args.budget_s)
        rows += r128 + r64
        best = {"128": b128, "64": b64}
        log({"step": "best", **best})
    result["sweep"], result["best"] = rows, best

    def cfg_for(D):
        b = best.get(str(D), {})
        base = bw.default_config(torch.empty(1, 1, 1, D, device="cuda", dtype=torch.bfloat16))
        kv = b.get("sweep_dkdv", [base.kv_block_m, base.kv_block_n, base.kv_warps, base.kv_stages])
        qq = b.get("sweep_dq", [base.q_block_m, base.q_block_n, base.q_warps, base.q_stages])
        return bw.BackwardConfig(kv[0], kv[1], qq[0], qq[1], kv[2], kv[3], qq[2], qq[3])

    shipped = {D: bw.default_config(torch.empty(1, 1, 1, D, device="cuda", dtype=torch.bfloat16)) for D in (64, 128)}
    result["compare"] = compare(128, 16, 4, args.compare_T, shipped[128], end)
    result["compare"] += compare(64, 12, 3, [4096, 16384], shipped[64], end + 30)
    result["configs"] = {"128": shipped[128].__dict__, "64": shipped[64].__dict__,
                         "sweep_best_128": cfg_for(128).__dict__, "sweep_best_64": cfg_for(64).__dict__}
    (out / "backward_tuning.json").write_text(json.dumps(result, indent=1))
    log({"step": "done"})


if __name__ == "__main__":
    main()
