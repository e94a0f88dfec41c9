"""Benchmark: a packed batch costs what its documents cost (issue #12 item 3, H200).

8 documents of 2k tokens packed into one row of 16k (cu_seqlens) against 8 separate 2k calls (one call
per document, as a loop) and against one batched (B = 8, T = 2k) call; bf16, H = 16, D = 128, W1 gates
(12 local heads, 4 global). Forward and forward + backward, dense (log_eps=None) and ACP (log_eps=-10).
Target: packed within 1.15x of the 8 separate calls. Also a left-padded batch (B = 8, T = 2k, pads
0..7/8 of the row) against the unpadded batch, forward only.
Reported: median ms (triton.testing.do_bench), ratio packed / separate; JSON with date, GPU and versions.

  python examples/benchmarks/bench_packed.py --out examples/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import acp_compile  # noqa: E402
from helpers import W1_ON_CUDA, fox_inputs  # noqa: E402


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _leaves(*ts, grad):
    return [t.detach().clone().requires_grad_(grad) for t in ts]


def run(n_docs=8, doc_len=2048, H=16, D=128):
    T = n_docs * doc_len
    q, k, v, c = fox_inputs(1, H, H, T, T, D, dtype=torch.bfloat16, **W1_ON_CUDA)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros_like(c[..., :1]))
    cu = torch.arange(0, T + 1, doc_len, device="cuda", dtype=torch.int32)
    rows = {}
    for log_eps in (None, -10.0):
        for grad in (False, True):
            lq, lk, lv, lf = _leaves(q, k, v, log_f, grad=grad)
            do = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)

            def packed():
                o = acp_compile.fox_attention(lq, lk, lv, lf, log_eps=log_eps, cu_seqlens=cu)
                if grad:
                    o.backward(do)

            def separate():
                for a in range(0, T, doc_len):
                    b = a + doc_len
                    o = acp_compile.fox_attention(lq[:, :, a:b], lk[:, :, a:b], lv[:, :, a:b], lf[..., a:b],
                                                  log_eps=log_eps)
                    if grad:
                        o.backward(do[:, :, a:b])

            def fold(t):                   # (1, H, T, ...) -> (n_docs, H, doc_len, ...)
                return t.view(1, H, n_docs, doc_len, *t.shape[3:]).transpose(1, 2).reshape(
                    n_docs, H, doc_len, *t.shape[3:])

            def batched():                 # the same documents as one batch of n_docs rows
                o = acp_compile.fox_attention(fold(lq), fold(lk), fold(lv), fold(lf), log_eps=log_eps)
                if grad:
                    o.backward(fold(do))

            name = f"{'fwd+bwd' if grad else 'fwd'} {'dense' if log_eps is None else 'acp'}"
            ms = {"packed": _bench(packed), "separate": _bench(separate), "batched": _bench(batched)}
            ms["packed_over_separate"] = ms["packed"] / ms["separate"]
            rows[name] = ms
            print(f"{name:16s} packed {ms['packed']:.3f} ms  separate {ms['separate']:.3f} ms  batched "
                  f"{ms['batched']:.3f} ms  packed/separate {ms['packed_over_separate']:.3f}", flush=True)
    # left padding: B = n_docs rows of doc_len, row b padded by b/n_docs of its length
    qb, kb, vb, cb = fox_inputs(n_docs, H, H, doc_len, doc_len, D, dtype=torch.bfloat16, **W1_ON_CUDA)
    lfb = torch.diff(cb, dim=-1, prepend=torch.zeros_like(cb[..., :1]))
    pads = torch.arange(n_docs, device="cuda") * doc_len // n_docs
    mask = torch.arange(doc_len, device="cuda")[None, :] >= pads[:, None]
    padded = _bench(lambda: acp_compile.fox_attention(qb, kb, vb, lfb, key_padding_mask=mask))
    unpadded = _bench(lambda: acp_compile.fox_attention(qb, kb, vb, lfb))
    rows["fwd acp left-padded batch"] = {"padded": padded, "unpadded": unpadded}
    print(f"left-padded batch fwd acp: padded {padded:.3f} ms  unpadded {unpadded:.3f} ms", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for bench_packed.json")
    args = ap.parse_args()
    rows = run()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "workload": "8 x 2k documents, bf16, H 16, D 128, W1 gates"}
    if args.out:
        path = Path(args.out) / "bench_packed.json"
        path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print("wrote", path)


if __name__ == "__main__":
    main()
