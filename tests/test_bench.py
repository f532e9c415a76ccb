"""The benchmark in its tiny mode, so it cannot rot: it runs end to end and reports every figure."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

FIGURES = ("onnx_overhead_fp32", "onnx_overhead_int4", "chat_overhead", "int4_vs_chat_speedup",
           "cache_rerun_ratio", "serve_vs_inprocess", "noise_floor_int4", "cache_rerun_floor")  # fmt: skip


def test_quick_benchmark_reports_every_figure(tmp_path, model_cache):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for name in FIGURES:
        assert isinstance(report[name], float) and report[name] > 0, name
        fig = report["figures"][name]
        assert fig["min"] <= report[name] <= fig["max"]
        assert f"| {name} |" in proc.stdout
    assert report["mode"] == "quick" and report["versions"]["onnxruntime-genai"] == "0.18.0"
    assert report["threads"]["onnxruntime_genai"] >= 1 and report["cpu"]
    assert report["figures"]["onnx_overhead_fp32"]["same_output"] is True
    assert set(report["ttft_s"]) == {"chat", "onnx_int4"} and set(report["peak_rss_mb"]) == {
        "chat",
        "onnx_fp32",
        "onnx_int4",
    }
