"""ALiBi through ACP (issue #12 item 1): attention kernels and a small ALiBi language model, one run.

Attention: 16 heads with the ALiBi paper's geometric slopes 2^(-8/16 * h), bf16, head dim 128, B * T = 32768
tokens, causal, at T = 4k, 16k, 32k; forward and forward + backward, medians of triton.testing.do_bench:
  acp_op        acp_compile.fox_attention with the static decay log f = -slope_h per token (c = -slope_h * t,
                the same attention as ALiBi's slope_h * (j - i)), automatic threshold log_eps = -10
  acp_compiled  eager ALiBi code (logits + slope_h * j, causal masked_fill, softmax, @ v) under
                torch.compile(backend="acp"): the pass proves the one-sided bias and emits the op
  sdpa_bias     F.scaled_dot_product_attention with the float ALiBi bias plus the causal -inf, (1, H, T, T) bf16
                (built outside the timed region)
  flex_alibi    FlexAttention (compiled) with an ALiBi score_mod and a causal block mask built once
Model: a small ALiBi language model (6 layers, d = 512, 8 heads, SwiGLU, tied head; attention written as
eager ALiBi code) trained for a few AdamW steps at T = 16k under torch.compile(backend="acp") and under the
default torch.compile() (inductor), bf16 autocast; tokens/s (median step after warm-up) and peak memory.

Every case is fenced: an out-of-memory error or any other error is reported as that case's result and the
run goes on. Results are JSON lines on stdout and one JSON file under --out. A budget (--budget-s, of which
--lm-reserve-s is kept for the model) stops starting new cases, which are then listed as skipped; the
defaults aim at under 4 minutes on an H200 (compiles dominate: raise --budget-s if cases are skipped).

  python examples/benchmarks/bench_alibi.py --out examples/results          # H200
  python examples/benchmarks/bench_alibi.py --smoke                           # CPU, tiny sizes, seconds
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import acp_compile

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- ALiBi
def alibi_slopes(n_heads: int, device=None) -> torch.Tensor:
    """The ALiBi paper's geometric slopes 2^(-8/n * h), h = 1..n (n a power of two)."""
    return torch.tensor([2.0 ** (-8.0 / n_heads * h) for h in range(1, n_heads + 1)], device=device)


def eager_alibi_attention(q, k, v, slopes):
    """ALiBi as model code writes it (BLOOM's one-sided slope * j), causal, softmax in fp32."""
    T = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    s = s + (slopes.view(1, -1, 1, 1) * torch.arange(T, device=q.device).view(1, 1, 1, T)).to(s.dtype)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(v.dtype) @ v


class AlibiAttentionModule(nn.Module):
    def __init__(self, n_heads: int, device):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads, device))

    def forward(self, q, k, v):
        return eager_alibi_attention(q, k, v, self.slopes)


def alibi_bias_matrix(slopes, T, dtype, device):
    """(1, H, T, T) float bias slope_h * (j - i) with -inf above the diagonal, built one head at a time (at 32k
    the result alone is 32 GiB in bf16; building it in one fp32 expression would need four times that)."""
    pos = torch.arange(T, device=device, dtype=torch.float32)
    rel = pos[None, :] - pos[:, None]
    causal = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
    out = torch.empty(1, slopes.numel(), T, T, dtype=dtype, device=device)
    for h in range(slopes.numel()):
        out[0, h] = (slopes[h] * rel).masked_fill_(causal, float("-inf"))
    return out


# ----------------------------------------------------------------------------------------------- timing
def timer(device: str, warmup_ms: int, rep_ms: int):
    if device == "cuda":
        import triton

        def bench(fn, grad_to_none=None):
            return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                           return_mode="median")
        return bench

    def bench_cpu(fn, grad_to_none=None):
        fn()
        times = []
        for _ in range(3):
            for t in grad_to_none or ():
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    return bench_cpu


def fenced(name: str, fn, results: list, **fields) -> dict:
    """Runs one case; an OOM or any error becomes the case's result instead of ending the run."""
    rec = {"case": name, **fields}
    try:
        rec.update(fn())
    except torch.OutOfMemoryError:
        rec["error"] = "out of memory (skipped)"
    except Exception as err:  # noqa: BLE001 - one failing case must not lose the others
        rec["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rec["trace"] = traceback.format_exc(limit=3)[-600:]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps({k: v for k, v in rec.items() if k != "trace"}), flush=True)
    results.append(rec)
    return rec


# ------------------------------------------------------------------------------------------- attention
def attention_cases(args, bench, results, deadline):
    dev, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    H, D = args.heads, args.head_dim
    slopes = alibi_slopes(H, dev)
    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = (torch.compile(flex_attention), create_block_mask)
        except Exception as err:  # noqa: BLE001
            print(json.dumps({"case": "flex_alibi", "error": f"flex unavailable: {err}"}), flush=True)
    for T in args.T:
        B = max(1, args.tokens // T)
        g = torch.Generator(device=dev).manual_seed(T)
        q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
        do = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
        log_f = (-slopes).view(1, H, 1).expand(B, H, T).contiguous()
        variants = {"acp_op": lambda: acp_compile.fox_attention(q, k, v, log_f, log_eps=args.log_eps)}
        torch.compiler.reset()
        compiled = torch.compile(AlibiAttentionModule(H, dev), backend="acp",
                                 options={"log_eps": args.log_eps})
        variants["acp_compiled"] = lambda: compiled(q, k, v)
        cell = {}

        def sdpa():
            if "bias" not in cell:
                cell["bias"] = alibi_bias_matrix(slopes, T, dtype, dev)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=cell["bias"])
        variants["sdpa_bias"] = sdpa
        if flex is not None:
            flex_fn, create_block_mask = flex

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + slopes[h] * (kv_idx - q_idx)

            def flex_call():
                if "block_mask" not in cell:
                    cell["block_mask"] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=dev)
                return flex_fn(q, k, v, score_mod=score_mod, block_mask=cell["block_mask"])
            variants["flex_alibi"] = flex_call
        for name, fn in variants.items():
            for mode in ("fwd", "fwd_bwd"):
                if time.time() > deadline:
                    results.append({"case": name, "T": T, "mode": mode, "error": "skipped: time budget spent"})
                    continue

                def case(fn=fn, mode=mode):
                    # The forward is timed with grad-requiring inputs too (as in training), so one compile
                    # serves both modes; the first call compiles and warms outside the timing.
                    if mode == "fwd":
                        fn()
                        ms = bench(fn)
                    else:
                        fn().backward(do)
                        ms = bench(lambda: fn().backward(do), grad_to_none=[q, k, v])
                    return {"ms": round(ms, 4)}
                fenced(name, case, results, T=T, B=B, mode=mode, H=H, D=D, dtype=str(dtype))
        del q, k, v, do, cell, compiled


# ------------------------------------------------------------------------------------------------ model
class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, device):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        hidden = max(64, (8 * d // 3) // 64 * 64)          # SwiGLU width, a multiple of 64
        self.up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.register_buffer("slopes", alibi_slopes(n_heads, device))

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        o = eager_alibi_attention(q, k, v, self.slopes)
        x = x + self.proj(o.transpose(1, 2).reshape(B, T, d))
        a, b = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(a) * b)


class AlibiLM(nn.Module):
    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, device):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, n_heads, device) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk(x)
        logits = self.norm(x) @ self.emb.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def model_case(args, backend: str) -> dict:
    dev = args.device
    torch.manual_seed(0)
    torch.compiler.reset()
    acp_compile.clear_compilations()
    model = AlibiLM(args.vocab, args.d_model, args.layers, args.lm_heads, dev).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=dev == "cuda")
    if backend == "acp":
        step_model = torch.compile(model, backend="acp")
    else:
        step_model = torch.compile(model)
    T, B = args.lm_T, args.lm_batch
    g = torch.Generator(device=dev).manual_seed(1)
    data = torch.randint(0, args.vocab, (args.lm_steps + args.lm_warmup, B, T + 1), device=dev, generator=g)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    amp = torch.autocast(dev, dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    for s in range(args.lm_steps + args.lm_warmup):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            loss = step_model(data[s, :, :-1], data[s, :, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        if s >= args.lm_warmup:
            times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
    sites = sum(len(r.sites) for r in acp_compile.compilations()) if backend == "acp" else None
    med = statistics.median(times)
    return {"tokens_per_s": round(B * T / med, 1), "step_ms": round(1e3 * med, 2), "losses": losses,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if dev == "cuda" else None,
            "acp_sites": sites}


# ------------------------------------------------------------------------------------------------- main
def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = None
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "python": platform.python_version(), "commit": commit, "device": device}
    if device == "cuda":
        import triton
        env.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
    return env


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (a check that the script runs)")
    p.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--tokens", type=int, default=32768, help="B * T of the attention cases")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--log-eps", type=float, default=-10.0)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--lm-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--lm-T", type=int, default=16384)
    p.add_argument("--lm-batch", type=int, default=1)
    p.add_argument("--lm-steps", type=int, default=5)
    p.add_argument("--lm-warmup", type=int, default=2)
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--budget-s", type=float, default=200.0, help="start no new case after this many seconds")
    p.add_argument("--lm-reserve-s", type=float, default=110.0,
                   help="of the budget, kept for the model cases (attention cases stop starting earlier)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="folder for alibi_bench_<date>.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        args.T, args.tokens, args.heads, args.head_dim = [64, 128], 128, 4, 16
        args.layers, args.d_model, args.lm_heads, args.vocab = 2, 64, 4, 256
        args.lm_T, args.lm_batch, args.lm_steps, args.lm_warmup = 64, 1, 2, 1
        args.no_flex = True                  # FlexAttention on CPU: no backward (README); GPU only here
    return args


def main(argv=None) -> list:
    args = parse(argv)
    t0 = time.time()
    deadline = t0 + args.budget_s
    env = environment(args.device)
    print(json.dumps({"environment": env}), flush=True)
    results: list = []
    bench = timer(args.device, args.warmup_ms, args.rep_ms)
    attention_cases(args, bench, results, deadline - (0 if args.no_model else args.lm_reserve_s))
    if not args.no_model:
        for backend in ("acp", "inductor"):
            if time.time() > deadline:
                results.append({"case": f"lm_{backend}", "error": "skipped: time budget spent"})
                continue
            fenced(f"lm_{backend}", lambda backend=backend: model_case(args, backend), results, T=args.lm_T,
                   B=args.lm_batch, layers=args.layers, d_model=args.d_model, heads=args.lm_heads)
    payload = {"environment": env, "seconds": round(time.time() - t0, 1), "args": vars(args), "results": results}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M")
        path = args.out / f"alibi_bench_{stamp}.json"
        path.write_text(json.dumps(payload, indent=1, default=str))
        print(json.dumps({"wrote": str(path)}), flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
