"""The examples end to end, shortened for CI: the demo training under backend="acp", pruning on and
off, the stdlib corpus, KV-cache decoding against full recomputation, and the W2 table helpers.

The acp runs compile the rest of the graph with inner_backend="aot_eager" (inductor's C++ compile
takes minutes on 2 cores); the attention goes through the same pass and op either way.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
sys.path.insert(0, str(EXAMPLES / "benchmarks"))

import corpus  # noqa: E402
import fox_model  # noqa: E402
import generate  # noqa: E402
import train  # noqa: E402
from acp_compile import _torch_private  # noqa: E402

FAST_ACP = {"inner_backend": "aot_eager"}


@pytest.fixture(scope="module")
def small_corpus():
    return corpus.load_corpus(max_bytes=1_500_000)


def demo_settings(**kw) -> train.TrainSettings:
    base = dict(config="tiny", seq_len=256, batch_size=2, steps=12, lr=3e-3, warmup=3, eval_every=6,
                eval_batches=1, progress=False, inner_backend="aot_eager")
    return train.TrainSettings(**(base | kw))


def test_corpus_is_deterministic_and_splits_by_file(small_corpus):
    files = corpus.stdlib_source_files()
    rel = [p.relative_to(corpus.stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel) and len(set(rel)) == len(rel)
    assert not any(part in corpus.EXCLUDED_DIRS for r in rel for part in r.split("/"))
    again = corpus.load_corpus(max_bytes=1_500_000)
    assert torch.equal(again.train, small_corpus.train) and torch.equal(again.heldout, small_corpus.heldout)
    # Held-out documents are whole files that do not appear in the training split.
    docs = bytes(small_corpus.heldout.tolist()).split(corpus.DOCUMENT_SEPARATOR)
    train_bytes = bytes(small_corpus.train.tolist())
    long_docs = [d for d in docs if len(d) > 2000]
    assert long_docs, "expected at least one sizeable held-out file"
    assert all(d not in train_bytes for d in long_docs)


def test_batch_sampler_same_seed_same_batches(small_corpus):
    a = corpus.BatchSampler(small_corpus.train, 3, 32, seed=5)
    b = corpus.BatchSampler(small_corpus.train, 3, 32, seed=5)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])          # targets are the inputs shifted by one


def test_forget_gate_init_follows_the_paper():
    model = fox_model.FoxLM(fox_model.paper_125m_config())
    bias = model.blocks[0].attn.fgate_proj.bias
    assert (bias == fox_model.LOCAL_FGATE_BIAS).sum() == 9 and (bias == fox_model.GLOBAL_FGATE_BIAS).sum() == 3
    assert abs(model.blocks[5].attn.fgate_proj.weight.std().item() - fox_model.FGATE_WEIGHT_STD) < 3e-4
    assert model.lm_head.weight is model.embed.weight


def test_demo_trains_under_acp_and_matches_pruning_off(small_corpus):
    """The CI version of `python examples/train.py`: loss falls, the pass rewrote every layer,
    tiles were skipped in the local heads and none in the global one, and the loss curve equals
    the one with pruning off (same seed, same batches) within the eps tolerance's noise."""
    s = demo_settings()
    acp = train.train_one("acp", s, small_corpus)
    cfg = fox_model.tiny_config()
    assert all(math.isfinite(v) for v in acp.train_loss)
    assert sum(acp.train_loss[-3:]) / 3 < acp.train_loss[0] - 1.0, acp.train_loss
    # Every layer ran our op: the report has a row per layer. The rewrite count can be below n_layers when
    # Dynamo compiles one block's frame and reuses it for the next (seen once in CI under pytest-xdist).
    assert acp.acp_counts.get("fox_attention", 0) >= 1 and acp.acp_counts.get("near_miss", 0) == 0
    skipped = torch.tensor(acp.skipped_per_head[-1])                       # (layers, heads)
    assert skipped.shape == (cfg.n_layers, cfg.n_heads)
    assert 0 < acp.skipped_fraction < 1
    assert (skipped[:, : cfg.n_local_heads] > 0).any()
    assert (skipped[:, cfg.n_local_heads:] == 0).all()                     # global heads keep everything

    dense = train.train_one("acp-no-prune", s, small_corpus)
    assert dense.skipped_fraction == 0
    diffs = [abs(a - b) for a, b in zip(acp.train_loss, dense.train_loss)]
    assert max(diffs) < 0.02, diffs


def test_train_cli_parses_and_rejects_no_prune_without_acp():
    _, s = train.parse_args(["--config", "tiny", "--steps", "3", "--seq-len", "64"])
    assert (s.config, s.steps, s.seq_len) == ("tiny", 3, 64)
    with pytest.raises(SystemExit):
        train.parse_args(["--backend", "inductor", "--no-prune"])


def _sharp_tiny_model(seed: int = 0) -> fox_model.FoxLM:
    """An untrained tiny model with larger weights, so that its logits are far from uniform and a
    wrong cache shows up in the argmax."""
    torch.manual_seed(seed)
    model = fox_model.FoxLM(fox_model.tiny_config(init_std=0.2))
    return model.eval()


def test_kv_cache_decoding_under_acp_matches_full_recompute():
    """Greedy and temperature sampling with the cache, compiled with backend="acp": the prompt's
    attention (Tq = Tk) and every one-token step (Tq = 1 against the cache) go through the op, and
    the tokens and logits equal decoding without a cache, up to the eps tolerance."""
    model = _sharp_tiny_model()
    prompt = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(1))
    decoder = generate.compiled_decoder(model, "acp", FAST_ACP)
    counters = _torch_private.acp_counters()
    before = dict(counters)
    for temperature in (0.0, 0.9):
        tokens, cached_logits = generate.generate(decoder, prompt, 12, temperature,
                                                  generator=torch.Generator().manual_seed(2))
        ref_tokens, ref_logits = generate.generate_without_cache(model, prompt, 12, temperature,
                                                                 generator=torch.Generator().manual_seed(2))
        assert torch.equal(tokens, ref_tokens)
        # The eps bound: each pruned row loses at most exp(-10) of its attention mass.
        torch.testing.assert_close(cached_logits, ref_logits, atol=2e-3, rtol=0)
        assert cached_logits.std() > 0.5                                  # logits are not flat
    n_layers = model.cfg.n_layers
    assert counters["near_miss"] == before.get("near_miss", 0), "an attention fell back to the model's code"
    # One graph for the prompt, one for the one-token steps, each with every layer rewritten.
    assert counters["fox_attention"] - before.get("fox_attention", 0) >= 2 * n_layers


def test_eager_kv_cache_equals_teacher_forced_logits():
    """The model's own cache path (no compilation): exact up to fp32 rounding."""
    model = _sharp_tiny_model(3)
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    tokens, cached = generate.generate(model.forward_with_cache, prompt, 25)
    torch.testing.assert_close(cached, generate.logits_without_cache(model, tokens, 40), atol=1e-4, rtol=1e-4)


def test_w2_table_and_ratios():
    import bench_w2
    results = [
        {"run": "acp", "seq_len": 16384, "batch": 2, "tokens_per_s": 150000, "peak_memory_gb": 40.0,
         "losses": [10.9], "status": "ok", "skipped": {"overall": 0.6}},
        {"run": "acp-no-prune", "seq_len": 16384, "batch": 2, "tokens_per_s": 100000, "peak_memory_gb": 41.0,
         "losses": [10.9], "status": "ok"},
        {"run": "inductor", "seq_len": 16384, "batch": 2, "status": "out of memory"},
    ]
    assert bench_w2.ratios(results) == {"acp/acp-no-prune at T=16384": 1.5}
    table = bench_w2.markdown_table(results)
    assert "| 16k (2) | acp | 150.0k | 40.0 | 60% | 10.900 | ok |" in table
    assert "out of memory" in table


def test_w2_step_windows_and_per_step_stats_on_cpu(tmp_path):
    """bench_w2 --per-step-stats on a tiny CPU run: one statistics record per step of the acp run, the
    step windows of issue 13 from the mean step time, and the per-step plot."""
    import bench_w2
    assert bench_w2.step_windows([1.0] * 2 + [0.5] * 6, 1000) == {"steps 3-8": 2000}
    assert set(bench_w2.step_windows([0.25] * 50, 1000)) == {"steps 3-8", "steps 40-50"}
    a = bench_w2.parse_args(["--device", "cpu", "--config", "tiny", "--tokens-per-step", "256", "--warmup", "1",
                             "--steps", "2", "--per-step-stats", "--no-report-skips", "--out", str(tmp_path)])
    r = bench_w2.measure_one("acp", 128, a)
    assert r["status"] == "ok" and len(r["per_step_stats"]) == 3
    assert all(s["calls"] >= 1 and 0.0 <= s["skipped_fraction"] <= 1.0 and s["u_paper_max"] > 0
               for s in r["per_step_stats"])
    bench_w2.write_results([r], bench_w2.environment("cpu"), {}, tmp_path)
    assert (tmp_path / "w2_per_step.png").exists() or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_generate_cli_compares_paged_eviction_and_the_dense_baseline(capsys):
    """The CI version of `python examples/generate.py --compare`: three runs, tokens/s and cache bytes
    printed; eviction never holds more pages than the cache without it."""
    runs = generate.main(["--config", "tiny", "--tokens", "12", "--compare", "--prompt", "x" * 70])
    out = capsys.readouterr().out
    assert "eviction on" in out and "eviction off" in out and "dense baseline" in out and "tokens/s" in out
    on, off, dense = runs
    assert on["tokens_per_s"] > 0 and off["tokens_per_s"] > 0 and dense["tokens_per_s"] > 0
    assert on["in_use"] <= off["in_use"] and on["tokens"].shape == dense["tokens"].shape == (1, 82)


def test_bench_generate_smoke_writes_json(tmp_path):
    import bench_generate
    r = bench_generate.main(["--smoke", "--tokens", "24", "--record-every", "8", "--out", str(tmp_path)])
    saved = __import__("json").loads((tmp_path / "generate.json").read_text())
    assert [v["variant"] for v in saved["variants"]] == ["evict", "no_evict", "dense"]
    for v in saved["variants"]:
        assert "error" not in v, v
        assert v["tokens_generated"] == 24 and v["last_logits_finite"] and not v["overflow"]
        assert [p["context"] for p in v["points"]] == [32 + 11, 32 + 19, 32 + 24]
    assert saved["meta"]["torch"] == torch.__version__ and r["meta"]["date"]
