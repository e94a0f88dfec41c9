"""Attention inside an autocast region: the products run in bf16 although q, k, v are fp32 (or
mixed, like an fp32 RMSNorm output next to a bf16 v). The rewritten site must return what eager
returns: the same dtype (bf16) and values within bf16 rounding, with the op fed bf16 operands."""
import pytest
import torch
from torch._dynamo.utils import counters

import spelling_cases as sc

B, H, T, D = 2, 2, 37, 8
BF16_TOL = 3e-2     # values are O(1); two bf16 roundings of the products


def _inputs(v_dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    fg = torch.randn(B, H, T, generator=g) + 1.0
    return q, k, v.to(v_dtype), fg


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16], ids=["fp32-inputs", "bf16-v"])
@pytest.mark.parametrize("case", ["matmul_div_sqrt_triu", "torch_matmul_mul_where_tril", "sdpa_masked_fill"])
def test_autocast_site_is_rewritten_and_keeps_the_eager_dtype(case, v_dtype):
    fn = getattr(sc, case)
    args = _inputs(v_dtype)
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="acp", options={"inner_backend": "aot_eager", "log_eps": None}, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = fn(*args)
        got = compiled(*args)
    assert counters["acp"]["fox_attention"] == 1, dict(counters["acp"])
    assert got.dtype == expected.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max().item() < BF16_TOL

