"""FoX attention written in many ways (all must be rewritten) and look-alikes (none may be).

Each case is f(q, k, v, fg) with q, k, v (B, H, T, D) and fg (B, H, T) forget-gate pre-activations,
unless the case says otherwise. Shared by test_spellings.py.
"""
import math

import torch
import torch.nn.functional as F


def gate(fg):
    return torch.cumsum(F.logsigmoid(fg), dim=-1)                        # (B, H, T) fp32


def causal_keep(T, device=None):
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


# ---------------------------------------------------------------- spellings that must match
def matmul_div_sqrt_triu(q, k, v, fg):
    c = gate(fg)
    T, d = q.shape[-2], q.shape[-1]
    s = q @ k.transpose(-2, -1) / math.sqrt(d) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(dim=-1) @ v


def torch_matmul_mul_where_tril(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    s = s + (c.unsqueeze(-1) - c.unsqueeze(-2))
    s = torch.where(causal_keep(T), s, float("-inf"))
    return torch.matmul(F.softmax(s, dim=-1), v)


def bmm_reshaped(q, k, v, fg):
    B, H, T, D = q.shape
    c = gate(fg).reshape(B * H, T)
    s = torch.bmm(q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2)) / math.sqrt(D)
    s = s + c[:, :, None] - c[:, None, :]
    s = s.masked_fill(~causal_keep(T), float("-inf"))
    o = torch.bmm(torch.softmax(s, dim=-1), v.reshape(B * H, T, D))
    return o.view(B, H, T, D)


def einsum_bhtd(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    s = s + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)


def einsum_bthd(q, k, v, fg):
    # inputs in (B, T, H, D), gate in (B, T, H): the test transposes them
    c = gate(fg.transpose(1, 2))                                       # (B, H, T)
    T = q.shape[1]
    s = torch.einsum("bihd,bjhd->bhij", q, k) * (1.0 / math.sqrt(q.shape[-1]))
    s = s + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(~causal_keep(T), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)


def scale_on_q(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    s = s + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def scale_on_k_custom(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ (k * 0.3).transpose(-2, -1)
    s = s + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def inplace_separate_steps(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1)
    s /= math.sqrt(q.shape[-1])
    s += c.unsqueeze(-1)
    s -= c.unsqueeze(-2)
    s.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def fp32_softmax_cast_back(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.float() + (c[..., :, None] - c[..., None, :]).to(s.dtype)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return p @ v


def softplus_gate(q, k, v, fg):
    c = torch.cumsum(-F.softplus(-fg), dim=-1)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def any_tensor_as_c(q, k, v, fg):
    c = fg * 0.5                                                        # not a cumsum at all
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def arange_compare(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    i = torch.arange(T)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
    return s.softmax(-1) @ v


def additive_inf_matrix(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    causal_bias = torch.full((T, T), float("-inf")).triu(1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + causal_bias + c[..., :, None] - c[..., None, :]
    return s.softmax(-1) @ v


def dropout_p0(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return F.dropout(s.softmax(-1), p=0.0, training=True) @ v


def dropout_eval(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return F.dropout(s.softmax(-1), p=0.3, training=False) @ v


def sdpa_masked_fill(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    bias = (c[..., :, None] - c[..., None, :]).masked_fill(~causal_keep(T), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def sdpa_added_mask_scale(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    mask = torch.zeros(T, T).masked_fill(~causal_keep(T), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=c.unsqueeze(-1) - c.unsqueeze(-2) + mask, scale=0.25)


def gqa_repeat_interleave(q, k, v, fg):
    # q (B, 4, T, D), k, v (B, 2, T, D)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return matmul_div_sqrt_triu(q, k, v, fg)


def gqa_expand(q, k, v, fg):
    B, Hkv, T, D = k.shape
    g = q.shape[1] // Hkv
    k = k[:, :, None].expand(B, Hkv, g, T, D).reshape(B, Hkv * g, T, D)
    v = v[:, :, None].expand(B, Hkv, g, T, D).reshape(B, Hkv * g, T, D)
    return matmul_div_sqrt_triu(q, k, v, fg)


def gqa_llama_repeat_kv(q, k, v, fg):
    B, Hkv, T, D = k.shape
    n_rep = q.shape[1] // Hkv
    k = k[:, :, None, :, :].expand(B, Hkv, n_rep, T, D).reshape(B, Hkv * n_rep, T, D)
    v = v[:, :, None, :, :].expand(B, Hkv, n_rep, T, D).reshape(B, Hkv * n_rep, T, D)
    return matmul_div_sqrt_triu(q, k, v, fg)


def decode_step_no_mask(q, k, v, fg):
    # one query (the last position) sees every key: no mask is needed
    c = gate(fg)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., -1:, None] - c[..., None, :]
    return s.softmax(-1) @ v


def kv_cache_offset(q, k, v, fg):
    # q (B, H, Tq, D) holds the last Tq of Tk positions; fg (B, H, Tk)
    c = gate(fg)
    Tq, Tk = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s + c[..., Tk - Tq:, None] - c[..., None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
    s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v


def sdpa_enable_gqa(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    bias = (c[..., :, None] - c[..., None, :]).masked_fill(~causal_keep(T), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


def sdpa_kv_cache(q, k, v, fg):
    c = gate(fg)
    Tq, Tk = q.shape[-2], k.shape[-2]
    keep = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
    bias = torch.where(keep, c[..., Tk - Tq:, None] - c[..., None, :], float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def tril_eq_zero_views_mT(q, k, v, fg):
    B, H, T, D = q.shape
    c = gate(fg)
    s = torch.matmul(q, k.mT) / D ** 0.5
    s = s + c.view(B, H, T, 1) - c.reshape(B, H, 1, T)
    s = s.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
    return s.softmax(-1) @ v


def where_two_aranges(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    pos = torch.arange(T)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = torch.where(pos[:, None] >= pos[None, :], s, float("-inf"))
    return s.softmax(-1) @ v


def bf16_fp32_softmax(q, k, v, fg):
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    c = gate(fg)
    T = q.shape[-2]
    s = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
    s = s + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1).to(v.dtype) @ v).float()


class NanoGPTBufferAttention(torch.nn.Module):
    def __init__(self, block_size=64):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, q, k, v, fg):
        T = q.size(-2)
        c = gate(fg)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att + c[..., :, None] - c[..., None, :]
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


# ---------------------------------------------------------------- look-alikes: never rewritten
def arbitrary_bias(q, k, v, fg):
    T = q.shape[-2]
    bias = torch.sin(torch.arange(T)[:, None] * 0.37 + torch.arange(T)[None, :] * 1.3)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def data_bias(q, k, v, fg):
    # a (B, H, T, T) bias computed from data
    T = q.shape[-2]
    bias = fg[..., :, None] * fg[..., None, :]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def no_causal_mask(q, k, v, fg):
    c = gate(fg)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    return s.softmax(-1) @ v


def mask_hides_diagonal(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(0), -1e30)   # row 0 sees nothing: uniform
    return s.softmax(-1) @ v


def reversed_bias(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., None, :] - c[..., :, None]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def probs_used_elsewhere(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    return p @ v, p.sum(dim=-2)


def dropout_training(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return F.dropout(s.softmax(-1), p=0.5, training=True) @ v


def sliding_window(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    pos = torch.arange(T)
    keep = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 8)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v


def query_side_bias_only(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def unbalanced_bias(q, k, v, fg):
    c = gate(fg)
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., :, None] - 2 * c[..., None, :]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def plain_causal(q, k, v, fg):
    T = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v
