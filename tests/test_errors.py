"""Every bad input gets an error that names the argument and says what is expected."""
from __future__ import annotations

import pytest
import torch

import acp_compile
from helpers import fox_inputs


def good(B=1, Hq=4, Hkv=2, Tq=6, Tk=8, D=4):
    q, k, v, c = fox_inputs(B, Hq, Hkv, Tq, Tk, D, strength=0.1)
    log_f = torch.diff(c, dim=-1, prepend=torch.zeros(B, Hq, 1))
    return q, k, v, c, log_f


def op(q, k, v, c, sm_scale=None, log_eps=-10.0, u_bound=None):
    return torch.ops.acp.fox_attention_fwd(q, k, v, c, sm_scale, log_eps, u_bound)


def api(q, k, v, log_f, **kw):
    return acp_compile.fox_attention(q, k, v, log_f, **kw)


q, k, v, c, log_f = good()

CASES = [
    # (description, call, exception type, message fragment)
    ("q rank", lambda: op(q[0], k, v, c), ValueError, r"q must have 4 dimensions \(B, H, T, D\), got shape \(4, 6, 4\)"),
    ("k rank", lambda: op(q, k[..., None], v, c), ValueError, r"k must have 4 dimensions"),
    ("v rank", lambda: api(q, k, v[0], log_f), ValueError, r"v must have 4 dimensions"),
    ("q not a tensor", lambda: api(q.tolist(), k, v, log_f), TypeError, r"q must be a torch.Tensor, got list"),
    ("int dtype", lambda: op(q.long(), k.long(), v.long(), c), TypeError, r"q must be float32, float16, bfloat16 or float64, got torch.int64"),
    ("mixed dtypes", lambda: op(q, k.half(), v, c), TypeError, r"q, k and v must share one dtype, got torch.float32, torch.float16, torch.float32"),
    ("k v shapes", lambda: op(q, k, v[:, :, :7], c), ValueError, r"v must have shape \(B, Hkv, Tk, Dv\) = \(1, 2, 8, Dv\) like k except the value head dim Dv, got k \(1, 2, 8, 4\) and v \(1, 2, 7, 4\)"),
    ("batch", lambda: op(q, torch.cat([k, k]), torch.cat([v, v]), c), ValueError, r"k has batch 2 but q has batch 1"),
    ("head dim", lambda: op(q, k[..., :3], v[..., :3], c), ValueError, r"k has head dim 3 but q has 4 \(q and k share D\)"),
    ("value head dim 0", lambda: op(q, k, v[..., :0], c), ValueError, r"v has head dim 0 .* Dv must be >= 1"),
    ("heads", lambda: op(q[:, :3], k, v, c[:, :3]), ValueError,
     r"number of query heads \(3\) must be a multiple of the number of kv heads \(2\)"),
    ("Tq > Tk", lambda: op(torch.randn(1, 4, 9, 4), k, v, c), ValueError,
     r"q has 9 positions but k only 8; queries are the last Tq of Tk positions, so Tq <= Tk"),
    ("head dim 0", lambda: op(q[..., :0], k[..., :0], v[..., :0], c), ValueError, r"head dim 0 .* must be >= 1"),
    ("empty k only", lambda: op(q, k[:, :, :0], v[:, :, :0], c[..., :0]), ValueError, r"q has 6 positions but k only 0"),
    ("c shape", lambda: op(q, k, v, c[..., :5]), ValueError,
     r"the cumulative gate c must have shape \(B, Hq, Tk\) = \(1, 4, 8\), got \(1, 4, 5\)"),
    ("c dtype", lambda: op(q, k, v, c.half()), TypeError, r"the cumulative gate c must be float32 \(or float64\), got torch.float16"),
    ("device", lambda: op(q, k.to("meta"), v.to("meta"), c), ValueError, r"q, k, v and the gate must be on one device, got \['cpu', 'meta'\]"),
    ("log_eps positive", lambda: op(q, k, v, c, log_eps=1.0), ValueError, r"log_eps must be <= 0 .* got 1.0"),
    ("log_eps nan", lambda: api(q, k, v, log_f, log_eps=float("nan")), ValueError, r"log_eps must be <= 0"),
    ("log_eps type", lambda: api(q, k, v, log_f, log_eps="-10"), TypeError, r"log_eps must be a float <= 0, -inf or None"),
    ("sm_scale inf", lambda: op(q, k, v, c, sm_scale=float("inf")), ValueError, r"sm_scale must be a finite float > 0 or None"),
    ("sm_scale zero", lambda: op(q, k, v, c, sm_scale=0.0), ValueError, r"sm_scale must be > 0 .*got 0.0"),
    ("sm_scale negative api", lambda: api(q, k, v, log_f, sm_scale=-0.5), ValueError, r"sm_scale must be > 0"),
    ("sm_scale type", lambda: api(q, k, v, log_f, sm_scale="0.5"), TypeError, r"sm_scale must be a float or None"),
    ("v numpy", lambda: api(q, k, v.numpy(), log_f), TypeError, r"v must be a torch.Tensor, got ndarray"),
    ("k not a tensor api", lambda: api(q, None, v, log_f), TypeError, r"k must be a torch.Tensor, got NoneType"),
    ("api batch", lambda: api(q, torch.cat([k, k]), torch.cat([v, v]), log_f), ValueError, r"k has batch 2 but q has batch 1"),
    ("api k v shapes", lambda: api(q, k, v[:, :, :7], log_f), ValueError, r"v must have shape \(B, Hkv, Tk, Dv\)"),
    ("api k v shapes bthd", lambda: api(q.transpose(1, 2), k.transpose(1, 2), v[:, :, :7].transpose(1, 2), log_f,
                                        layout="bthd"), ValueError, r"v must have shape \(B, Tk, Hkv, Dv\) = \(1, 8, 2, Dv\)"),
    ("api head dim", lambda: api(q, k[..., :3], v[..., :3], log_f), ValueError, r"k has head dim 3 but q has 4"),
    ("u_bound minus inf", lambda: op(q, k, v, c, u_bound=torch.tensor(float("-inf"))), ValueError, r"must be >= 0"),
    ("u_bound nan tensor", lambda: op(q, k, v, c, u_bound=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError,
     r"u_bound bounds .* not NaN; got .* and NaN"),
    ("u_bound negative float", lambda: api(q, k, v, log_f, u_bound=-2.0), ValueError, r"must be >= 0 .*got -2.0"),
    ("u_bound device", lambda: op(q, k, v, c, u_bound=torch.ones(4, device="meta")), ValueError, r"u_bound is on meta but q is on cpu"),
    ("check_u_bound type", lambda: api(q, k, v, log_f, u_bound=1.0, check_u_bound="yes"), TypeError,
     r"check_u_bound must be True or False"),
    ("check_u_bound too small", lambda: api(q, k, v, log_f, u_bound=1e-3, check_u_bound=True), ValueError,
     r"u_bound does not hold: at batch 0, head 0 it is 0.001 but sm_scale \* max\|q.k\| over the causal pairs is"),
    ("u_bound shape", lambda: op(q, k, v, c, u_bound=torch.ones(3)), ValueError,
     r"u_bound must broadcast to \(B, Hq\) = \(1, 4\), got shape \(3,\)"),
    ("u_bound dtype", lambda: op(q, k, v, c, u_bound=torch.ones(4, dtype=torch.int32)), TypeError, r"u_bound must be a float tensor"),
    ("u_bound negative", lambda: op(q, k, v, c, u_bound=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError,
     r"u_bound bounds \|sm_scale \* q.k\| per \(batch, head\) and must be >= 0 \(\+inf: never prune that head\) and not NaN; got min -1.0"),
    ("u_bound nan", lambda: api(q, k, v, log_f, u_bound=float("nan")), ValueError, r"u_bound .* must be >= 0 .* not NaN; got nan"),
    ("u_bound type", lambda: api(q, k, v, log_f, u_bound=[1.0]), TypeError, r"u_bound must be None, a float or a tensor"),
    ("layout", lambda: api(q, k, v, log_f, layout="bshd"), ValueError, r"layout must be one of \('bhtd', 'bthd'\), got 'bshd'"),
    ("log_fgate shape bhtd", lambda: api(q, k, v, log_f[..., :7]), ValueError,
     r"log_fgate must have shape \(B, Hq, Tk\) = \(1, 4, 8\) for layout='bhtd', got \(1, 4, 7\)"),
    ("log_fgate shape bthd", lambda: api(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_f, layout="bthd"),
     ValueError, r"log_fgate must have shape \(B, Tk, Hq\) = \(1, 8, 4\) for layout='bthd', got \(1, 4, 8\)"),
    ("log_fgate type", lambda: api(q, k, v, 0.5), TypeError, r"log_fgate must be a tensor, got float"),
    ("log_fgate dtype", lambda: api(q, k, v, log_f.long()), TypeError, r"log_fgate must be a float tensor, got torch.int64"),
    ("api rank bthd", lambda: api(q[0], k, v, log_f, layout="bthd"), ValueError, r"q must have 4 dimensions \(B, T, H, D\) for layout='bthd'"),
]


o_good, lse_good, _, _ = op(q, k, v, c)
do_good = torch.randn_like(q)


def bwd(do=do_good, q_=q, k_=k, v_=v, c_=c, o=o_good, lse=lse_good, sm_scale=None, log_eps=-10.0, u_bound=None):
    return torch.ops.acp.fox_attention_bwd(do, q_, k_, v_, c_, o, lse, sm_scale, log_eps, u_bound)


CASES += [
    # fox_attention_bwd: every argument, in the order of its schema
    ("bwd do shape", lambda: bwd(do=do_good[:, :, :5]), ValueError,
     r"fox_attention_bwd: do must have shape \(B, Hq, Tq, Dv\) = \(1, 4, 6, 4\) \(the output's\), got \(1, 4, 5, 4\)"),
    ("bwd do dtype", lambda: bwd(do=do_good.double()), TypeError, r"fox_attention_bwd: do must have q's dtype torch.float32, got torch.float64"),
    ("bwd do device", lambda: bwd(do=do_good.to("meta")), ValueError, r"fox_attention_bwd: do is on meta but q is on cpu"),
    ("bwd q rank", lambda: bwd(q_=q[0]), ValueError, r"q must have 4 dimensions"),
    ("bwd k batch", lambda: bwd(k_=torch.cat([k, k]), v_=torch.cat([v, v])), ValueError, r"k has batch 2 but q has batch 1"),
    ("bwd v shape", lambda: bwd(v_=v[:, :, :7]), ValueError, r"v must have shape \(B, Hkv, Tk, Dv\)"),
    ("bwd c shape", lambda: bwd(c_=c[..., :5]), ValueError, r"the cumulative gate c must have shape"),
    ("bwd o shape", lambda: bwd(o=o_good[..., :3]), ValueError, r"fox_attention_bwd: o must have shape \(B, Hq, Tq, Dv\) = \(1, 4, 6, 4\)"),
    ("bwd o dtype", lambda: bwd(o=o_good.half()), TypeError, r"fox_attention_bwd: o must have q's dtype"),
    ("bwd lse shape", lambda: bwd(lse=lse_good[..., :5]), ValueError,
     r"fox_attention_bwd: lse must have shape \(B, Hq, Tq\) = \(1, 4, 6\) \(the forward's second output\), got \(1, 4, 5\)"),
    ("bwd lse transposed shape", lambda: bwd(lse=lse_good.transpose(1, 2)), ValueError, r"lse must have shape"),
    ("bwd lse dtype", lambda: bwd(lse=lse_good.double()), TypeError, r"lse must be float32 \(the forward's second output\), got torch.float64"),
    ("bwd lse device", lambda: bwd(lse=lse_good.to("meta")), ValueError, r"lse is on meta but q is on cpu"),
    ("bwd sm_scale", lambda: bwd(sm_scale=-1.0), ValueError, r"sm_scale must be > 0"),
    ("bwd log_eps", lambda: bwd(log_eps=2.0), ValueError, r"log_eps must be <= 0"),
    ("bwd u_bound shape", lambda: bwd(u_bound=torch.ones(3)), ValueError, r"u_bound must broadcast to \(B, Hq\)"),
]


@pytest.mark.parametrize("what,call,exc,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_message(what, call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_fake_tensor_path_checks_too():
    """Under torch.compile the fake implementation raises the same error before anything runs."""
    def fn(q, k, v, c):
        return torch.ops.acp.fox_attention_fwd(q, k, v, c, None, -10.0, None)[0]
    with pytest.raises(Exception, match=r"number of query heads \(3\) must be a multiple"):
        torch.compile(fn, backend="eager", fullgraph=True)(q[:, :3], k, v, c[:, :3])


def test_good_inputs_pass_and_nothing_is_changed_silently():
    q2, k2, v2, c2 = (t.clone() for t in (q, k, v, c))
    o, lse, u, _ = op(q2, k2, v2, c2)
    assert o.shape == q.shape and lse.shape == q.shape[:3] and u.shape == q.shape[:2]
    assert all(torch.equal(a, b) for a, b in zip((q2, k2, v2, c2), (q, k, v, c)))
