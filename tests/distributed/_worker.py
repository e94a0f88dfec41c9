"""Runs the distributed scenarios on `world` CPU ranks (gloo) and writes one result file per rank.

    python tests/distributed/_worker.py OUT_DIR PORT SCENARIO [SCENARIO ...]

Each rank builds the model from seed 0, takes its share of every global batch, trains a few SGD
steps under backend="acp", and saves: what the pass did on this rank (acp_compile.compilations()),
how often the op's forward and backward ran in the first step, and the parameters after the last
step (full tensors under FSDP2). tests/distributed/test_distributed.py compares them with a
single-process run.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fox_dist_model import FoxLM  # noqa: E402

WORLD = 2
STEPS = 3
B_GLOBAL, T = 4, 24
# wrap: how the model is distributed and compiled; model: FoxLM arguments
SCENARIOS = {
    "compile_ddp_buffer": dict(wrap="compile(ddp)", model=dict(mask="buffer")),
    "ddp_compile_passed": dict(wrap="ddp(compile)", model=dict(mask="passed")),
    "ddp_split_site": dict(wrap="compile(ddp)", model=dict(mask="buffer", gate="between", n_layer=1)),
    "fsdp2": dict(wrap="fsdp2", model=dict(mask="buffer"), report=True),
    # compiled autograd applies to backward() called inside a compiled function: the whole step is
    # compiled, with DDP's Python reducer (what torch asks for with compiled autograd)
    "compiled_autograd": dict(wrap="compile(step)", model=dict(mask="buffer"), compiled_autograd=True, report=True),
}
OPTIONS = {"inner_backend": "aot_eager"}


def global_batches(steps=STEPS, B=B_GLOBAL, T=T, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, vocab, (B, T), generator=g) for _ in range(2)) for _ in range(steps)]


def make_model(spec):
    torch.manual_seed(0)
    return FoxLM(**spec["model"])


def op_calls(prof) -> dict:
    """Calls of the op's forward and backward that a torch.profiler run recorded."""
    names = [e.name for e in prof.events()]
    return dict(fwd=names.count("acp::fox_attention_fwd"), bwd=names.count("acp::fox_attention_bwd"))


def _module_layers(gm):
    """The blocks ("layers.N") whose code appears in a compiled graph."""
    import re
    found = set()
    for n in gm.graph.nodes:
        for path, *_ in (n.meta.get("nn_module_stack") or {}).values():
            m = re.search(r"layers\W+(?:_modules\W+)?(\d+)", str(path))
            if m:
                found.add(int(m.group(1)))
    return sorted(found)


def run_scenario(name, rank):
    import acp_compile
    from acp_compile import _torch_private as tp
    from torch.nn.parallel import DistributedDataParallel as DDP
    spec = SCENARIOS[name]
    torch._dynamo.reset()
    acp_compile.clear_compilations()
    torch._dynamo.utils.counters.clear()
    m = make_model(spec)
    wrap = spec["wrap"]
    OPTIONS = dict(globals()["OPTIONS"], report=bool(spec.get("report")))
    acp_compile.report.reset()
    old_ca, old_ddp = torch._dynamo.config.compiled_autograd, torch._dynamo.config.optimize_ddp
    if wrap == "compile(ddp)":
        model = torch.compile(DDP(m, bucket_cap_mb=1), backend="acp", options=OPTIONS)
    elif wrap == "ddp(compile)":
        model = DDP(torch.compile(m, backend="acp", options=OPTIONS), bucket_cap_mb=1)
    elif wrap == "compile(step)":
        torch._dynamo.config.optimize_ddp = "python_reducer"     # read when DDP is built
        model = DDP(m, bucket_cap_mb=1)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in m.layers:
            fully_shard(layer)
        fully_shard(m)
        model = torch.compile(m, backend="acp", options=OPTIONS)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    share = B_GLOBAL // WORLD
    counts = None
    torch._dynamo.config.compiled_autograd = bool(spec.get("compiled_autograd"))
    if wrap == "compile(step)":
        ddp_model = model

        def model(idx, tgt):                 # forward and backward in one compiled function
            loss = ddp_model(idx, tgt)
            loss.backward()
            return loss.detach()
        model = torch.compile(model, backend="acp", options=OPTIONS)
    try:
        for step, (idx, tgt) in enumerate(global_batches()):
            idx, tgt = idx[rank * share:(rank + 1) * share], tgt[rank * share:(rank + 1) * share]
            # The op is counted in the second step (compiled by then), through the profiler: a
            # Python dispatch mode would make Dynamo trace differently.
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if step == 1 else None
            if prof is not None:
                prof.__enter__()
            opt.zero_grad(set_to_none=True)
            loss = model(idx, tgt)
            if wrap != "compile(step)":
                loss.backward()
            if prof is not None:
                prof.__exit__(None, None, None)
                counts = op_calls(prof)
            opt.step()
    finally:
        torch._dynamo.config.compiled_autograd, torch._dynamo.config.optimize_ddp = old_ca, old_ddp
    params = {}
    for pname, p in m.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        params[pname] = p.detach().clone()
    recs = acp_compile.compilations()
    return dict(
        sites=[list(r.sites) for r in recs],
        report_sites=sorted(s.site for s in acp_compile.report.sites()),
        near_misses=[[str(x) for x in r.near_misses] for r in recs],
        fell_back=[r.fell_back for r in recs],
        layers=[_module_layers(r.graph) for r in recs],
        ddp_pieces=sum(tp.is_ddp_piece(r.graph) for r in recs),
        counts=counts, params=params,
        compiled_autograd_captures=int(torch._dynamo.utils.counters["compiled_autograd"]["captures"]),
    )


def worker(rank, out_dir, port, names):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    try:
        for name in names:
            try:
                results[name] = run_scenario(name, rank)
            except Exception as err:  # noqa: BLE001 - reported per scenario to the test
                import traceback
                results[name] = dict(error=f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, port, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    mp.spawn(worker, args=(out_dir, port, names), nprocs=WORLD)
