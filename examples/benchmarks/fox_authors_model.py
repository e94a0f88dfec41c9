"""The FoX authors' Hugging Face model (ForgettingTransformerForCausalLM, their repository's src/, not
vendored: pass its folder) trained eagerly and under torch.compile(backend="acp"): tokens/s and the
loss curve of each, same initial weights and batches (issue 11, item 11).

Model: their FoX-Pro settings at W2's size (DESIGN.md section 5: d_model 768, 12 layers, 12 heads of 64,
QK RMSNorm, output gate and output norm, k/v shift, SwiGLU ratio 3.5, vocabulary 50304 tied), fused
norms and cross-entropy as they ship them, bf16 autocast, fused AdamW, 32768 tokens per step. Gates
with W2's initialisation (9 of 12 heads with bias 3.516, about -30/1024 per token; 3 with 13.8, about
-1e-6; weights std 0.002) or their default (--gates default). Eager runs their Triton kernels; under
backend "acp" the pass redirects their kernels (acp_compile/third_party.py, third_party_layers.py)
and their attention becomes our op. Their log_pruning_tolerance stays None (their ACP off) unless
--their-acp is given, as in their default config.

  python examples/benchmarks/fox_authors_model.py --src .fox_src/src --T 16384 4096 --out $OUT
  python examples/benchmarks/fox_authors_model.py --src .fox_src/src --smoke      # CPU, tiny, acp only
  python examples/benchmarks/fox_authors_model.py --src .fox_src/src --generate 64 --prompt 2048 --out $OUT
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

TOKENS = 32768


def build(args, T, device):
    from forgetting_transformer.model.forgetting_transformer import (
        ForgettingTransformerConfig, ForgettingTransformerForCausalLM,
    )
    small = args.smoke
    cfg = ForgettingTransformerConfig(
        vocab_size=512 if small else 50304, hidden_size=64 if small else 768,
        num_hidden_layers=2 if small else 12, num_heads=4 if small else 12, hidden_ratio=3.5,
        use_output_gate=True, use_output_norm=True, qk_norm=True, use_k_shift=True, use_v_shift=True,
        fuse_norm=not small, fuse_cross_entropy=not small, tie_word_embeddings=True,
        max_position_embeddings=T, use_cache=False, log_pruning_tolerance=-10.0 if args.their_acp else None,
    )
    torch.manual_seed(0)
    model = ForgettingTransformerForCausalLM(cfg).to(device)
    if args.gates == "w2":
        with torch.no_grad():
            for layer in model.model.layers:
                proj = layer.attn.fgate_proj
                H = proj.bias.numel()
                n_local = (3 * H) // 4
                proj.bias[:n_local] = 3.516
                proj.bias[n_local:] = 13.8
                proj.weight.normal_(0.0, 0.002)
    return model


def run(args, T, mode, device):
    import acp_compile  # noqa: F401  (registers the backend and the op)
    model = build(args, T, device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")
    B = max(1, (64 if args.smoke else TOKENS) // T)
    gen = torch.Generator(device="cpu").manual_seed(1)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (B, T), generator=gen).to(device) for _ in range(args.steps)]
    fwd = model if mode == "eager" else torch.compile(model, backend="acp")

    def step(ids):
        # their model returns the per-token loss (reduction="none") and does not shift the labels
        labels = torch.roll(ids, -1, dims=1)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = fwd(input_ids=ids, labels=labels).loss.float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    times, losses = [], []
    for i, ids in enumerate(batches):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step(ids)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    timed = times[args.warmup:]
    row = {"T": T, "mode": mode, "gates": args.gates, "B": B, "losses": losses,
           "median_step_s": statistics.median(timed) if timed else None,
           "tokens_per_s": B * T / statistics.median(timed) if timed else None,
           "first_step_s": times[0]}
    if device == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    if mode == "acp":
        from acp_compile._torch_private import acp_counters
        # calls of their attention function redirected to our op while Dynamo traced (third_party.py);
        # rewritten_sites counts only sites the FX pass found, which their model has none of
        row["redirected_calls"] = int(acp_counters()["fox_substituted"])
        recs = acp_compile.compilations()
        row["rewritten_sites"] = sum(len(r.sites) for r in recs)
        row["near_misses"] = [str(m)[:200] for r in recs for m in r.near_misses][:12]
        row["fell_back"] = [r.fell_back for r in recs if r.fell_back]
        acp_compile.clear_compilations()
    return row


@torch.no_grad()
def greedy(model, ids, n_new):
    """Greedy decoding with their cache, by hand (their model class does not inherit Hugging Face's
    GenerationMixin under transformers >= 4.50): a prefill, then one token per forward."""
    out = model(input_ids=ids, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(n_new - 1):
        out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([ids] + tokens, dim=1)


def generate(args, device):
    """Greedy decoding of their model (W2 gates, bf16 autocast as in training, their FgateDynamicCache through
    a greedy loop, greedy()): eager, then model.forward under torch.compile(backend="acp", dynamic=True), same prompt. The
    tokens of both and the time per new token (prefill included, compile excluded by a first run)."""
    import acp_compile
    model = build(args, args.prompt + args.generate, device)
    model.config.use_cache = True
    model = model.eval()
    gen = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen).to(device)
    rows = []
    eager_forward = model.forward
    for mode in args.modes:
        if mode == "acp":
            torch._dynamo.reset()
            acp_compile.clear_compilations()
            model.forward = torch.compile(eager_forward, backend="acp", dynamic=True)
        row = {"mode": mode, "prompt": args.prompt, "new_tokens": args.generate}
        try:
            times = []
            for _ in range(2):                  # the first run compiles (acp) or warms up (eager)
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast(device, dtype=torch.bfloat16):
                    out = greedy(model, ids, args.generate)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row.update(tokens=out[0, args.prompt:].tolist(), first_run_s=times[0],
                       ms_per_token=1e3 * times[1] / args.generate)
            if mode == "acp":
                from acp_compile._torch_private import acp_counters
                row["redirected_calls"] = int(acp_counters()["fox_substituted"])
                row["near_misses"] = [str(m)[:200] for r in acp_compile.compilations() for m in r.near_misses][:6]
        except Exception as e:  # noqa: BLE001 - report it, keep the other mode's row
            row.update(error=f"{type(e).__name__}: {str(e)[:400]}", trace=traceback.format_exc()[-1500:])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("tokens", "trace")}), flush=True)
    model.forward = eager_forward
    if all("tokens" in r for r in rows):
        a, b = rows[0]["tokens"], rows[1]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(json.dumps({"identical_prefix_tokens": same, "of": len(a)}), flush=True)
        rows.append({"identical_prefix_tokens": same, "of": len(a)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="the authors' src/ folder (holds forgetting_transformer/)")
    ap.add_argument("--T", type=int, nargs="+", default=[16384, 4096])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gates", choices=["w2", "default"], default="w2")
    ap.add_argument("--modes", nargs="+", default=["eager", "acp"])
    ap.add_argument("--their-acp", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, backend acp only")
    ap.add_argument("--generate", type=int, default=0, help="greedy-decode this many tokens instead of training")
    ap.add_argument("--prompt", type=int, default=512, help="prompt length for --generate")
    ap.add_argument("--out", default="/tmp")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.src).resolve()))
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.T, args.modes, args.steps, args.warmup = [64], ["acp"], 3, 1
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(json.dumps(meta), flush=True)
    rows = [meta]
    if args.generate:
        rows += generate(args, device)
        Path(args.out, "fox_authors_generate.json").write_text(json.dumps(rows, indent=1))
        return
    for T in args.T:
        for mode in args.modes:
            try:
                row = run(args, T, mode, device)
            except Exception as e:  # one failing case must not lose the others
                row = {"T": T, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:400]}",
                       "trace": traceback.format_exc()[-1500:]}
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
            rows.append(row)
    Path(args.out, "fox_authors_model.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
