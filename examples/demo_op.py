"""A small CPU demo of the FoX attention op with Adaptive Computation Pruning.

    python examples/demo_op.py                 # B=1, 4 heads (2 local, 2 global), T=1024, D=64, fp32
    python examples/demo_op.py --T 2048 --log-eps -6

Prints the shapes, the fraction of tiles that ACP skipped per head (from kernels.plan, the same plan
the op uses), the largest error of the op against dense fp64 attention, and the guarantee
2 * eps * max_j ||v_j|| that this error must stay under. Then runs one backward pass.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import acp_compile
from acp_compile.kernels import blocked
from acp_compile.kernels.plan import make_plan, skipped_fraction
from acp_compile.kernels.reference import fox_attention_reference


def make_inputs(B: int, H: int, T: int, D: int, local_decay: float, seed: int):
    """q, k with unit-RMS rows (as after QK RMSNorm), v normal, and per-token log forget gates:
    the first half of the heads decay by about `local_decay` nats per token, the rest barely."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=g), dim=-1) * math.sqrt(D)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=g), dim=-1) * math.sqrt(D)
    v = torch.randn(B, H, T, D, generator=g)
    u = 0.5 + torch.rand(B, H, T, generator=g)                     # U(0.5, 1.5) per token
    rate = torch.full((H,), 1e-6)
    rate[: H // 2] = local_decay
    log_fgate = -rate[None, :, None] * u                            # (B, H, T), <= 0
    return q, k, v, log_fgate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--log-eps", type=float, default=-10.0, help="log of the per-row pruned-mass tolerance")
    ap.add_argument("--local-decay", type=float, default=0.3, help="nats of decay per token in the local heads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    q, k, v, log_fgate = make_inputs(args.B, args.H, args.T, args.D, args.local_decay, args.seed)
    print(f"acp_compile {acp_compile.__version__}, torch {torch.__version__}, device cpu")
    print(f"q, k, v: {tuple(q.shape)} (B, H, T, D) {q.dtype}; log_fgate: {tuple(log_fgate.shape)} (B, H, T)")
    print(f"log_eps = {args.log_eps} (eps = {math.exp(args.log_eps):.3g}); tiles of {blocked.BLOCK_M} x {blocked.BLOCK_N}")

    def best_ms(log_eps, reps=3):
        """Fastest of a few calls (the first call of a process also warms torch up)."""
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = acp_compile.fox_attention(q, k, v, log_fgate, log_eps=log_eps)
            times.append((time.perf_counter() - t0) * 1e3)
        return out, min(times)

    o, t_acp = best_ms(args.log_eps)
    o_dense_path, t_dense = best_ms(None)
    print(f"output: {tuple(o.shape)} {o.dtype}; forward {t_acp:.0f} ms with ACP, {t_dense:.0f} ms with pruning off "
          f"(wall clock, best of 3, {torch.get_num_threads()} threads; noisy on a busy machine)")

    c = torch.cumsum(log_fgate, dim=-1)                            # what the op receives
    plan = make_plan(q, k, c, 1 / math.sqrt(args.D), args.log_eps, None, blocked.BLOCK_M, blocked.BLOCK_N)
    frac = skipped_fraction(plan)                                  # (B, H)
    causal_tiles = int((plan.n_hi + 1).sum())
    for h in range(args.H):
        kind = "local" if h < args.H // 2 else "global"
        skipped = int(plan.start[0, h].sum())
        print(f"  head {h} ({kind:6s}): skipped {skipped:4d} of {causal_tiles} causal tiles ({frac[0, h]:.1%})")
    print(f"  all heads: {frac.mean():.1%} of tiles skipped")

    o_ref, _ = fox_attention_reference(q, k, v, c)                 # dense fp64 attention
    err = (o.double() - o_ref).abs().max().item()
    err_dense = (o_dense_path.double() - o_ref).abs().max().item()
    bound = 2 * math.exp(args.log_eps) * v.double().norm(dim=-1).max().item()
    print(f"max |o - dense fp64| = {err:.3g} with ACP ({err_dense:.3g} with pruning off); "
          f"guarantee 2*eps*max||v|| = {bound:.3g} (+ fp32 rounding)")

    q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), log_fgate.requires_grad_()
    t0 = time.perf_counter()
    acp_compile.fox_attention(q, k, v, log_fgate, log_eps=args.log_eps).square().mean().backward()
    print(f"backward through the op: {(time.perf_counter() - t0) * 1e3:.0f} ms for forward+backward; "
          f"grad shapes q {tuple(q.grad.shape)}, log_fgate {tuple(log_fgate.grad.shape)}")
    ok = err <= bound + 1e-4
    print("OK: the error is within the guarantee" if ok else "FAIL: the error exceeds the guarantee")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
