"""Differential fuzzer (issue #9): attention-like programs from a grammar, compiled with backend="acp",
must give eager's outputs (and gradients, for a subset) at every length, within the eps bound.

Each example draws a program (tests/fuzz/grammar.py), renders it to Python source, compiles an instance
with backend="acp" (inner_backend "aot_eager", dynamic=None or True, log_eps None or -10) and calls it at
the compile length and at 1-2 other lengths (at least one longer); programs with a padding input get a fresh
pad per call. Per program it records rewritten (counters fox_attention > 0), refused (near_miss > 0) and wrong
(an exception or a mismatch beyond the tolerance of tests/fuzz/harness.py); the test fails if any is wrong,
listing them, after the whole run (no shrinking: each example costs a compile). A reach positive on plain choices
(grammar.expect_rewrite: issue #11's spellings, causal, no writes or padding; any Dv) that is not rewritten is
"missed": it fails the test too, listed after the wrong ones.

Profiles:
  default (CI): ACP_FUZZ_PROFILE unset, 30 programs, B <= 2, Hkv <= 2, T <= 40, D <= 16 (about a minute on 2 cores).
  large: ACP_FUZZ_PROFILE=large, 300 programs (ACP_FUZZ_EXAMPLES=N overrides), same sizes.
  ACP_FUZZ_REPORT=path writes the counts (and the wrong programs) as JSON (path ending .json) or markdown.
Every wrong program's source also goes to .fuzz_findings.md (git-ignored), one per category.
"""
from __future__ import annotations

import collections
import json
import os
import time

from hypothesis import HealthCheck, Phase, given, settings

from fuzz.grammar import build, calls_for, category, expect_rewrite, expect_segments_rewrite, specs
from fuzz.harness import record_finding, run_and_compare

PROFILE = os.environ.get("ACP_FUZZ_PROFILE", "ci")
N_EXAMPLES = int(os.environ.get("ACP_FUZZ_EXAMPLES", 300 if PROFILE == "large" else 30))


def _write_report(path, stats, wrong, missed, elapsed):
    data = {"profile": PROFILE, "programs": stats["tried"], "rewritten": stats["rewritten"],
            "refused": stats["refused"], "untouched": stats["untouched"], "wrong": stats["wrong"],
            "wrong_rewritten": stats["wrong_rewritten"], "errors": stats["errors"],
            "reach_programs": stats["reach"], "reach_positives": stats["positives"],
            "reach_positives_rewritten": stats["positives_rewritten"], "missed": stats["missed"],
            "missed_programs": [{"category": c, "settings": st, "result": r, "source": src} for c, st, r, src in missed],
            "seconds": round(elapsed, 1), "by_category": dict(stats["by_category"]),
            "wrong_programs": [{"category": c, "settings": st, "result": r, "source": src} for c, st, r, src in wrong]}
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        return
    lines = [
        "# Differential fuzzer counts (tests/fuzz/test_differential.py)", "",
        f"profile `{PROFILE}`, {N_EXAMPLES} examples requested, {elapsed:.0f} s", "",
        "| programs tried | rewritten | refused (near-miss) | untouched | wrong | wrong among rewritten | exceptions |",
        "|---|---|---|---|---|---|---|",
        f"| {stats['tried']} | {stats['rewritten']} | {stats['refused']} | {stats['untouched']} | {stats['wrong']} | "
        f"{stats['wrong_rewritten']} | {stats['errors']} |", "",
        f"Reach spellings (issue #11): {stats['reach']} programs use at least one; {stats['positives']} are plain "
        f"positives that must be rewritten, {stats['positives_rewritten']} were, {stats['missed']} missed.", "",
        "Wrong programs by category (category: wrong / tried):", "",
    ]
    for cat, (w, t) in sorted(stats["by_category"].items()):
        lines.append(f"- `{cat}`: {w} / {t}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_differential_fuzz():
    stats = collections.Counter()
    stats["by_category"] = collections.defaultdict(lambda: [0, 0])
    wrong, missed = [], []
    t0 = time.time()

    @settings(max_examples=N_EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.reuse, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(spec=specs())
    def one_program(spec):
        Prog, src = build(spec)
        out = run_and_compare(Prog, calls_for(spec), dynamic=spec.dynamic, log_eps=spec.log_eps,
                              grad_argnums=(0, 1, 2, 3) if spec.grads else ())
        stats["tried"] += 1
        stats["rewritten"] += out.rewritten > 0
        stats["refused"] += out.near_miss > 0
        stats["untouched"] += out.rewritten == 0 and out.near_miss == 0
        cat = category(spec)
        stats["by_category"][cat][1] += 1
        stats["reach"] += bool(spec.reach)
        setting = (f"dynamic={spec.dynamic}, log_eps={spec.log_eps}, lengths={spec.lengths}, B={spec.B}, "
                   f"Hkv={spec.Hkv}, G={spec.G}, D={spec.D}, Dv={spec.Dv}, grads={spec.grads}, "
                   f"padding={spec.padding} (tests/fuzz/grammar.py make_inputs)")
        if expect_rewrite(spec) or expect_segments_rewrite(spec):   # plain positives must be rewritten
            stats["positives"] += 1
            stats["positives_rewritten"] += out.rewritten > 0
            if out.rewritten == 0 and not out.wrong:
                stats["missed"] += 1
                missed.append((cat, setting, f"rewritten=0 near_miss={out.near_miss}", src))
                record_finding(f"missed:{cat}", f"## fuzzer, reach positive not rewritten, `{cat}`\n"
                                                f"settings: {setting}\n```python\n{src}```\n")
        if out.wrong:
            stats["wrong"] += 1
            stats["wrong_rewritten"] += out.rewritten > 0
            stats["errors"] += out.error is not None
            stats["by_category"][cat][0] += 1
            result = (f"rewritten={out.rewritten} near_miss={out.near_miss} "
                      f"error={out.error and out.error[:300]} mismatch={out.mismatch}")
            wrong.append((cat, setting, result, src))
            record_finding(f"fuzz:{cat}", f"## fuzzer, category `{cat}`\nsettings: {setting}\nresult: {result}\n"
                                          f"```python\n{src}```\n")

    try:
        one_program()
    finally:
        report = os.environ.get("ACP_FUZZ_REPORT")
        if report:
            _write_report(report, stats, wrong, missed, time.time() - t0)
    summary = (f"{stats['tried']} programs: {stats['rewritten']} rewritten, {stats['refused']} refused, "
               f"{stats['wrong']} wrong; reach: {stats['reach']} programs, {stats['positives']} plain positives, "
               f"{stats['missed']} missed")
    print(summary)
    assert not wrong, summary + "\n" + "\n\n".join(f"[{c}] {st}\n{r}\n{src}" for c, st, r, src in wrong[:5])
    assert not missed, summary + "\n" + "\n\n".join(f"[{c}] {st}\n{r}\n{src}" for c, st, r, src in missed[:5])
