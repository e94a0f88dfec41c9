"""Sample from a FoX model with a KV cache, the decoding steps compiled with backend="acp".

    python examples/train.py --save fox_small.pt
    python examples/generate.py --checkpoint fox_small.pt --prompt "def main(" --tokens 200
    python examples/generate.py --checkpoint fox_small.pt --temperature 0.8 --seed 1

The prompt is processed in one call (Tq = Tk = prompt length); each following step feeds one token
(Tq = 1) against the cache of keys, values and cumulative forget gates (Tk = all positions so far).
Both shapes go through torch.compile, so each step's attention runs in the pruned op. The output
equals decoding without a cache up to the ACP tolerance (test_examples.py checks the logits).
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="written by examples/train.py --save")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small", help="only without --checkpoint")
    p.add_argument("--prompt", default="def __init__(self")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["acp", "inductor", "eager"], default="acp")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    model = load_model(a.checkpoint, a.config, a.device)
    prompt = encode_text(a.prompt)[None].to(a.device)
    generator = torch.Generator().manual_seed(a.seed)
    tokens, _ = generate(compiled_decoder(model, a.backend), prompt, a.tokens, a.temperature, a.top_k, generator)
    print(decode_bytes(tokens[0]))


if __name__ == "__main__":
    main()
