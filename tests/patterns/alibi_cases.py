"""ALiBi and static linear decays as public code writes them (issue #12 item 1), and their look-alikes.

Each case is a module `forward(q, k, v)` over q, k, v (B, H, T, D) with H = 4 heads (GQA cases: k, v with
fewer heads); slopes are the ALiBi paper's geometric 2^(-8/H * h), h = 1..H. The spellings are written from
the formulas of the ALiBi paper, BLOOM, MPT and Hugging Face's attention, not copied.
"""
import math

import torch
import torch.nn.functional as F

NEG = float("-inf")
H = 4


def geometric_slopes(n: int) -> torch.Tensor:
    """2^(-8/n * h), h = 1..n (n a power of two, as the paper's default)."""
    return torch.tensor([2.0 ** (-8.0 / n * h) for h in range(1, n + 1)])


def _causal_fill(s: torch.Tensor) -> torch.Tensor:
    T, S = s.shape[-2], s.shape[-1]
    return s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=s.device).triu(S - T + 1), NEG)


def _logits(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


class Module(torch.nn.Module):
    def __init__(self, learnable=False, max_len=128):
        super().__init__()
        slopes = geometric_slopes(H)
        if learnable:
            self.slopes = torch.nn.Parameter(slopes)
        else:
            self.register_buffer("slopes", slopes)
        self.max_len = max_len


# ------------------------------------------------------------------------------------------- rewritten
class TwoSided(Module):
    """slope_h * (j - i) from two aranges, the paper's relative-position matrix."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        rel = torch.arange(T, device=q.device)[None, :] - torch.arange(T, device=q.device)[:, None]
        s = _logits(q, k) + (self.slopes[:, None, None] * rel).to(q.dtype)
        return _causal_fill(s).softmax(-1) @ v


class NegAbsDistance(Module):
    """-slope_h * |i - j|: equal to slope_h * (j - i) on the causal region only."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device)
        dist = (pos[:, None] - pos[None, :]).abs()
        s = _logits(q, k) - self.slopes.view(1, -1, 1, 1) * dist
        return _causal_fill(s).softmax(-1) @ v


class ClampedInactive(Module):
    """A clamp that never acts on the causal region: (j - i).clamp(max=0)."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device, dtype=torch.float32)
        rel = (pos[None, :] - pos[:, None]).clamp(max=0)
        s = _logits(q, k) + rel * self.slopes[:, None, None]
        return _causal_fill(s).softmax(-1) @ v


class SlopesInGraph(torch.nn.Module):
    """The slopes computed in the graph from H: 2 ** (-8/H * h)."""
    def forward(self, q, k, v):
        T, n = q.shape[-2], q.shape[1]
        slopes = 2.0 ** (-8.0 / n * torch.arange(1, n + 1, device=q.device, dtype=torch.float32))
        rel = torch.arange(T, device=q.device)[None, :] - torch.arange(T, device=q.device)[:, None]
        bias = slopes[:, None, None] * rel[None]
        s = _logits(q, k) + bias
        return _causal_fill(s).softmax(-1) @ v


class BiasBuffer(Module):
    """The bias precomputed as a buffer (H, max_len, max_len) and sliced [:, :T, :T]."""
    def __init__(self, **kw):
        super().__init__(**kw)
        pos = torch.arange(self.max_len)
        self.register_buffer("alibi", -self.slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs())

    def forward(self, q, k, v):
        T = q.shape[-2]
        s = _logits(q, k) + self.alibi[:, :T, :T]
        return _causal_fill(s).softmax(-1) @ v


class FutureMaskWithAlibi(Module):
    """The ALiBi paper's fairseq code: one (H, max, max) tensor attribute = triu(-inf) + slope * j, sliced."""
    def __init__(self, **kw):
        super().__init__(**kw)
        m = self.max_len
        alibi = self.slopes[:, None, None] * torch.arange(m)[None, None, :]
        self.future_mask = torch.triu(torch.full((m, m), NEG), 1)[None] + alibi

    def forward(self, q, k, v):
        T = q.shape[-2]
        s = _logits(q, k) + self.future_mask[:, :T, :T]
        return s.softmax(-1) @ v


class KeyOnly(Module):
    """One-sided slope_h * j (BLOOM's positions): c = -slope * j, the row shift cancels under the causal mask."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        alibi = self.slopes[:, None, None] * torch.arange(T, device=q.device)[None, None, :]
        s = _logits(q, k) + alibi.to(q.dtype)
        return _causal_fill(s).softmax(-1) @ v


class MptStyle(Module):
    """MPT: arange(1 - T, 1) (1, 1, 1, T) times the slopes (1, H, 1, 1), added; causal fill with finfo.min."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        bias = torch.arange(1 - T, 1, dtype=torch.int32, device=q.device).view(1, 1, 1, T)
        bias = bias * self.slopes.view(1, -1, 1, 1)
        w = q.matmul(k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]))
        w = w + bias
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().logical_not()
        w = w.masked_fill(causal.view(1, 1, T, T), torch.finfo(w.dtype).min)
        return torch.softmax(w, dim=-1).to(v.dtype).matmul(v)


class MptBuffer(Module):
    """MPT's layout: the bias (1, H, 1, max_len) = arange(1 - max_len, 1) * slopes kept on the module and sliced
    to the last T keys, k passed already transposed (B, H, D, T), causal fill with finfo.min."""
    def __init__(self, **kw):
        super().__init__(**kw)
        m = self.max_len
        self.register_buffer("attn_bias", torch.arange(1 - m, 1).view(1, 1, 1, m) * self.slopes.view(1, -1, 1, 1))

    def forward(self, q, k, v):
        s_q, s_k = q.shape[-2], k.shape[-2]
        kt = k.transpose(-2, -1)
        w = q.matmul(kt) * (1 / math.sqrt(q.shape[-1]))
        w = w + self.attn_bias[:, :, :, -s_k:]
        causal = torch.ones(s_k, s_k, dtype=torch.bool, device=q.device).tril()[-s_q:, -s_k:]
        w = w.masked_fill(~causal.view(1, 1, s_q, s_k), torch.finfo(q.dtype).min)
        return torch.softmax(w, dim=-1).to(v.dtype).matmul(v)


class BloomBaddbmm(Module):
    """BLOOM: alibi (B*H, 1, T) = slopes * positions, baddbmm(alibi, q, k^T, beta=1, alpha=1/sqrt(d)) on
    (B*H, T, D) views, causal fill with finfo.min, softmax in fp32, bmm with v."""
    def forward(self, q, k, v):
        B, n, T, D = q.shape
        positions = torch.arange(T, device=q.device, dtype=torch.float32)[None, None, :]      # (1, 1, T)
        alibi = (self.slopes[:, None] * positions).expand(B, n, T).reshape(B * n, 1, T).to(q.dtype)
        scores = torch.baddbmm(alibi, q.reshape(B * n, T, D), k.reshape(B * n, T, D).transpose(1, 2),
                               beta=1.0, alpha=1.0 / math.sqrt(D))
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(causal, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs, v.reshape(B * n, T, D)).view(B, n, T, D)


class BloomHF(Module):
    """Hugging Face's BLOOM attention: alibi (B*H, 1, T) from an all-ones attention mask's cumsum,
    alibi.baddbmm(batch1=q, batch2=k^T, beta, alpha) on (B*H, T, D) views, the scores viewed as (B, H, T, T)
    for the additive finfo.min causal mask and the fp32 softmax, then viewed back for bmm with v."""
    def forward(self, q, k, v):
        B, n, T, D = q.shape
        attention_mask = torch.ones(B, T, device=q.device)
        arange_tensor = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]
        alibi = (self.slopes[..., None] * arange_tensor).reshape(B * n, 1, T).to(q.dtype)
        causal = torch.full((T, T), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(1)[None, None]
        q3, k3, v3 = (x.reshape(B * n, T, D) for x in (q, k, v))
        scores = alibi.baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0, alpha=1.0 / math.sqrt(D))
        w = scores.view(B, n, T, -1) + causal[:, :, :, :T]
        probs = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=0.0, training=self.training)
        return torch.bmm(probs.view(B * n, T, -1), v3).view(B, n, T, D)


class SdpaMaskWithAlibi(Module):
    """Hugging Face style: ALiBi added into the float attention mask passed to SDPA."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        causal = torch.zeros(T, T, device=q.device).masked_fill(
            torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), torch.finfo(q.dtype).min)
        alibi = self.slopes.view(1, -1, 1, 1) * torch.arange(T, device=q.device).view(1, 1, 1, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal + alibi)


class LearnableTwoSided(Module):
    """Learnable slopes (a Parameter) times the relative positions: the gradient reaches the slopes via c."""
    def __init__(self, **kw):
        super().__init__(learnable=True, **kw)

    def forward(self, q, k, v):
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device)
        s = _logits(q, k) + self.slopes.view(1, -1, 1, 1) * (pos[None, :] - pos[:, None])
        return _causal_fill(s).softmax(-1) @ v


class LearnableKeyOnly(Module):
    def __init__(self, **kw):
        super().__init__(learnable=True, **kw)

    def forward(self, q, k, v):
        T = q.shape[-2]
        s = _logits(q, k) + self.slopes.view(1, -1, 1, 1) * torch.arange(T, device=q.device).view(1, 1, 1, T)
        return _causal_fill(s).softmax(-1) @ v


class SeparateSides(Module):
    """slope * j - slope * i as two terms, from two different arange calls."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        sl = self.slopes.view(1, -1, 1, 1)
        s = _logits(q, k) + sl * torch.arange(T, device=q.device).view(1, 1, 1, T) \
            - sl * torch.arange(T, device=q.device).view(1, 1, T, 1)
        return _causal_fill(s).softmax(-1) @ v


class FoxPlusKeyAlibi(Module):
    """A FoX gate c_i - c_j (from the keys, per call) plus BLOOM's one-sided slope * j: each part is c_i - c_j."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        c = torch.cumsum(F.logsigmoid(k.sum(-1) + 2.0), -1)
        s = _logits(q, k) + c[..., :, None] - c[..., None, :]
        s = s + self.slopes.view(1, -1, 1, 1) * torch.arange(T, device=q.device).view(1, 1, 1, T)
        return _causal_fill(s).softmax(-1) @ v


# ------------------------------------------------------------------------------------------ look-alikes
class NotCausal(Module):
    """-slope * |i - j| with no mask (bidirectional): not causal."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device)
        s = _logits(q, k) - self.slopes.view(1, -1, 1, 1) * (pos[:, None] - pos[None, :]).abs()
        return s.softmax(-1) @ v


class QueryOnly(Module):
    """slope * i alone: a per-row shift, no key term (plain causal attention in disguise)."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        s = _logits(q, k) + self.slopes.view(1, -1, 1, 1) * torch.arange(T, device=q.device).view(1, 1, T, 1)
        return _causal_fill(s).softmax(-1) @ v


class SlopePerQueryRow(Module):
    """The slope depends on the query row: (j - i) * s_i. Not c_i - c_j."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device, dtype=torch.float32)
        row_slope = 0.5 + pos[:, None] / T
        s = _logits(q, k) + (pos[None, :] - pos[:, None]) * row_slope
        return _causal_fill(s).softmax(-1) @ v


class ProductOfPositions(Module):
    """slope * i * j: linear in j with a per-row factor that is not a shift."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device, dtype=torch.float32)
        s = _logits(q, k) + 0.01 * self.slopes.view(1, -1, 1, 1) * (pos[:, None] * pos[None, :])
        return _causal_fill(s).softmax(-1) @ v


class LogDistance(Module):
    """-log(1 + |i - j|): not linear in the position."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device, dtype=torch.float32)
        s = _logits(q, k) - torch.log1p((pos[:, None] - pos[None, :]).abs())
        return _causal_fill(s).softmax(-1) @ v


class BucketedDistance(Module):
    """T5-style buckets of the distance times a slope: piecewise constant, not linear."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device)
        dist = (pos[:, None] - pos[None, :]).clamp(min=0)
        bucket = torch.where(dist < 4, dist, 4 + torch.log2(dist.float().clamp(min=1)).long())
        s = _logits(q, k) - self.slopes.view(1, -1, 1, 1) * bucket
        return _causal_fill(s).softmax(-1) @ v


class ClampActive(Module):
    """(j - i).clamp(min=-4): the clamp acts on the causal region (distances beyond 4 all get -4 * slope)."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device)
        s = _logits(q, k) + self.slopes[:, None, None] * (pos[None, :] - pos[:, None]).clamp(min=-4)
        return _causal_fill(s).softmax(-1) @ v


class DifferentSideSlopes(Module):
    """slope * i - 2 * slope * j: the two sides differ (not one position term on both)."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        sl = self.slopes.view(1, -1, 1, 1)
        pos = torch.arange(T, device=q.device)
        s = _logits(q, k) + sl * pos.view(1, 1, T, 1) - 2 * sl * pos.view(1, 1, 1, T)
        return _causal_fill(s).softmax(-1) @ v


class KeyPaddingAsBias(Module):
    """A key padding mask (B, 1, 1, T) of finfo.min added like a bias, from a per-call tensor."""
    def forward(self, q, k, v, pad):
        s = _logits(q, k) + (1.0 - pad[:, None, None, :].float()) * torch.finfo(q.dtype).min
        return _causal_fill(s).softmax(-1) @ v


class KeyBiasFromInput(Module):
    """A one-sided key bias computed from a per-call tensor: refused (data is not a static decay)."""
    def forward(self, q, k, v, pad):
        s = _logits(q, k) + self.slopes.view(1, -1, 1, 1) * pad[:, None, None, :].float().cumsum(-1)
        return _causal_fill(s).softmax(-1) @ v


class HugeKeyBias(Module):
    """A constant key bias of -1e9 on half the keys: a mask fill, not a bias."""
    def forward(self, q, k, v):
        T = q.shape[-2]
        b = ((torch.arange(T, device=q.device) % 2).float() * -1e9).view(1, 1, 1, T)
        s = _logits(q, k) + b
        return _causal_fill(s).softmax(-1) @ v


class ClampedWindowAttribute(Module):
    """(j - i).clamp(min=-self.window): inactive at T <= window, active beyond (a guard refuses those calls)."""
    window = 16

    def forward(self, q, k, v):
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device)
        s = _logits(q, k) + self.slopes[:, None, None] * (pos[None, :] - pos[:, None]).clamp(min=-self.window)
        return _causal_fill(s).softmax(-1) @ v
