"""Sample from a FoX model with a KV cache; print tokens/s and the cache's memory.

    python examples/generate.py                                            # tiny untrained model, CPU, seconds
    python examples/train.py --save fox_small.pt
    python examples/generate.py --checkpoint fox_small.pt --prompt "def main(" --tokens 200
    python examples/generate.py --config tiny --tokens 300 --compare      # eviction on / off / dense baseline

Default (--cache paged): acp_compile's FoxKVCache (examples/fox_cached.py), one per layer, with certified
eviction: pages of a local head's keys that no later query can need are freed (the bound on future
logits comes from the QK RMSNorm weights). Each step has static shapes, so it is compiled once
(torch.compile(fullgraph=True, dynamic=False); mode="reduce-overhead" on CUDA for CUDA graphs).
--cache concat is the model's own cache (torch.cat of k, v, c every step, compiled with dynamic shapes,
attention rewritten by backend="acp"). --compare runs the paged cache with and without eviction and the
dense baseline (the model's eager attention with its concatenated cache) and prints one line each.
The output equals decoding without a cache up to the ACP tolerance (tests/test_examples.py,
tests/test_kv_cache_compile.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import decode_bytes, encode_text  # noqa: E402
from fox_model import CONFIGS, FoxLM  # noqa: E402
from fox_cached import CachedFoxLM  # noqa: E402

import time  # noqa: E402


def compiled_decoder(model: FoxLM, backend: str = "acp", options: dict | None = None):
    """model.forward_with_cache under torch.compile; dynamic shapes, since Tk grows every step."""
    if backend == "eager":
        return model.forward_with_cache
    kwargs = {"options": options} if options else {}
    return torch.compile(model.forward_with_cache, backend=backend, dynamic=True, **kwargs)


def next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """logits (B, vocab) -> (B, 1): greedy when temperature == 0, else sampled from softmax(logits / t)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


@torch.no_grad()
def generate(decoder, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """prompt (B, T0) -> (tokens (B, T0 + n), per-step logits (B, n, vocab)) with a KV cache.
    decoder(idx, cache) is model.forward_with_cache, compiled or not."""
    logits, cache = decoder(prompt, None)
    tokens, step_logits = [prompt], []
    for _ in range(max_new_tokens):
        last = logits[:, -1]                                                  # (B, vocab)
        step_logits.append(last)
        token = next_token(last, temperature, top_k, generator)              # (B, 1)
        tokens.append(token)
        logits, cache = decoder(token, cache)
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)


@torch.no_grad()
def generate_without_cache(model_forward, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
                           top_k: int | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The same sampling loop, recomputing the whole prefix every step (no cache): the check for generate()."""
    tokens, step_logits = prompt, []
    for _ in range(max_new_tokens):
        last = model_forward(tokens)[:, -1]
        step_logits.append(last)
        tokens = torch.cat([tokens, next_token(last, temperature, top_k, generator)], dim=1)
    return tokens, torch.stack(step_logits, dim=1)


@torch.no_grad()
def logits_without_cache(model_forward, tokens: Tensor, n_prompt: int) -> Tensor:
    """The logits that predict tokens[:, n_prompt:], each from a full recompute of its prefix:
    (B, n, vocab). With teacher forcing, one causal forward over tokens[:, :-1] gives them all."""
    return model_forward(tokens[:, :-1])[:, n_prompt - 1:]


def load_model(checkpoint: Path | None, config: str, device) -> FoxLM:
    if checkpoint is None:
        print("no --checkpoint given: sampling from an untrained model (run examples/train.py --save PATH first)",
              file=sys.stderr)
        return FoxLM(CONFIGS[config]()).to(device).eval()
    state = torch.load(checkpoint, map_location=device)
    model = FoxLM(CONFIGS[state["config"]]()).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def generate_paged(dec: CachedFoxLM, step, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
                   top_k: int | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """As generate(), with the paged cache: dec.prefill on the prompt, then step (dec, compiled or not) per token."""
    dec.reset()
    logits = dec.prefill(prompt)
    tokens, step_logits = [prompt], []
    for _ in range(max_new_tokens):
        last = logits[:, -1]
        step_logits.append(last.clone())
        token = next_token(last, temperature, top_k, generator)
        tokens.append(token)
        logits = step(token)
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)


def compiled_step(dec: CachedFoxLM, backend: str):
    """The decoding step of the paged cache under torch.compile: static shapes, one graph for every step."""
    if backend == "eager":
        return dec
    cuda = dec.model.embed.weight.is_cuda
    mode = "reduce-overhead" if cuda and backend in ("inductor", "acp") else None
    return torch.compile(dec, backend=backend, mode=mode, fullgraph=True, dynamic=False)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def concat_cache_bytes(cache: list) -> int:
    return sum(t.numel() * t.element_size() for layer in cache for t in layer)


def run_paged(model, prompt, tokens: int, evict: bool, backend: str, log_eps=-10.0, **sampling) -> dict:
    """One generation with the paged cache: tokens/s over the decoding steps and the cache's bytes."""
    dec = CachedFoxLM(model, batch=prompt.shape[0], max_length=prompt.shape[1] + tokens + 1, evict=evict,
                      log_eps=log_eps, sync_checks=False)
    step = compiled_step(dec, backend)
    generate_paged(dec, step, prompt, min(tokens, 3), **sampling)             # compile and warm up
    _sync(prompt.device)
    t0 = time.perf_counter()
    out, _ = generate_paged(dec, step, prompt, tokens, **sampling)
    _sync(prompt.device)
    dt = time.perf_counter() - t0
    return {"name": f"paged cache, eviction {'on' if evict else 'off'}", "tokens": out,
            "tokens_per_s": tokens * prompt.shape[0] / dt, **dec.memory()}


def run_dense_baseline(model, prompt, tokens: int, **sampling) -> dict:
    """The model's own attention (dense, eager) with its concatenated cache."""
    _sync(prompt.device)
    t0 = time.perf_counter()
    logits, cache = model.forward_with_cache(prompt, None)
    out = [prompt]
    for _ in range(tokens):
        token = next_token(logits[:, -1], **sampling)
        out.append(token)
        logits, cache = model.forward_with_cache(token, cache)
    _sync(prompt.device)
    dt = time.perf_counter() - t0
    nbytes = concat_cache_bytes(cache)
    return {"name": "dense baseline (eager, concatenated cache)", "tokens": torch.cat(out, dim=1),
            "tokens_per_s": tokens * prompt.shape[0] / dt, "reserved": nbytes, "in_use": nbytes, "peak": nbytes}


def print_run(r: dict) -> None:
    mib = 2.0 ** 20
    print(f"{r['name']:<44} {r['tokens_per_s']:9.1f} tokens/s   cache in use {r['in_use'] / mib:8.3f} MiB   "
          f"peak {r['peak'] / mib:8.3f} MiB   reserved {r['reserved'] / mib:8.3f} MiB")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="written by examples/train.py --save")
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="only without --checkpoint")
    p.add_argument("--prompt", default="def __init__(self")
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", choices=["paged", "concat"], default="paged")
    p.add_argument("--no-evict", action="store_true", help="paged cache without eviction")
    p.add_argument("--compare", action="store_true", help="paged with / without eviction and the dense baseline")
    p.add_argument("--backend", choices=["acp", "inductor", "aot_eager", "eager"], default=None,
                   help="default: acp on CUDA, eager on CPU (inductor's C++ compile is slow on small CPUs)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    backend = a.backend or ("acp" if torch.device(a.device).type == "cuda" else "eager")
    model = load_model(a.checkpoint, a.config, a.device)
    prompt = encode_text(a.prompt)[None].to(a.device)
    sampling = dict(temperature=a.temperature, top_k=a.top_k)
    if a.cache == "concat" and not a.compare:
        generator = torch.Generator().manual_seed(a.seed)
        tokens, _ = generate(compiled_decoder(model, backend), prompt, a.tokens, a.temperature, a.top_k, generator)
        print(decode_bytes(tokens[0]))
        return
    runs = [run_paged(model, prompt, a.tokens, not a.no_evict, backend, **sampling,
                      generator=torch.Generator().manual_seed(a.seed))]
    if a.compare:
        runs.append(run_paged(model, prompt, a.tokens, a.no_evict, backend, **sampling,
                              generator=torch.Generator().manual_seed(a.seed)))
        runs.append(run_dense_baseline(model, prompt, a.tokens, **sampling,
                                       generator=torch.Generator().manual_seed(a.seed)))
    print(decode_bytes(runs[0]["tokens"][0]))
    print()
    for r in runs:
        print_run(r)
    return runs


if __name__ == "__main__":
    main()
