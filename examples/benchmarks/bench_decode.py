"""Decode benchmark (issue 14): one new token (or a few) against a KV cache, bf16, B = 8, 16 query heads
of 128, W1 gates (12 decaying heads at -(30/1024) u, 4 global), MHA and GQA 16:4, against SDPA
without a gate in the same run. Ours: acp_compile.fox_decode dense (log_eps=None) and certified
(log_eps=-10 with the cache's running key-norm maxima, as a cache keeps them); the general op at
Tq = 1 as a compiled model calls it (op_dense, op_online computing its own key norms, op_online_knorm given them). Medians of
triton.testing.do_bench; JSON lines and decode.json under --out.

  python examples/benchmarks/bench_decode.py --T 4096 32768 131072 --out $OUT
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import acp_compile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--warps", type=int, nargs="+", default=[4], help="warps of the split kernel, each measured")
    ap.add_argument("--blocks-per-split", type=int, nargs="*", default=[4, 8, 32],
                    help="at the longest T: fox_decode certified and dense with these BLOCKS_PER_SPLIT too")
    a = ap.parse_args()
    from acp_compile.kernels.fox_triton import decode as decode_kernels
    rows = [{"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")}]
    print(json.dumps(rows[0]), flush=True)
    H, D = 16, 128
    for warps, Hkv, T in [(w, h, t) for w in a.warps for h in (16, 4) for t in a.T]:
        decode_kernels.SPLIT_WARPS = warps
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(a.B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(a.B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(a.B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
            rate = torch.full((H,), 30.0 / 1024, device="cuda")
            rate[12:] = 1e-6
            c = torch.cumsum(-rate[None, :, None] * (0.5 + torch.rand(a.B, H, T, device="cuda", generator=g)), -1)
            kmax = torch.linalg.vector_norm(k.float(), dim=-1).amax(-1)
            t = {}
            t["sdpa"] = triton.testing.do_bench(
                lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != H), warmup=10, rep=50)
            t["ours_dense"] = triton.testing.do_bench(
                lambda: acp_compile.fox_decode(q, k, v, c, log_eps=None), warmup=10, rep=50)
            t["ours_certified"] = triton.testing.do_bench(
                lambda: acp_compile.fox_decode(q, k, v, c, log_eps=-10.0, k_norm_max=kmax), warmup=10, rep=50)
            # the general op, as a model compiled with backend="acp" calls it at Tq = 1 (kernels/short_queries.py)
            op = torch.ops.acp.fox_attention_fwd
            kn = torch.linalg.vector_norm(k.float(), dim=-1)
            t["op_dense"] = triton.testing.do_bench(lambda: op(q, k, v, c, None, None, None), warmup=10, rep=50)
            t["op_online"] = triton.testing.do_bench(lambda: op(q, k, v, c, None, -10.0, None), warmup=10, rep=50)
            t["op_online_knorm"] = triton.testing.do_bench(
                lambda: op(q, k, v, c, None, -10.0, None, None, None, "online", None, kn), warmup=10, rep=50)
            if T == max(a.T):
                default_bps = decode_kernels.BLOCKS_PER_SPLIT
                for bps in a.blocks_per_split:
                    decode_kernels.BLOCKS_PER_SPLIT = bps
                    t[f"ours_dense_bps{bps}"] = triton.testing.do_bench(
                        lambda: acp_compile.fox_decode(q, k, v, c, log_eps=None), warmup=10, rep=50)
                    t[f"ours_certified_bps{bps}"] = triton.testing.do_bench(
                        lambda: acp_compile.fox_decode(q, k, v, c, log_eps=-10.0, k_norm_max=kmax), warmup=10, rep=50)
                decode_kernels.BLOCKS_PER_SPLIT = default_bps
            row = {"Hkv": Hkv, "T": T, "warps": warps, **{f"{n}_ms": x for n, x in t.items()},
                   **{f"{n}_over_sdpa": x / t["sdpa"] for n, x in t.items() if n != "sdpa"}}
            del q, k, v, c
        except Exception as e:  # one case must not lose the others (OOM at 128k, ...)
            row = {"Hkv": Hkv, "T": T, "warps": warps, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(a.out, "decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
