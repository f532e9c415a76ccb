"""python -m bench: what the wrappers and the chain cost, as ratios measured side by side.

Every figure is the median of per-pair ratios A/B, with A and B measured interleaved in one process
(A B, B A, ...), so machine noise hits both sides alike. Greedy decoding, the same prompt and the
same number of new tokens and threads on both sides. Prints a markdown table and writes JSON.

  python -m bench [--out bench.json] [--quick] [--pairs N]
  python -m bench --model smollm2 [--out bench-real.json] [--pairs N]
  python -m bench --peer llamacpp [--out bench-peer.json] [--pairs N]
  python -m bench --model smollm2 --only eval_batch_speedup   # one figure (or several, comma-separated)

--quick runs the tiny mode (the built-in model, few tokens, one pair) that the test suite uses so
the benchmark cannot rot, every figure including the real-model ones; the full mode uses a ~42 M-
parameter random-weight Phi-3; --model smollm2 measures the real-model figures on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import figures as fig
from bench import generation, hostile, operations

TARGETS = {
    "onnx_overhead_fp32": ("<=", 1.05),
    "onnx_overhead_int4": ("<=", 1.05),
    "chat_overhead": ("<=", 1.15),
    "int4_vs_chat_speedup": (">=", 7.0),
    "cache_rerun_ratio": ("<=", 0.10),
    "serve_vs_inprocess": ("<=", 1.2),
    "serve_concurrency_throughput": (">=", 2.0),
    # tokens/s with /metrics / without (bench/operations.py).
    "metrics_cost": (">=", 0.98),
    # p95 latency in a window where @champion moves and the server swaps / in a window without.
    "alias_swap_cost": ("<=", 2.0),
}
# On the real model (--model smollm2); the quick mode runs them on the tiny model so they cannot rot.
REAL_TARGETS = {
    "real_int4_vs_chat_speedup": (">=", 7.0),
    "real_onnx_overhead_int4": ("<=", 1.05),
    "eval_batch_speedup": (">=", 2.0),
    "real_serve_concurrency_throughput": (">=", 2.0),
    # evaluate with the champion asked and the fidelity pass / the same evaluation without them.
    "evidence_cost": ("<=", 1.5),
    # a normal request's latency with a hostile client at work / alone (bench/hostile.py).
    "hostile_request_slowdown": ("<=", 2.0),
    # time to first token behind a long streaming answer / alone (bench/generation.py).
    "serve_late_arrival_ttft": ("<=", 3.0),
}
# structured_output_cost: tokens/s of a JSON-schema-constrained answer / unconstrained.
# hostile_uncached_slowdown, hostile_junk_slowdown, competing_client_slowdown: probes of
# hostile_request_slowdown (bench/hostile.py).
REAL_REPORTED = (
    "real_noise_floor_int4",
    "structured_output_cost",
    "hostile_uncached_slowdown",
    "hostile_junk_slowdown",
    "competing_client_slowdown",
)
# Figures with no target: the A/A control that says how much of a ratio is the machine's noise, and
# the least a re-run under `mlflow run` can cost whatever a project does.
# tracing_cost: an evaluation request with its trace over the same request untraced.
REPORTED = ("noise_floor_int4", "cache_rerun_floor", "tracing_cost")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", default="bench-results.json", help="where the JSON results go")
    p.add_argument("--quick", action="store_true", help="tiny mode: built-in model, few tokens, one pair")
    p.add_argument("--pairs", type=int, default=0, help="interleaved pairs per figure (default 7, quick 1)")
    p.add_argument("--model", choices=("bench", "smollm2"), default="bench",
                   help="bench: the random-weight bench model (the main figures); smollm2: the real-model "
                   "figures on SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct)")  # fmt: skip
    p.add_argument(
        "--peer", choices=("llamacpp",), help="instead: the ONNX wrapper against a peer runtime (bench/peer.py)"
    )
    p.add_argument("--only", default="", help="comma-separated figure names (with --peer: sections, in_process "
                   "and serving): measure only these")  # fmt: skip
    args = p.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.peer:
        from bench.peer import SECTIONS

        unknown = sorted(set(args.only) - set(SECTIONS))
        if unknown:
            p.error(f"--only: {', '.join(unknown)} is not a section of --peer; it has: {', '.join(SECTIONS)}")
    if args.peer and args.quick:
        p.error("--peer runs the full-size model only")
    if args.quick and args.model != "bench":
        p.error("--quick runs the tiny model only (and covers the real-model figures on it)")
    args.pairs = args.pairs or (1 if args.quick else 7)
    if args.pairs < 1:
        p.error("--pairs must be >= 1")
    return args


def environment() -> dict:
    import mlflow
    import onnxruntime_genai
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    from phi3mlflow.genai import default_threads

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu or platform.processor(),
        "cores": default_threads(),
        "threads": {"onnxruntime_genai": default_threads(), "torch": torch.get_num_threads()},
        "versions": {
            "python": platform.python_version(),
            "mlflow": mlflow.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime-genai": onnxruntime_genai.__version__,
        },  # fmt: skip
    }


def main(args) -> dict:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    with tempfile.TemporaryDirectory(prefix="phi3-bench-") as tmp, contextlib.chdir(tmp):
        # In the temporary folder: a SQLite store puts artifacts in ./mlruns of the working
        # directory, and so does every `mlflow run` the figures start; nothing lands in the checkout.
        uri = f"sqlite:///{tmp}/bench.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("bench")
        real = args.model == "smollm2"
        setup = fig.Setup.create(quick=args.quick, tmp=Path(tmp), real=real)
        if args.peer:
            return peer_main(args, setup, Path(tmp))
        results = {}
        # A wrapper's cost is far below what a shared machine's noise does to a 7-pair median
        # (bench/README.md): the overhead figures take 3x the pairs and come with an A/A noise floor.
        overhead_pairs = args.pairs if args.quick else args.pairs * 3
        real_figures = (
            ("real_int4_vs_chat_speedup", lambda: fig.speedup(setup, args.pairs)),
            ("real_onnx_overhead_int4", lambda: fig.onnx_overhead(setup, "int4", overhead_pairs)),
            ("real_noise_floor_int4", lambda: fig.noise_floor(setup, "int4", overhead_pairs)),
            # Each side asks 32 questions for seconds: fewer pairs say as much.
            ("eval_batch_speedup", lambda: fig.eval_batch_speedup(setup, args.pairs if args.quick else 3)),
            ("real_serve_concurrency_throughput", lambda: fig.serve_concurrency_throughput(setup, args.pairs)),
            # Each side is a whole evaluation (minutes on the real model): 3 pairs at most.
            ("evidence_cost", lambda: fig.evidence_cost(setup, min(args.pairs, 3))),
            ("hostile_request_slowdown", lambda: hostile.hostile_request_slowdown(setup, args.pairs)),
            ("hostile_uncached_slowdown", lambda: hostile.hostile_uncached_slowdown(setup, args.pairs)),
            ("hostile_junk_slowdown", lambda: hostile.hostile_junk_slowdown(setup, args.pairs)),
            ("competing_client_slowdown", lambda: hostile.competing_client_slowdown(setup, args.pairs)),
            ("serve_late_arrival_ttft", lambda: generation.serve_late_arrival_ttft(setup, args.pairs)),
            ("structured_output_cost", lambda: generation.structured_output_cost(setup, args.pairs)),
        )
        main_figures = (
            ("onnx_overhead_fp32", lambda: fig.onnx_overhead(setup, "fp32", overhead_pairs)),
            ("onnx_overhead_int4", lambda: fig.onnx_overhead(setup, "int4", overhead_pairs)),
            ("noise_floor_int4", lambda: fig.noise_floor(setup, "int4", overhead_pairs)),
            ("tracing_cost", lambda: fig.tracing_cost(setup, overhead_pairs)),
            ("chat_overhead", lambda: fig.chat_overhead(setup, args.pairs)),
            ("int4_vs_chat_speedup", lambda: fig.speedup(setup, args.pairs)),
            ("cache_rerun_ratio", lambda: fig.cache_rerun(setup, max(1, min(args.pairs, 5)))),
            ("serve_vs_inprocess", lambda: fig.serve_vs_inprocess(setup, max(5, args.pairs * 3))),
            ("serve_concurrency_throughput", lambda: fig.serve_concurrency_throughput(setup, args.pairs)),
            ("metrics_cost", lambda: operations.metrics_cost(setup, args.pairs)),
            ("alias_swap_cost", lambda: operations.alias_swap_cost(setup, args.pairs)),
        )
        chosen = real_figures if real else main_figures + real_figures if args.quick else main_figures
        if args.only:
            unknown = sorted(set(args.only) - {name for name, _ in chosen})
            if unknown:
                raise SystemExit(f"--only: {', '.join(unknown)} is not a figure of this run; it has: "
                                 f"{', '.join(name for name, _ in chosen)}")  # fmt: skip
            chosen = tuple((name, run) for name, run in chosen if name in args.only)
        for name, run in chosen:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            results[name] = run()
            results[name]["seconds"] = round(time.perf_counter() - start, 1)
        if "cache_rerun_ratio" in results:
            # Measured inside the cache figure's pairs: a no-op entry point under `mlflow run` / the cold run.
            results["cache_rerun_floor"] = results["cache_rerun_ratio"].pop("floor")
        extra = {} if args.only else {"ttft_s": fig.time_to_first_token(setup, args.pairs),
                                      "peak_rss_mb": fig.peak_rss(setup)}  # fmt: skip
        # Traces are exported on MLflow's background thread: finish before the store is deleted.
        mlflow.flush_trace_async_logging()
    report = {
        **{name: r["median"] for name, r in results.items()},
        "mode": "quick" if args.quick else "real" if real else "full",
        "model": setup.describe(),
        "new_tokens": setup.new_tokens,
        "prompt_tokens": setup.prompt_tokens,
        "pairs": args.pairs,
        "overhead_pairs": overhead_pairs,
        "calls_per_side": setup.reps,
        **environment(),
        "figures": results,
        **extra,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwrote {args.out}")
    return report


def peer_main(args, setup, tmp: Path) -> dict:
    from bench import peer

    section = peer.run(setup, args.pairs, tmp, args.only)
    report = {**section, "mode": "peer-llamacpp", "model": setup.describe(), "new_tokens": setup.new_tokens,
              "prompt_tokens": setup.prompt_tokens, "pairs": args.pairs, "calls_per_side": setup.reps,
              **environment()}  # fmt: skip
    out = Path(args.out if args.out != "bench-results.json" else "bench-peer.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['model']}, {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, "
          f"{report['pairs']} pairs, {report['cores']} threads, {report['cpu']}, {report['date']}")  # fmt: skip
    print(peer.markdown(report))
    print(f"\nwrote {out}")
    return report


def markdown(report: dict) -> str:
    rows = [
        "| figure | median | min | max | target | met | A median (s) | B median (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (op, target) in {**TARGETS, **REAL_TARGETS}.items():
        if name not in report["figures"]:
            continue
        r = report["figures"][name]
        met = r["median"] <= target if op == "<=" else r["median"] >= target
        rows.append(f"| {name} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | {op} {target} | "
                    f"{'yes' if met else 'no'} | {r['a_median_s']:.4f} | {r['b_median_s']:.4f} |")  # fmt: skip
    for name in (*REPORTED, *REAL_REPORTED):
        if name not in report["figures"]:
            continue
        r = report["figures"][name]
        rows.append(f"| {name} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | (reported) | | "
                    f"{r['a_median_s']:.4f} | {r['b_median_s']:.4f} |")  # fmt: skip
    ttft = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in report.get("ttft_s", {}).items()) or "not measured"
    rss = ", ".join(f"{k} {v:.0f} MB" for k, v in report.get("peak_rss_mb", {}).items()) or "not measured"
    head = (f"{report['mode']} mode, {report['model']}, {report['prompt_tokens']}-token prompt, "
            f"{report['new_tokens']} new tokens, {report['pairs']} pairs ({report['overhead_pairs']} for overheads), "
            f"{report['cores']} threads, "
            f"{report['cpu']}, {report['date']}")  # fmt: skip
    return "\n".join([head, "", *rows, "", f"time to first token: {ttft}", f"peak RSS: {rss}"])


if __name__ == "__main__":
    main(parse_args())
