"""A FoX language model for the distributed tests, large enough (about 1.2 MiB of parameters per
block at d_model=192) that DDP's graph splitter, with 1 MiB buckets, cuts the Dynamo graph inside
blocks.

mask="buffer"  nanoGPT: a registered tril buffer sliced [:T, :T] in each attention
mask="passed"  the model builds one boolean mask in its forward and passes it to every block
gate="before"  the forget gate is computed before q k^T (the usual order)
gate="between" the gate runs a large MLP between q k^T and adding the bias: a bucket boundary there
               cuts the attention site in half (the near-miss case of the distributed tests)
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d_model, n_head, block_size, mask, gate):
        super().__init__()
        self.n_head, self.d_head, self.mask, self.gate = n_head, d_model // n_head, mask, gate
        self.qkv = nn.Linear(d_model, 3 * d_model)
        if gate == "between":
            self.fgate = nn.Sequential(nn.Linear(d_model, 1024), nn.GELU(), nn.Linear(1024, n_head))
        else:
            self.fgate = nn.Linear(d_model, n_head)
        self.proj = nn.Linear(d_model, d_model)
        if mask == "buffer":
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x, keep=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))
        if self.gate == "before":
            c = torch.cumsum(F.logsigmoid(self.fgate(x).float()), dim=1).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))
        if self.gate == "between":
            c = torch.cumsum(F.logsigmoid(self.fgate(x).float()), dim=1).transpose(1, 2)
        att = att + c[..., :, None] - c[..., None, :]
        if self.mask == "buffer":
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        else:
            att = att.masked_fill(~keep, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, d_model, n_head, block_size, mask, gate):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_head, block_size, mask, gate)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x, keep=None):
        x = x + self.attn(self.ln1(x), keep)
        return x + self.mlp(self.ln2(x))


class FoxLM(nn.Module):
    def __init__(self, vocab=64, d_model=192, n_head=4, n_layer=2, block_size=64, mask="buffer", gate="before"):
        super().__init__()
        self.mask = mask
        self.emb = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(Block(d_model, n_head, block_size, mask, gate) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx, targets):
        T = idx.shape[1]
        keep = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril() if self.mask == "passed" else None
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x, keep)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
