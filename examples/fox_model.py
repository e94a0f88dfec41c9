"""A FoX ("Forgetting Transformer", Pro variant) language model in plain PyTorch.

Written the way a researcher writes it, with no knowledge of acp_compile: the attention is spelled
out (forget gate, cumulative sum, decay bias, causal mask, softmax, @ v). torch.compile(model,
backend="acp") finds that attention in the graph and replaces it with the pruned kernel.

Notation (one attention layer):
  x       (B, T, d_model) input of the block (after RMSNorm)
  q, k, v (B, H, T, D)    per-head projections; q and k go through a per-head RMSNorm ("QK norm")
  log_f   (B, H, T) fp32  log forget gate, logsigmoid(x @ w_f + b_f), one scalar per head and token
  c       (B, H, T) fp32  cumulative sum of log_f over time (never increases)
  s_ij    = q_i . k_j / sqrt(D) + c_i - c_j   for key j at or before query i, -inf after it
  o       = softmax_j(s) @ v, then per-head RMSNorm, then times sigmoid(x @ w_g) (output gate)

With a KV cache, the Tq new queries sit at the last Tq of Tk positions, so the causal mask is
offset by Tk - Tq; c of the cached keys is kept so that the decay bias is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Forget-gate biases of the paper's initialisation (DESIGN.md, workload W2):
# sigmoid(3.516) = exp(-30/1024) (about 30 nats of decay per 1024 tokens: a local head) and
# sigmoid(13.8) = exp(-1e-6) (practically no decay: a global head). 3 of every 4 heads are local.
LOCAL_FGATE_BIAS = 3.516
GLOBAL_FGATE_BIAS = 13.8
FGATE_WEIGHT_STD = 0.002


@dataclass(frozen=True)
class FoxConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 32
    mlp_ratio: float = 3.5
    local_fgate_bias: float = LOCAL_FGATE_BIAS
    global_fgate_bias: float = GLOBAL_FGATE_BIAS
    local_head_fraction: float = 0.75
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def n_local_heads(self) -> int:
        return round(self.n_heads * self.local_head_fraction)

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.d_model / 32)) * 32


def small_config(**overrides) -> FoxConfig:
    """CPU demo size (about 1M parameters). Local heads decay faster than the paper's (about 30
    nats per 128 tokens instead of per 1024) so that pruning shows up at a CPU-sized context."""
    cfg = FoxConfig(local_fgate_bias=1.33)   # sigmoid(1.33) = exp(-0.234): ~30 nats per 128 tokens
    return replace(cfg, **overrides)


def tiny_config(**overrides) -> FoxConfig:
    """Test size: a few seconds of CPU per step."""
    cfg = FoxConfig(d_model=64, n_layers=2, n_heads=4, head_dim=16, local_fgate_bias=1.33)
    return replace(cfg, **overrides)


def paper_125m_config(vocab_size: int = 50304, **overrides) -> FoxConfig:
    """The paper's 125M FoX Pro: d_model 768, 12 layers, 12 heads of dim 64, SwiGLU ratio 3.5."""
    cfg = FoxConfig(vocab_size=vocab_size, d_model=768, n_layers=12, n_heads=12, head_dim=64)
    return replace(cfg, **overrides)


CONFIGS = {"tiny": tiny_config, "small": small_config, "125m": paper_125m_config}


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose output keeps the input's dtype, as the fused norms of FoX's reference code do.
    (nn.RMSNorm alone returns fp32 for a bf16 input with an fp32 weight under autocast on some torch
    versions, which would leave q and k in fp32 next to a bf16 v.)"""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).to(x.dtype)


class ForgettingAttention(nn.Module):
    def __init__(self, cfg: FoxConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.fgate_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=True)     # one forget gate per head
        self.ogate_proj = nn.Linear(cfg.d_model, inner, bias=False)          # output gate
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.o_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)

    def split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)        # (B, H, T, D)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor, Tensor] | None = None):
        """x (B, Tq, d_model); cache (k, v, c) of the previous Tk - Tq positions or None.
        Returns the output (B, Tq, d_model) and the cache (k, v, c) of all Tk positions."""
        B, Tq, _ = x.shape
        q = self.q_norm(self.split_heads(self.q_proj(x)))                      # (B, H, Tq, D)
        k = self.k_norm(self.split_heads(self.k_proj(x)))
        v = self.split_heads(self.v_proj(x))
        log_f = F.logsigmoid(self.fgate_proj(x).float()).transpose(1, 2)       # (B, H, Tq) fp32
        c = torch.cumsum(log_f, dim=-1)
        if cache is not None:
            k_past, v_past, c_past = cache
            c = c + c_past[..., -1:]
            k = torch.cat([k_past, k], dim=2)                                  # (B, H, Tk, D)
            v = torch.cat([v_past, v], dim=2)
            c = torch.cat([c_past, c], dim=-1)                                 # (B, H, Tk)
        Tk = k.shape[2]
        c_q = c[..., Tk - Tq:]                                                 # c at the query positions

        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)          # (B, H, Tq, Tk)
        scores = scores + (c_q[..., :, None] - c[..., None, :])               # forgetting decay bias
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - Tq)
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        o = probs @ v                                                          # (B, H, Tq, D)

        o = self.o_norm(o).transpose(1, 2).reshape(B, Tq, -1)                 # (B, Tq, H*D)
        o = o * torch.sigmoid(self.ogate_proj(x))
        return self.o_proj(o), (k, v, c)


class SwiGLU(nn.Module):
    def __init__(self, cfg: FoxConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FoxBlock(nn.Module):
    def __init__(self, cfg: FoxConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = ForgettingAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cache=None):
        a, cache = self.attn(self.attn_norm(x), cache)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache


class FoxLM(nn.Module):
    def __init__(self, cfg: FoxConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(FoxBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight                                # tied
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=residual_std)
            elif p.dim() == 2:
                nn.init.normal_(p, std=cfg.init_std)
        for block in self.blocks:
            gate = block.attn.fgate_proj
            nn.init.normal_(gate.weight, std=FGATE_WEIGHT_STD)
            gate.bias.fill_(cfg.global_fgate_bias)
            gate.bias[: cfg.n_local_heads] = cfg.local_fgate_bias

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T), the mean next-token
        cross-entropy instead. Computing the loss here puts it inside the compiled graph, where the
        fp32 log-softmax over the vocabulary is fused with the head instead of running in eager."""
        x = self.embed(idx)
        for block in self.blocks:
            x, _ = block(x)
        logits = self.lm_head(self.final_norm(x))
        return logits if targets is None else language_model_loss(logits, targets)

    def forward_with_cache(self, idx: Tensor, cache: list | None = None):
        """Decoding: idx (B, Tq) new tokens after the positions held in cache (None: none yet).
        Returns logits (B, Tq, vocab) and the new cache, a list of (k, v, c) per layer."""
        x = self.embed(idx)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        return self.lm_head(self.final_norm(x)), new_cache


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
