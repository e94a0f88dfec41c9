"""What the op pruned, call by call, while a model trains (issue 13: the skipped fraction and the bound per step).

    from acp_compile import step_stats
    with step_stats.recording() as rec:          # around one training step (forward and backward)
        loss = compiled(x, y); loss.backward()
    rec.summary()   # {"calls", "skipped_fraction", "u_paper_max", "delta_paper_min", "skipped_decay_max",
                    #  "exact_kv_fraction", "exact_q_fraction"}

Each forward of acp::fox_attention_fwd made while a recorder is active adds a few device-side reductions of
its own inputs and outputs (no host sync; `summary()` syncs once):
  skipped keys      sum over rows of min(keep_from_i, visible_i), visible_i = i + Tk - Tq + 1 keys under the
                    causal mask (padding and document masks are not subtracted: with them the fraction is
                    of the causal triangle, a lower bound of the fraction of visible keys skipped);
  u_paper           the paper's bound U = scale max_i ||q_i|| max_j ||k_j|| per (b, head) (a full read of q
                    and k, paid only while recording): it shows how far the paper's rule would be from the
                    data, as U grows in training;
  skipped decay     the largest decay c_i - c_j over the keys j a row skipped (for monotone c, j = keep_from_i
                    - 1): the certificate's effective threshold in nats, to compare with the paper's delta.
Each Triton backward adds the fraction of its dk/dv and of its dq programs that take the exact form (a block
whose c spreads by more than configs.C_SPAN_LIMIT; kernels/observe.py): such a program computes all its
tiles in the slower form, so the fractions tell where a backward's time grows as the gates sharpen.
The recorder is process-wide, not per thread: CUDA autograd runs the backward in its own thread. The op's
results do not depend on recording. Under CUDA graphs (mode="reduce-overhead") the op's Python runs only
while a graph is recorded, so nothing is counted on replays.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from acp_compile.kernels import observe
from acp_compile.kernels.plan import torch_qk_bound

_active: list["Recorder"] = []            # the recorders of nested recording() blocks, innermost last


@dataclass(eq=False)            # identity: nested recorders with equal contents are different recorders
class Recorder:
    log_eps: list = field(default_factory=list)
    rows: list = field(default_factory=list)          # per call: (skipped keys, causal keys) as a (2,) fp64 tensor
    u_paper: list = field(default_factory=list)       # per call: max over (b, head) of U, fp32 scalar tensor
    decay: list = field(default_factory=list)         # per call: max skipped decay, fp32 scalar (-inf: none)
    lengths: list = field(default_factory=list)       # per call: Tk
    exact: list = field(default_factory=list)         # per Triton backward: (2,) fp32 exact dk/dv, dq fractions

    def add(self, q: Tensor, k: Tensor, c: Tensor, scale: float, log_eps, keep_from: Tensor) -> None:
        with torch.no_grad():
            Tq, Tk = q.shape[2], k.shape[2]
            visible = torch.arange(Tk - Tq + 1, Tk + 1, device=q.device)                  # (Tq,)
            kf = keep_from.to(torch.int64)
            skipped = torch.minimum(kf, visible).sum().double()
            causal = visible.sum().double() * q.shape[0] * q.shape[1]
            self.rows.append(torch.stack([skipped, causal.expand_as(skipped)]))
            self.u_paper.append(torch_qk_bound(q, k, scale).amax())
            c_row = c[:, :, Tk - Tq:].float()                                             # (B, Hq, Tq)
            c_old = c.float().gather(2, (kf - 1).clamp(min=0))                            # newest skipped key
            d = torch.where(kf > 0, c_row - c_old, float("-inf"))
            self.decay.append(d.amax())
            self.log_eps.append(log_eps)
            self.lengths.append(Tk)

    def observe(self, name: str, values: dict) -> None:
        if name == "backward_exact_modes":
            self.exact.append(torch.stack([values["kv"].float().mean(), values["q"].float().mean()]))

    def summary(self) -> dict:
        """Host numbers (one sync): calls, skipped fraction of the causal keys, the largest U of the paper's
        rule, its threshold delta = log eps - log Tk - 2U at that U, and the largest decay that was skipped."""
        exact = torch.stack(self.exact).mean(0).tolist() if self.exact else [None, None]
        if not self.rows:
            return {"calls": 0, "exact_kv_fraction": exact[0], "exact_q_fraction": exact[1]}
        rows = torch.stack(self.rows).sum(0).tolist()
        u = float(torch.stack(self.u_paper).amax())
        decay = float(torch.stack(self.decay).amax())
        eps = [e for e in self.log_eps if e is not None]
        delta = min(e - math.log(n) - 2 * u for e, n in zip(eps, self.lengths)) if eps else None
        return {"calls": len(self.rows), "skipped_fraction": rows[0] / max(rows[1], 1.0), "u_paper_max": u,
                "delta_paper_min": delta, "skipped_decay_max": None if decay == float("-inf") else decay,
                "exact_kv_fraction": exact[0], "exact_q_fraction": exact[1]}


def active() -> Recorder | None:
    return _active[-1] if _active else None


@contextlib.contextmanager
def recording():
    """Records every call of the op (and every Triton backward) until the block ends; yields the Recorder."""
    rec = Recorder()
    _active.append(rec)
    observe.add(rec.observe)
    try:
        yield rec
    finally:
        observe.remove(rec.observe)
        _active.remove(rec)
