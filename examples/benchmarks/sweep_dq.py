"""Times the dq kernel of the Triton backward alone over candidate tiles on W1 (bf16, B * T = 32768,
16 heads of 128; DESIGN.md section 5), dense and with ACP at delta = -30, with registers and spills,
and prints the ACP_BWD_CONFIG string of the best (sum of dense and ACP time). One device call:

  python examples/benchmarks/sweep_dq.py --T 16384 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_backward import LOG_EPS, bench, inputs, regs, u_for_delta  # noqa: E402

from acp_compile.kernels.fox_triton import backward as bw  # noqa: E402
from acp_compile.kernels.fox_triton.forward import forward  # noqa: E402

# (q_block_m, q_block_n, q_warps, q_stages); the dk/dv part stays the shipped D = 128 row.
CANDIDATES = [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (128, 32, 8, 4), (64, 32, 4, 3),
              (64, 64, 4, 3), (128, 16, 4, 4), (256, 32, 8, 3), (64, 128, 4, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--out", default="/tmp")
    args = ap.parse_args()
    T, D, H = args.T, 128, 16
    q, k, v, c, do = inputs(T, H, D, 4)
    scale = D ** -0.5
    o, lse = forward(q, k, v, c, scale, None, None)
    delta, row = bw.preprocess(do, o, lse)
    dq, dc = torch.empty_like(q), torch.empty_like(c)
    u = u_for_delta(T)
    base = bw.HOPPER_D128
    rows = []
    for qbm, qbn, w, s in CANDIDATES:
        cfg = bw.BackwardConfig(base.kv_block_m, base.kv_block_n, qbm, qbn, base.kv_warps, base.kv_stages, w, s)
        r = {"T": T, "cfg": [qbm, qbn, w, s], "shares_plan": cfg.shares_plan}
        try:
            r.update(regs(bw.launch_dq(q, k, v, c, do, row, delta, None, dq, dc, scale, cfg)))
            r["dense_ms"] = bench(lambda: bw.launch_dq(q, k, v, c, do, row, delta, None, dq, dc, scale, cfg))
            st, _ = bw.plan_indices(q, k, c, scale, LOG_EPS, u, qbm, qbn)
            r["acp30_ms"] = bench(lambda: bw.launch_dq(q, k, v, c, do, row, delta, st, dq, dc, scale, cfg))
            r["exact_idle_ms"] = bench(lambda: bw.launch_dq(q, k, v, c, do, row, delta, st, dq, dc, scale, cfg, True))
        except Exception as e:  # one candidate that does not compile must not lose the others
            r["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        print(json.dumps(r), flush=True)
        rows.append(r)
    ok = [r for r in rows if "acp30_ms" in r and r["shares_plan"]]
    best = min(ok, key=lambda r: r["dense_ms"] + r["acp30_ms"])
    qbm, qbn, w, s = best["cfg"]
    pick = f"{base.kv_block_m},{base.kv_block_n},{qbm},{qbn},{base.kv_warps},{base.kv_stages},{w},{s}"
    print("picked ACP_BWD_CONFIG=" + pick, flush=True)
    Path(args.out, "sweep_dq.json").write_text(json.dumps({"rows": rows, "pick": pick}, indent=1))
    Path(args.out, "bwd_pick.txt").write_text(pick)


if __name__ == "__main__":
    main()
