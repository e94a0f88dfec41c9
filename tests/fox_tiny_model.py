"""A tiny FoX language model (nanoGPT-style attention with a forget gate) for compile tests.

Attention per layer: q, k, v (B, H, T, D) from one linear; log f = logsigmoid(x W_f + b_f) per head,
c = cumsum(log f) (B, H, T); logits = q k^T / sqrt(D) + c_i - c_j with the causal mask read from a
registered buffer (the nanoGPT spelling), softmax, @ v.
Also the two helpers the training tests (CPU and GPU) share: random batches and an SGD loop.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class FoxAttention(nn.Module):
    def __init__(self, d_model, n_head, block_size):
        super().__init__()
        self.n_head, self.d_head = n_head, d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.fgate = nn.Linear(d_model, n_head)
        self.proj = nn.Linear(d_model, d_model)
        with torch.no_grad():
            self.fgate.bias.fill_(1.0)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))
        c = torch.cumsum(F.logsigmoid(self.fgate(x).float()), dim=1).transpose(1, 2)     # (B, H, T)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att + c[..., :, None] - c[..., None, :]
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, d_model, n_head, block_size):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = FoxAttention(d_model, n_head, block_size)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyFox(nn.Module):
    def __init__(self, vocab=64, d_model=32, n_head=2, n_layer=2, block_size=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(Block(d_model, n_head, block_size) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def batches(steps, B=2, T=29, vocab=64, seed=0, device="cpu"):
    """`steps` (idx, targets) pairs of random tokens (B, T), the same for every call with the same seed."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, vocab, (B, T), generator=g).to(device) for _ in range(2)) for _ in range(steps)]


def train(model, data, lr=0.1):
    """Losses (steps,) on the CPU of one SGD step per batch. The loss is cloned before the next step,
    since a CUDA-graph replay reuses its output memory; no per-step host sync.
    SGD, not Adam: Adam rescales the rounding noise of gradients that are zero in exact arithmetic
    (the key bias: softmax ignores a per-row shift) into full-size steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for idx, tgt in data:
        loss = model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return torch.stack(losses).cpu()
