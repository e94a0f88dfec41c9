"""Padded batches and packed documents in the pass (issue #12 items 2 and 3, patterns/segment_masks.py).

Each positive program of segment_mask_cases.py is rewritten (the report counts the calls the op served) under
dynamic=None and dynamic=True at several lengths, with fresh padding / ids each call, and gives eager's output and
gradients for q, k, v and the gate, including rows with no visible key (left padding): NaN where eager's -inf fill
gives NaN (and the NaN gradient of v eager gets through 0 x NaN), the mean of v where a finite fill makes the row
uniform, 0 after a NaN clean-up. Each look-alike is left alone with a near-miss that says why.
"""
import pytest
import torch

import acp_compile
import segment_mask_cases as sc

B, H, D = 2, 2, 8
LENGTHS = (16, 23, 9)


def _pad(T, n, left=True, holes=True, dtype=torch.bool):
    g = torch.Generator().manual_seed(100 + n)
    pad = torch.ones(B, T, dtype=torch.bool)
    if left:
        pad[0, : 2 + n % 3] = False                       # rows 0 .. 1+n%3 of batch 0 see no key
    if holes:
        pad[1] = torch.rand(T, generator=g) > 0.3
        pad[1, -1] = False                                # right padding: the last row sees earlier keys only
    return pad.to(dtype)


def _doc(T, n, contiguous):
    g = torch.Generator().manual_seed(200 + n)
    if contiguous:
        starts = torch.rand(B, T, generator=g) < 0.25
        starts[:, 0] = True
        return torch.cumsum(starts.long(), -1) * 7 - 3    # increasing ids, not starting at 0
    return torch.randint(0, 3, (B, T), generator=g)       # ids come back after other ids: equality, not runs


def _qkvf(T, n, Tq=None, Hkv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(n * 31 + T)
    Tq = T if Tq is None else Tq
    Hkv = H if Hkv is None else Hkv
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    fg = torch.randn(B, H, T, generator=g) + torch.tensor([3.0, -1.0])[:, None]
    return [x.to(dtype) for x in (q, k, v, fg)]


DATA = {
    "pad_and_causal": lambda T, n: _pad(T, n),
    "pad_where_separate": lambda T, n: _pad(T, n),
    "pad_hf_int": lambda T, n: _pad(T, n, dtype=torch.int64),
    "pad_finfo_min": lambda T, n: _pad(T, n),
    "pad_safe_softmax": lambda T, n: _pad(T, n),
    "pad_from_token_ids": lambda T, n: _pad(T, n).long() * torch.randint(1, 50, (B, T)),
    "pad_gqa_repeat": lambda T, n: _pad(T, n),
    "pad_inplace_fill": lambda T, n: _pad(T, n),
    "doc_eq": lambda T, n: _doc(T, n, contiguous=n % 2 == 0),
    "doc_ne_3d": lambda T, n: _doc(T, n, contiguous=n % 2 == 1),
    "doc_and_pad": lambda T, n: (_doc(T, n, contiguous=True), _pad(T, n)),
}
REWRITTEN = list(DATA)


def _same(a, b, what, rtol=1e-4, atol=1e-5):
    assert a.shape == b.shape, what
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb), f"{what}: NaN at other places ({int(na.sum())} against eager's {int(nb.sum())})"
    torch.testing.assert_close(a.masked_fill(na, 0), b.masked_fill(nb, 0), rtol=rtol, atol=atol, msg=what)


def _call(fn, args, data):
    args = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*args, data)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((out.nan_to_num(0.0) * w).sum(), args)   # NaN rows read as 0, as a masked loss would
    return out, grads


def compile_fn(fn, dynamic, **options):
    torch.compiler.reset()
    acp_compile.clear_compilations()
    opts = {"inner_backend": "aot_eager", "log_eps": None, "report": True, **options}
    return torch.compile(fn, backend="acp", options=opts, dynamic=dynamic)


def rewrites():
    records = acp_compile.compilations()
    return sum(len(r.sites) for r in records), [m for r in records for m in r.near_misses]


def run_case(name, dynamic, lengths=LENGTHS, shapes=None, **options):
    fn = getattr(sc, name)
    compiled = compile_fn(fn, dynamic, **options)
    acp_compile.report.reset()
    saw_empty_row = False
    for n, T in enumerate(lengths):
        args = _qkvf(T, n, **(shapes or {}))
        data = DATA[name](T, n)
        got, got_g = _call(compiled, args, data)
        want, want_g = _call(fn, args, data)
        _same(got, want, f"{name} output at T={T}")
        for i, (a, b) in enumerate(zip(got_g, want_g)):
            _same(a, b, f"{name} gradient of argument {i} at T={T}", rtol=1e-3, atol=1e-4)
        saw_empty_row |= bool(torch.isnan(want).any()) or name in ("pad_finfo_min", "pad_safe_softmax")
    sites, misses = rewrites()
    assert sites >= 1 and not misses, f"{name}: {sites} sites, near-misses {[str(m) for m in misses]}"
    if dynamic is True:                                   # one compile serves every length (no size specialised)
        assert sites == 1, f"{name}: compiled {sites} times under dynamic=True"
    served = sum(r.calls for r in acp_compile.report.sites())
    assert served == len(lengths), f"{name}: the op served {served} of {len(lengths)} calls"


@pytest.mark.parametrize("dynamic", [None, True], ids=["auto", "dynamic"])
@pytest.mark.parametrize("name", REWRITTEN)
def test_rewritten_and_equal_to_eager(name, dynamic):
    run_case(name, dynamic)


def test_rows_with_no_visible_key_match_eager():
    """The three semantics of an empty row, checked on the values themselves (left padding of batch 0)."""
    T = 12
    args = _qkvf(T, 0)
    pad = _pad(T, 0, holes=False)                          # batch 0: keys 0, 1 padded
    for name, expect in (("pad_and_causal", "nan"), ("pad_finfo_min", "mean"), ("pad_safe_softmax", "zero")):
        compiled = compile_fn(getattr(sc, name), None)
        got, got_g = _call(compiled, args, pad)
        assert rewrites()[0] == 1, name
        rows = got[0, :, :2]
        if expect == "nan":
            assert torch.isnan(rows).all() and not torch.isnan(got[0, :, 2:]).any()
            assert torch.isnan(got_g[2][0]).all() and not torch.isnan(got_g[2][1]).any()   # dv, as eager's 0 x NaN
        elif expect == "mean":
            torch.testing.assert_close(rows, args[2][0].mean(-2, keepdim=True).expand_as(rows))
        else:
            assert bool((rows == 0).all())


def test_gqa_padding_and_kv_cache_offset():
    run_case("pad_gqa_repeat", None, shapes={"Hkv": 1})
    run_case("pad_and_causal", None, lengths=(16, 20), shapes={"Tq": 5})


def test_pruning_on_within_the_eps_bound():
    """Default log_eps with fast-decaying heads: the padded rows' anchors keep the bound (compared loosely)."""
    fn = sc.pad_and_causal
    compiled = compile_fn(fn, None, log_eps=-10.0)
    T = 96
    args = _qkvf(T, 1)
    pad = _pad(T, 1)
    got, _ = _call(compiled, args, pad)
    want, _ = _call(fn, args, pad)
    atol = 2 * torch.exp(torch.tensor(-10.0)) * float(args[2].norm(dim=-1).max()) + 1e-5
    _same(got, want, "pruned", rtol=1e-4, atol=float(atol))
    assert rewrites()[0] == 1


LEFT_ALONE = {
    "pad_query_side": "query side",
    "pad_no_causal": "neither causal nor hides",
    "pad_hides_diagonal": "neither causal nor hides",
    "doc_no_causal": "neither causal nor hides",
    "doc_ordered": "other than as a key padding mask",
    "mask_from_q": "computes on per-call data",
    "pad_written_after": "writes in place",
    "pad_additive": "additive padding",
    "pad_hf_additive": "not a floating-point view",     # a key-side bias from per-call data
    "pad_mixed_fills": "different values",
    "alibi_with_padding_only": "",
}


@pytest.mark.parametrize("name", sorted(LEFT_ALONE))
def test_look_alikes_left_alone(name):
    fn = getattr(sc, name)
    compiled = compile_fn(fn, None)
    T = 16
    args = _qkvf(T, 0)
    pad = _pad(T, 0, left=False) if name != "pad_hf_additive" else _pad(T, 0, left=False, dtype=torch.int64)
    if name.startswith("doc"):
        pad = _doc(T, 0, contiguous=False)
    got = compiled(*args, pad)
    want = fn(*args, pad)
    _same(got, want, name)
    sites, misses = rewrites()
    assert sites == 0, f"{name} was rewritten"
    assert misses and LEFT_ALONE[name] in misses[0].reason, f"{name}: {[m.reason for m in misses]}"


def test_bf16_fill_of_the_logits_dtype():
    """bf16 logits filled with bf16's finfo.min: empty rows are the mean of v, as in eager (bf16 tolerance)."""
    def fn(q, k, v, fg, pad):
        keep = sc.causal(q.shape[-2], k.shape[-2]) & pad[:, None, None, :]
        return sc.logits(q, k, fg).to(q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min).softmax(-1) @ v
    T = 12
    q, k, v, fg = _qkvf(T, 0)
    args = [q.bfloat16(), k.bfloat16(), v.bfloat16(), fg]
    pad = _pad(T, 0)
    compiled = compile_fn(fn, None)
    got, want = compiled(*args, pad), fn(*args, pad)
    assert rewrites()[0] == 1
    _same(got.float(), want.float(), "bf16", rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dynamic", [None, True], ids=["auto", "dynamic"])
def test_causal_buffer_with_padding_and_buffer_edit(dynamic):
    """The static part in a module buffer: proven with the padding, re-checked when the buffer changes; an edit that
    opens future keys makes those calls run the original graph (equal to eager either way)."""
    eager, model = sc.BufferCausalPad(), sc.BufferCausalPad()
    compiled = compile_fn(model, dynamic)
    acp_compile.report.reset()
    for n, T in enumerate((16, 23, 9, 23)):
        if n == 3:
            for m in (eager, model):
                m.bias[..., 5] = True                          # key 5 visible to every row, also earlier ones
        args, pad = _qkvf(T, n), _pad(T, n)
        got, got_g = _call(compiled, args, pad)
        want, want_g = _call(eager, args, pad)
        _same(got, want, f"T={T}")
        for a, b in zip(got_g, want_g):
            _same(a, b, f"gradient at T={T}", rtol=1e-3, atol=1e-4)
    assert rewrites()[0] >= 1
    assert sum(r.calls for r in acp_compile.report.sites()) == 3      # the edited call ran the original graph


def test_one_token_decode_with_padding():
    run_case("pad_and_causal", None, lengths=(16, 20), shapes={"Tq": 1})
