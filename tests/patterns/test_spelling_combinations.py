"""Random combinations of the supported spellings (product x scale x bias x mask x softmax) are all
rewritten and match eager: the matcher works by meaning, so the parts compose freely."""
import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

PRODUCTS = ("at", "matmul", "einsum")
SCALES = ("div_logits", "mul_logits", "mul_q", "mul_k", "div_q")
BIASES = ("index", "unsqueeze", "separate", "inplace", "precomputed")
MASKS = ("triu", "not_tril", "where_tril", "aranges", "additive")
SOFTMAXES = ("method", "torch", "functional", "fp32_cast")


def build(product, scale, bias, mask, softmax):
    def attend(q, k, v, fg):
        c = torch.cumsum(F.logsigmoid(fg), dim=-1)
        T, d = q.shape[-2], q.shape[-1]
        if scale == "mul_q":
            q = q * d ** -0.5
        elif scale == "div_q":
            q = q / math.sqrt(d)
        elif scale == "mul_k":
            k = k * (1.0 / math.sqrt(d))
        if product == "at":
            s = q @ k.transpose(-2, -1)
        elif product == "matmul":
            s = torch.matmul(q, k.transpose(2, 3))
        else:
            s = torch.einsum("bhid,bhjd->bhij", q, k)
        if scale == "div_logits":
            s = s / math.sqrt(d)
        elif scale == "mul_logits":
            s = s * d ** -0.5
        if bias == "index":
            s = s + c[..., :, None] - c[..., None, :]
        elif bias == "unsqueeze":
            s = s + (c.unsqueeze(-1) - c.unsqueeze(-2))
        elif bias == "separate":
            s = s + c.unsqueeze(-1)
            s = s - c.unsqueeze(-2)
        elif bias == "inplace":
            s += c[..., :, None]
            s -= c[..., None, :]
        else:
            b = c[..., :, None] - c[..., None, :]
            s = b + s
        keep = torch.ones(T, T, dtype=torch.bool).tril()
        if mask == "triu":
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        elif mask == "not_tril":
            s = s.masked_fill(~keep, float("-inf"))
        elif mask == "where_tril":
            s = torch.where(keep, s, float("-inf"))
        elif mask == "aranges":
            i = torch.arange(T)
            s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        else:
            s = s + torch.full((T, T), float("-inf")).triu(1)
        if softmax == "method":
            p = s.softmax(-1)
        elif softmax == "torch":
            p = torch.softmax(s, dim=-1)
        elif softmax == "functional":
            p = F.softmax(s, dim=-1)
        else:
            p = F.softmax(s.float(), dim=-1).to(v.dtype)
        return p @ v
    return attend


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(PRODUCTS), st.sampled_from(SCALES), st.sampled_from(BIASES), st.sampled_from(MASKS),
       st.sampled_from(SOFTMAXES), st.integers(5, 40), st.sampled_from((8, 16)))
def test_any_combination_is_rewritten(product, scale, bias, mask, softmax, T, D):
    fn = build(product, scale, bias, mask, softmax)
    g = torch.Generator().manual_seed(T * D)
    q, k, v = (torch.randn(1, 2, T, D, generator=g) for _ in range(3))
    fg = torch.randn(1, 2, T, generator=g) + 1.0
    torch.compiler.reset()
    counters.clear()
    out = torch.compile(fn, backend="acp", fullgraph=True, options={"inner_backend": "eager", "log_eps": None})(q, k, v, fg)
    assert counters["acp"]["fox_attention"] == 1, (product, scale, bias, mask, softmax, dict(counters["acp"]))
    torch.testing.assert_close(out, fn(q, k, v, fg), rtol=1e-4, atol=1e-5)
