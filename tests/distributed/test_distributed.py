"""backend="acp" under DDP and FSDP2 on 2 CPU ranks (gloo), with compiled autograd.

One child process (tests/distributed/_worker.py) spawns both ranks and runs every scenario in turn;
each rank reports what the pass did (acp_compile.compilations()), how often the op's forward and
backward ran in a compiled step, and its parameters after 3 SGD steps on its half of every batch.
The tests check, per scenario and rank:
  - every attention site is rewritten, including when DDP's graph splitter (1 MiB buckets) cuts the
    graph inside blocks and hands each piece fake example inputs, with the causal mask a registered
    buffer (nanoGPT) or a mask the model builds once and passes to every block;
  - the op runs in the forward and the backward;
  - the parameters equal a single-process eager run on the whole batches;
  - where a bucket boundary cuts a site in half, the near-miss says so (and training still matches);
  - compiled autograd (the whole step compiled, DDP's Python reducer, as torch requires with it; no
    DDPOptimizer split then) compiles the backward and runs the op in it.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _worker  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

REWRITTEN = ["compile_ddp_buffer", "ddp_compile_passed", "fsdp2", "compiled_autograd"]
ALL = REWRITTEN + ["ddp_split_site"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_worker.py"), str(out), str(_free_port()), *ALL],
                          capture_output=True, text=True, timeout=300, env=env)
    ranks = []
    for r in range(_worker.WORLD):
        path = out / f"rank{r}.pt"
        assert path.exists(), f"rank {r} wrote no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        ranks.append(torch.load(path, weights_only=False))
    return ranks


def _scenario(results, name):
    per_rank = [res[name] for res in results]
    for r, res in enumerate(per_rank):
        assert "error" not in res, f"rank {r}: {res.get('error')}"
    return per_rank


def _single_process_params(name):
    spec = _worker.SCENARIOS[name]
    model = _worker.make_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for idx, tgt in _worker.global_batches():
        loss = model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", REWRITTEN)
def test_every_site_is_rewritten_on_every_rank(results, name):
    n_layer = _worker.make_model(_worker.SCENARIOS[name]).layers.__len__()
    for r, res in enumerate(_scenario(results, name)):
        sites = [s for piece in res["sites"] for s in piece]
        assert not [m for piece in res["near_misses"] for m in piece], (r, res["near_misses"])
        assert not any(res["fell_back"]), (r, res["fell_back"])
        if name == "fsdp2":
            # fully_shard makes Dynamo compile Block.forward once, and that graph serves every block:
            # one compile-time site, which the report names after the block that runs it.
            assert sites == ["attn"], (r, res["sites"])
            assert res["report_sites"] == [f"layers.{i}.attn" for i in range(n_layer)], (r, res["report_sites"])
        elif name == "compiled_autograd":
            # the compiled step reaches the model through a closure variable and DDP's `module`; the
            # report names leave both out
            assert sorted(sites) == [f"ddp_model.module.layers.{i}.attn" for i in range(n_layer)], (r, res["sites"])
            assert res["report_sites"] == [f"layers.{i}.attn" for i in range(n_layer)], (r, res["report_sites"])
        else:
            assert sorted(sites) == [f"layers.{i}.attn" for i in range(n_layer)], (r, res["sites"])
        assert res["counts"] == {"fwd": n_layer, "bwd": n_layer}, (r, res["counts"])


@pytest.mark.parametrize("name", ["compile_ddp_buffer", "ddp_compile_passed"])
def test_ddp_splits_the_graph_inside_blocks(results, name):
    """The scenarios above are only meaningful if DDP's optimizer split the graph, through a block."""
    for r, res in enumerate(_scenario(results, name)):
        assert res["ddp_pieces"] >= 2, (r, res["ddp_pieces"])
        pieces_per_layer = {}
        for layers in res["layers"]:
            for i in layers:
                pieces_per_layer[i] = pieces_per_layer.get(i, 0) + 1
        assert max(pieces_per_layer.values()) >= 2, (r, res["layers"])


def test_compiled_autograd_compiles_the_backward(results):
    for r, res in enumerate(_scenario(results, "compiled_autograd")):
        assert res["compiled_autograd_captures"] > 0, r


def test_a_site_cut_by_a_bucket_boundary_says_so(results):
    for r, res in enumerate(_scenario(results, "ddp_split_site")):
        reasons = [m for piece in res["near_misses"] for m in piece]
        assert not [s for piece in res["sites"] for s in piece]
        assert reasons and all("DDP's graph split" in m and "bucket_cap_mb" in m for m in reasons), (r, reasons)
        assert res["counts"] == {"fwd": 0, "bwd": 0}


@pytest.mark.parametrize("name", ALL)
def test_parameters_match_a_single_process_run(results, name):
    ref = _single_process_params(name)
    for r, res in enumerate(_scenario(results, name)):
        assert set(res["params"]) == set(ref)
        for pname, p in ref.items():
            torch.testing.assert_close(res["params"][pname], p, rtol=1e-3, atol=1e-4,
                                       msg=f"rank {r}: {pname} differs from the single-process run")
