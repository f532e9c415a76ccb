"""The benchmark in its tiny mode, so it cannot rot: it runs end to end and reports every figure,
each computed from the pairs it measured."""

import json
import os
import re
import statistics
import subprocess
import sys

import pytest

from bench.__main__ import REAL_REPORTED, REAL_TARGETS, REPORTED, TARGETS
from tests.support import ROOT

pytestmark = pytest.mark.slow

# Quick mode: one pair per figure (--pairs 1), except serve_vs_inprocess, which takes at least 5; the
# real-model figures (--model smollm2) run on the tiny model.
PAIRS = {name: 1 for name in (*TARGETS, *REPORTED, *REAL_TARGETS, *REAL_REPORTED)} | {"serve_vs_inprocess": 5}
# Figures whose per-pair ratio is A's seconds over B's: with one pair, the figure is a_median_s / b_median_s.
# (int4_vs_chat_speedup is a tokens-per-second ratio, serve_vs_inprocess has five pairs.)
TIME_RATIOS = ("onnx_overhead_fp32", "onnx_overhead_int4", "noise_floor_int4", "chat_overhead", "cache_rerun_ratio",
               "cache_rerun_floor", "tracing_cost", "real_onnx_overhead_int4", "real_noise_floor_int4",
               "evidence_cost")  # fmt: skip


def test_quick_benchmark_reports_every_figure(tmp_path, model_cache):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(report["figures"]) == set(PAIRS)
    for name, pairs in PAIRS.items():
        fig = report["figures"][name]
        ratios = fig["ratios"]
        # Each figure is what its own pairs measured: the configured number of them, all positive, and
        # the reported median, min and max are theirs.
        assert len(ratios) == pairs and all(isinstance(r, float) and r > 0 for r in ratios), (name, ratios)
        assert report[name] == fig["median"] == statistics.median(ratios), name
        assert (fig["min"], fig["max"]) == (min(ratios), max(ratios)), name
        assert fig["a_median_s"] > 0 and fig["b_median_s"] > 0, name
        if name in TIME_RATIOS:
            assert fig["median"] == pytest.approx(fig["a_median_s"] / fig["b_median_s"], rel=1e-9), name
        # The table prints the same numbers, and a target is met exactly when the median meets it.
        row = re.search(rf"^\| {name} \| (.*)$", proc.stdout, re.M)
        assert row, (name, proc.stdout)
        cells = [c.strip() for c in row.group(1).split("|")]
        assert cells[:3] == [f"{fig['median']:.3f}", f"{fig['min']:.3f}", f"{fig['max']:.3f}"], (name, cells)
        if name in TARGETS or name in REAL_TARGETS:
            op, target = {**TARGETS, **REAL_TARGETS}[name]
            met = fig["median"] <= target if op == "<=" else fig["median"] >= target
            assert cells[3:5] == [f"{op} {target}", "yes" if met else "no"], (name, cells)
        else:
            assert cells[3] == "(reported)", (name, cells)
    assert report["figures"]["serve_vs_inprocess"]["wrapper"] == "onnx"
    assert report["figures"]["onnx_overhead_fp32"]["same_output"] is True
    assert report["figures"]["onnx_overhead_int4"]["same_output"] is True
    assert report["figures"]["real_onnx_overhead_int4"]["same_output"] is True
    # evaluate's batches (8 questions, then 1) give the answers of one question per request.
    batch = report["figures"]["eval_batch_speedup"]
    assert batch["same_answers"] is True
    assert (batch["questions"], batch["questions_per_request"], batch["max_new_tokens"]) == (9, 8, 16)
    # evidence_cost: the champion asked as a candidate of its own, and fidelity measured, on one side only.
    evidence = report["figures"]["evidence_cost"]
    assert evidence["candidates"] == ["champion", "chat", "onnx_fp32", "onnx_int4"]
    assert evidence["candidates_without"] == ["chat", "onnx_fp32", "onnx_int4"]
    assert evidence["fidelity_measured"] == ["champion", "onnx_fp32", "onnx_int4"] and evidence["questions"] == 5
    assert (report["mode"], report["pairs"], report["overhead_pairs"], report["calls_per_side"]) == ("quick", 1, 1, 1)
    assert report["new_tokens"] == 16 and report["prompt_tokens"] > 0
    assert report["versions"]["onnxruntime-genai"] == "0.18.0"
    assert report["threads"]["onnxruntime_genai"] >= 1 and report["cpu"]
    assert set(report["ttft_s"]) == {"chat", "onnx_int4"} and all(v > 0 for v in report["ttft_s"].values())
    assert set(report["peak_rss_mb"]) == {"chat", "onnx_fp32", "onnx_int4"}
    assert all(v > 0 for v in report["peak_rss_mb"].values())


def test_the_gil_probe_measures_both_calls_beside_a_counting_thread(model_cache):
    # bench.gil_probe (bench/README.md, "The GIL and the server") runs end to end: both og calls made
    # and the counter's rate beside each reported as a share of its rate alone.
    code = (
        "import json; from bench import gil_probe; print(json.dumps(gil_probe.main(['--model', 'builtin:tiny-phi3'])))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PHI3MLFLOW_CACHE": str(model_cache)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"prefill of 8 rows (append_tokens)", "decode step (generate_next_token)"}
    for figures in out.values():
        assert (
            figures["calls_per_s_alone"] > 0
            and figures["calls_per_s_beside"] > 0
            and 0 <= figures["counter_rate_beside_over_alone"] <= 1.5
        ), out
