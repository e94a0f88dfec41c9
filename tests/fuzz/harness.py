"""Shared machinery for the soundness tests and the differential fuzzer.

The oracle is eager PyTorch: a program compiled with backend="acp" must give eager's output (and
gradients) at every length it is called with, whether the pass rewrote its attention or left it alone.

Tolerances:
- log_eps=None (dense): only rounding differs (blocked softmax vs eager's), so rtol=1e-4 and an atol of
  1e-5 scaled by the result's magnitude (fp32).
- log_eps=L (pruned): the op drops at most eps = exp(L) of each row's attention mass, so each output
  element moves by at most 2 * eps * max_j ||v_j||_2 (README, "How ACP decides"); that bound is added to the
  rounding atol. Gradients have no published bound under pruning; they are compared under log_eps=None only
  (and under pruning with a loose, magnitude-scaled atol), so a wrong mask still shows as an O(1) error.
"""
from __future__ import annotations

import dataclasses
import math
import os
import traceback
from typing import Callable, Sequence

import torch
from torch._dynamo.utils import counters

FINDINGS = os.path.join(os.path.dirname(__file__), "..", "..", ".fuzz_findings.md")


@dataclasses.dataclass
class Outcome:
    rewritten: int = 0          # counters["acp"]["fox_attention"] after all calls
    near_miss: int = 0          # counters["acp"]["near_miss"]
    error: str | None = None    # an exception from compile or a compiled call (the pass must never raise)
    mismatch: str | None = None  # the first call whose output/gradient differs from eager beyond tolerance
    max_err: float = 0.0

    @property
    def wrong(self) -> bool:
        return self.error is not None or self.mismatch is not None


def out_atol(ref: torch.Tensor, v: torch.Tensor | None, log_eps: float | None) -> float:
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    atol = 1e-5 * scale
    if log_eps is not None and v is not None and v.numel():
        vnorm = float(v.detach().float().norm(dim=-1).max())
        atol += 2.0 * math.exp(log_eps) * vnorm
    return atol


def grad_tols(ref: torch.Tensor, log_eps: float | None) -> tuple[float, float]:
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    if log_eps is None:
        return 1e-3, 1e-4 * scale
    # no published bound for gradients under pruning: eps-sized relative to the gradient's magnitude, with room
    return 1e-3, (1e-4 + 50.0 * math.exp(log_eps)) * scale


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def _clone_args(args):
    return [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]


def _first_diff(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> float | None:
    """None when close (NaN only where the other is NaN too); else the max abs error (inf for a NaN mismatch)."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return float("inf")
    a, b = a.masked_fill(na, 0), b.masked_fill(nb, 0)
    err = (a - b).abs()
    if bool((err <= atol + rtol * b.abs()).all()):
        return None
    return float(err.max())


def run_and_compare(
    make_fn: Callable[[], Callable],
    calls,
    *,
    dynamic,
    log_eps: float | None = None,
    grad_argnums: Sequence[int] = (),
    v_argnum: int | None = 2,
    between_calls: Callable[[Callable, Callable, int], None] | None = None,
    inner_backend: str = "aot_eager",
    fullgraph: bool = False,
    clone_args: bool = True,
) -> Outcome:
    """Compile make_fn() with backend="acp" and call it with each argument list, comparing with eager.

    calls: a sequence of argument lists, or (n, make_args) to build call i's arguments just before it (so
    earlier calls' tensors are freed and a new tensor may land at an old one's address, as in a training loop).
    make_fn builds two independent instances (eager's and the compiled one), so module state edited between
    calls (between_calls(eager_fn, compiled_fn, i), run before call i) stays in step. grad_argnums: arguments
    (floating tensors) that get requires_grad; the loss is a fixed random projection of every output.
    clone_args=False hands the very same tensors to eager and the compiled program (for tests that edit an
    input in place between calls); the programs must then not write to their inputs.
    """
    torch.compiler.reset()
    counters.clear()
    res = Outcome()
    eager_fn, model = make_fn(), make_fn()
    opts = {"inner_backend": inner_backend, "log_eps": log_eps}
    try:
        compiled = torch.compile(model, backend="acp", options=opts, dynamic=dynamic, fullgraph=fullgraph)
    except Exception as e:  # noqa: BLE001
        res.error = f"torch.compile raised {type(e).__name__}: {e}"
        return res
    if isinstance(calls, tuple) and len(calls) == 2 and callable(calls[1]):
        ncalls, make_args = calls
    else:
        ncalls, make_args = len(calls), (lambda i, _c=calls: _c[i])
    for n in range(ncalls):
        args = make_args(n)
        if between_calls is not None:
            between_calls(eager_fn, model, n)
        if clone_args:
            ref_args, cmp_args = _clone_args(args), _clone_args(args)
        else:
            ref_args, cmp_args = list(args), list(args)
            for i in grad_argnums:
                ref_args[i], cmp_args[i] = args[i].detach().clone(), args[i].detach().clone()
        for i in grad_argnums:
            ref_args[i].requires_grad_(True)
            cmp_args[i].requires_grad_(True)
        ref = _flatten(eager_fn(*ref_args))
        for r in ref:
            assert torch.isfinite(r).all(), "test bug: eager itself gives a non-finite result for this program"
        try:
            out = _flatten(compiled(*cmp_args))
        except Exception as e:  # noqa: BLE001
            tb = traceback.format_exc(limit=-3)
            res.error = f"call {n} (shapes {[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}) raised {type(e).__name__}: {str(e)[:400]}\n{tb[-800:]}"
            break
        v = args[v_argnum] if v_argnum is not None else None
        bad = None
        if len(out) != len(ref):
            bad = (f"call {n}: {len(out)} outputs, eager gave {len(ref)}", float("inf"))
        for j, (o, r) in enumerate(zip(out, ref)):
            if bad:
                break
            d = _first_diff(o, r, 1e-4, out_atol(r, v, log_eps))
            if d is not None:
                bad = (f"call {n} (T={_lengths(args)}): output {j} max err {d:.3g}", d)
        if bad is None and grad_argnums:
            g = torch.Generator().manual_seed(1234 + n)
            ws = [torch.randn(r.shape, generator=g) for r in ref]
            lr = sum((r * w).sum() for r, w in zip(ref, ws))
            lo = sum((o * w).sum() for o, w in zip(out, ws))
            gr = torch.autograd.grad(lr, [ref_args[i] for i in grad_argnums], allow_unused=True)
            try:
                go = torch.autograd.grad(lo, [cmp_args[i] for i in grad_argnums], allow_unused=True)
            except Exception as e:  # noqa: BLE001
                res.error = f"call {n}: backward raised {type(e).__name__}: {str(e)[:400]}"
                break
            for i, a, b in zip(grad_argnums, go, gr):
                if a is None and b is None:
                    continue
                if a is None or b is None:
                    bad = (f"call {n}: grad of arg {i} is None on one side", float("inf"))
                    break
                rtol, atol = grad_tols(b, log_eps)
                d = _first_diff(a, b, rtol, atol)
                if d is not None:
                    bad = (f"call {n} (T={_lengths(args)}): grad of arg {i} max err {d:.3g}", d)
                    break
        if bad is not None:
            res.mismatch, res.max_err = bad
            break
        del args, ref_args, cmp_args, ref, out
    res.rewritten = int(counters["acp"].get("fox_attention", 0))
    res.near_miss = int(counters["acp"].get("near_miss", 0))
    return res


def _lengths(args) -> list[int]:
    return [a.shape[-2] for a in args[:3] if isinstance(a, torch.Tensor) and a.dim() >= 2][:2]


def record_finding(family: str, text: str) -> None:
    """Append a reproduction to .fuzz_findings.md (git-ignored), once per family per file."""
    path = os.path.abspath(FINDINGS)
    try:
        existing = open(path).read() if os.path.exists(path) else ""
    except OSError:
        return
    key = f"<!-- family: {family} -->"
    if key in existing:
        return
    with open(path, "a") as f:
        f.write(f"\n{key}\n{text.rstrip()}\n")
