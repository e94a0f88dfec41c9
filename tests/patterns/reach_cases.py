"""FoX attention as public code writes it (issue: reach), each spelling next to the look-alikes that must
stay untouched. Each case is f(q, k, v, fg) with q (B, H, Tq, D), k and v (B, H, Tk, D) and fg (B, H, Tk)
forget-gate pre-activations; cases named *cache* take Tq < Tk (a prefill after a cache).
"""
import math

import einops
import torch
import torch.nn.functional as F

NEG = float("-inf")


def gate_bth(fg_bth):
    return torch.cumsum(F.logsigmoid(fg_bth), dim=1)          # (B, T, H)


def two_views_transpose(q, k, v, fg):
    c = gate_bth(fg.transpose(1, 2))                            # (B, T, H)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s + c.transpose(1, 2)[..., :, None] - c.permute(0, 2, 1).unsqueeze(-2)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), NEG)
    return s.softmax(-1) @ v


def two_views_einops(q, k, v, fg):
    c = gate_bth(fg.transpose(1, 2))
    T = q.shape[-2]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    s = s + einops.rearrange(c, "b t h -> b h t 1") - einops.rearrange(c, "b t h -> b h 1 t")
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))
    return torch.where(keep, s, NEG).softmax(-1) @ v


def prefill_with_cache(q, k, v, fg):
    Tq, Tk = q.shape[-2], k.shape[-2]
    c_cache = torch.cumsum(F.logsigmoid(fg[..., : Tk - Tq]), -1)
    c_new = c_cache[..., -1:] + torch.cumsum(F.logsigmoid(fg[..., Tk - Tq:]), -1)
    c_all = torch.cat([c_cache, c_new], dim=-1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c_new[..., :, None] - c_all[..., None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


# ---------------------------------------------------------------- look-alikes (must stay untouched)
def two_views_shifted(q, k, v, fg):
    c = gate_bth(fg.transpose(1, 2))
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s + c.transpose(1, 2)[..., :, None] - c.roll(1, dims=1).permute(0, 2, 1).unsqueeze(-2)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    return s.softmax(-1) @ v


def cache_queries_from_start(q, k, v, fg):
    Tq, Tk = q.shape[-2], k.shape[-2]
    c_all = torch.cumsum(F.logsigmoid(fg), -1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c_all[..., :Tq, None] - c_all[..., None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def separate_gates(q, k, v, fg):
    T = q.shape[-2]
    cq = torch.cumsum(F.logsigmoid(fg), -1)
    ck = torch.cumsum(F.logsigmoid(fg + 0.5), -1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + cq[..., :, None] - ck[..., None, :]
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v


def clamped_decay(q, k, v, fg):
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + (c[..., :, None] - c[..., None, :]).clamp(min=-3.0)
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v


def setitem_mask_ellipsis(q, k, v, fg):
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s[..., torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)] = float("-inf")
    return s.softmax(-1) @ v


def setitem_mask_slices(q, k, v, fg):
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s -= c[..., None, :]
    s += c[..., :, None]
    s[:, :, ~torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))] = -1e30
    return torch.softmax(s, dim=-1) @ v


def setitem_leading_mask(q, k, v, fg):     # s[m] with a 2-D m indexes the leading dims: not a mask of (i, j)
    c = torch.cumsum(F.logsigmoid(fg), -1)
    B, H, T = q.shape[0], q.shape[1], q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    s[torch.zeros(B, H, dtype=torch.bool)] = 0.0
    return s.softmax(-1) @ v


def authors_reference_style(q, k, v, fg):
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    scores[..., ~torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))] = float("-inf")
    p = torch.softmax(scores.float(), dim=-1).clone()
    p[torch.isnan(p)] = 0.0
    return torch.einsum("bhij,bhjd->bhid", p.to(v.dtype), v)


def clone_setitem_cleanup_into_product(q, k, v, fg):
    """p[isnan(p)] = 0 on a clone, the cleaned probabilities going straight into the product with v."""
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    p = torch.exp(s - torch.logsumexp(s, -1, keepdim=True)).clone()
    p[torch.isnan(p)] = 0
    return p @ v


def nan_to_num_after_softmax(q, k, v, fg):
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    return torch.nan_to_num(s.softmax(-1)) @ v


def where_isnan_after_softmax(q, k, v, fg):
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    p = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1)
    return torch.where(torch.isnan(p), 0.0, p) @ v


def small_probs_zeroed(q, k, v, fg):        # look-alike: changes non-NaN probabilities
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    p = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1).clone()
    p[p < 0.05] = 0.0
    return p @ v


def baddbmm_bias(q, k, v, fg):
    B, H, T, D = q.shape
    c = torch.cumsum(F.logsigmoid(fg), -1).reshape(B * H, T)
    bias = (c[:, :, None] - c[:, None, :]).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    s = torch.baddbmm(bias, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2), alpha=D ** -0.5)
    return torch.bmm(s.softmax(-1), v.reshape(B * H, T, D)).view(B, H, T, D)


def gpt2_finfo_tensor_fill(q, k, v, fg):
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], q.shape[-1] ** 0.5, dtype=q.dtype)
    w = w + c[..., :, None] - c[..., None, :]
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]
    mask_value = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
    w = torch.where(keep, w.to(w.dtype), mask_value)
    return F.softmax(w, dim=-1).type(v.dtype) @ v


def fill_minus_1e4(q, k, v, fg):     # refused with a reason
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -1e4).softmax(-1) @ v


class HFFoxAttention(torch.nn.Module):
    """Hugging Face's eager_attention_forward, with the FoX decay carried in attention_mask."""
    def __init__(self, head_dim=8):
        super().__init__()
        self.scaling = head_dim ** -0.5
        self.attention_dropout = 0.0
    def forward(self, q, k, v, fg):
        T = q.shape[-2]
        c = torch.cumsum(F.logsigmoid(fg), -1)
        causal = torch.full((T, T), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(1)
        attention_mask = causal[None, None] + (c[..., :, None] - c[..., None, :])
        causal_mask = attention_mask[:, :, :, : k.shape[-2]]
        attn_weights = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        attn_weights = attn_weights + causal_mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
        attn_weights = F.dropout(attn_weights, p=self.attention_dropout, training=self.training)
        attn_output = torch.matmul(attn_weights, v)
        return attn_output.transpose(1, 2).contiguous().transpose(1, 2)
hf_eager_attention = HFFoxAttention()


def exp_minus_logsumexp(q, k, v, fg):
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    return torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True)) @ v


class PerHeadAlpha(torch.nn.Module):
    """A learned per-head factor on the decay: alpha_h * (c_i - c_j), i.e. c' = alpha c."""

    def __init__(self, heads=2):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.linspace(0.5, 1.5, heads))

    def forward(self, q, k, v, fg):
        c = torch.cumsum(F.logsigmoid(fg), -1)
        T = q.shape[-2]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        s = s + self.alpha[:, None, None] * (c[..., :, None] - c[..., None, :])
        return s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), NEG).softmax(-1) @ v


per_head_alpha = PerHeadAlpha()


class PerHeadTemperature(torch.nn.Module):
    """Logits (product and decay) divided by a per-head temperature tensor before the mask."""

    def __init__(self, heads=2):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.tensor([0.7, 1.3]).view(1, heads, 1, 1))

    def forward(self, q, k, v, fg):
        c = torch.cumsum(F.logsigmoid(fg), -1)
        T = q.shape[-2]
        s = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + c[..., :, None] - c[..., None, :]) / self.temperature
        return torch.where(torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device)), s, NEG).softmax(-1) @ v


per_head_temperature = PerHeadTemperature()


class AlphaOnOneSideOnly(torch.nn.Module):
    """Look-alike: the factor multiplies c_j only (alpha c_i - c_j is not a difference of one gate)."""

    def __init__(self, heads=2):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.linspace(0.5, 1.5, heads))

    def forward(self, q, k, v, fg):
        c = torch.cumsum(F.logsigmoid(fg), -1)
        T = q.shape[-2]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        s = s + c[..., :, None] - self.alpha[:, None, None] * c[..., None, :]
        return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).softmax(-1) @ v


alpha_on_one_side_only = AlphaOnOneSideOnly()


def softmax_by_hand(q, k, v, fg):
    """Look-alike kept as it is, with a near-miss: no softmax op (exp over the row sum)."""
    c = torch.cumsum(F.logsigmoid(fg), -1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return (e / e.sum(dim=-1, keepdim=True)) @ v


def gqa_grouped_einsum(q, k, v, fg):
    """GQA without repeating k and v: q viewed as (B, Hkv, G, T, D) against k (B, Hkv, T, D)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    c = torch.cumsum(F.logsigmoid(fg), -1).view(B, Hkv, Hq // Hkv, T)
    q5 = q.view(B, Hkv, Hq // Hkv, T, D)
    s = torch.einsum("bhgid,bhjd->bhgij", q5, k) / math.sqrt(D) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), NEG)
    o = torch.einsum("bhgij,bhjd->bhgid", s.softmax(-1), v)
    return o.reshape(B, Hq, T, D)


def baddbmm_expanded_bias(q, k, v, fg):
    """The bias expanded (a no-op) to the logits' shape before baddbmm."""
    B, H, T, D = q.shape
    c = torch.cumsum(F.logsigmoid(fg), -1).reshape(B * H, T)
    bias = (c[:, :, None] - c[:, None, :]).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
    bias = bias.expand(B * H, T, T)
    s = torch.baddbmm(bias, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2), alpha=D ** -0.5)
    return torch.bmm(s.softmax(-1), v.reshape(B * H, T, D)).view(B, H, T, D)


def bmm_then_view_with_gate_after_view(q, k, v, fg):
    """Logits from a 3-D bmm viewed as (B, H, Tq, Tk), the gate added in place after the view on both sides,
    then viewed back to (B*H, Tq, Tk) for the product with v (the fuzzer's BLOOM-like spelling)."""
    B, H, T, D = q.shape
    c = torch.cumsum(F.logsigmoid(fg), dim=-1)
    s = torch.bmm(q.reshape(-1, T, D), k.reshape(-1, T, D).transpose(1, 2)).view(B, H, T, T) * D ** -0.5
    s += c[..., :, None]
    s -= c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    return torch.bmm(p.reshape(-1, T, T), v.reshape(-1, T, v.shape[-1])).view(B, H, T, -1)


def bmm_then_view_with_broadcast_key_term(q, k, v, fg):
    """Look-alike: the key-side term after the view is (1, H, 1, Tk), shared by every batch row (a broadcast the
    flattening does not cover), so it is refused with the view's reason."""
    B, H, T, D = q.shape
    c = torch.cumsum(F.logsigmoid(fg[:1]), dim=-1)
    s = torch.bmm(q.reshape(-1, T, D), k.reshape(-1, T, D).transpose(1, 2)).view(B, H, T, T) * D ** -0.5
    s = s + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    return torch.bmm(p.reshape(-1, T, T), v.reshape(-1, T, v.shape[-1])).view(B, H, T, -1)
