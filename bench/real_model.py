"""The real-model table: the chain's own records for one model at every precision, as Markdown.

Run the chain on the real profile first (every precision is a candidate of one run), then read
what it recorded:

    mlflow run . --env-manager local -P params_file=params/smollm2.yaml
    python -m bench.real_model [--model builtin:smollm2-135m-instruct] [--out real-model.json]

Each candidate's row comes from the newest FINISHED main run of that model that evaluated it
(accuracy with its 95 % interval, the paired difference to the reference with its interval and
McNemar p-value, accuracy per category, agreement with the reference, the fidelity figures, time per
question and tokens/s); each logged model's size is the sum of its artifact files, and its peak RSS
is VmHWM of a fresh process that loads it and answers one question. The evaluate run's verdict is
printed below the table. Nothing is re-evaluated here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.figures import _RSS

QUESTION = "What is the capital of France?"


def _size_mb(artifact_uri: str) -> float:
    import mlflow

    total = 0
    for item in mlflow.artifacts.list_artifacts(artifact_uri=artifact_uri):
        name = item.path.rsplit("/", 1)[-1]
        total += _size_mb(f"{artifact_uri.rstrip('/')}/{name}") * 1e6 if item.is_dir else (item.file_size or 0)
    return total / 1e6


def _model_root(uri: str) -> str:
    import mlflow

    return mlflow.get_logged_model(uri.split("/")[1]).artifact_location


def _peak_rss_mb(uri: str, request: dict) -> float:
    proc = subprocess.run([sys.executable, "-c", _RSS, uri, json.dumps(request)], capture_output=True, text=True,
                          check=True, env=dict(os.environ))  # fmt: skip
    return int(proc.stdout.strip().splitlines()[-1]) / 1024


def collect(model: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"params.`effective.model` = '{model}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    rows: dict[str, dict] = {}
    verdict = ""
    for run in runs:
        ev = client.get_run(run.data.tags["child.evaluate.run_id"])
        summary = mlflow.artifacts.load_dict(f"{ev.info.artifact_uri}/summary.json")
        verdict = verdict or ev.data.tags.get("mlflow.note.content", "")
        for c in summary.get("candidates", []):  # older runs logged another format
            if c["key"] in rows:
                continue
            rows[c["key"]] = {
                "accuracy_low": c.get("accuracy_low"),
                "accuracy_high": c.get("accuracy_high"),
                "vs_reference": c.get("vs_reference"),
                "fidelity": c.get("fidelity") or {},
                "ms_per_question": c.get("ms_per_question"),
                "run_id": run.info.run_id,
                "model_uri": c["model_uri"],
                "accuracy": c["accuracy"],
                "categories": {cat: a[c["key"]] for cat, a in summary["categories"].items()},
                "agreement": 1.0 if c["agreement"] is None else c["agreement"],
                "accuracy_delta": c["accuracy_delta"] or 0.0,
                "tokens_per_s": c["tokens_per_s"],
                "meets_goals": c["meets_goals"],
                "evaluated": ev.info.start_time,
            }
    if "chat" not in rows:
        raise SystemExit(f"error: no FINISHED main run of {model}: run the chain on its profile first")
    table = {"transformers (reference)": rows["chat"],
             **{f"ONNX {p}": rows[f"onnx_{p}"] for p in ("fp32", "int8", "int4") if f"onnx_{p}" in rows}}  # fmt: skip
    if "champion" in rows:
        table["champion"] = rows["champion"]
    for name, row in table.items():
        request = (
            {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32}
            if name.startswith("transformers")
            else {"prompt": QUESTION}
        )
        row["size_mb"] = _size_mb(_model_root(row["model_uri"]))
        row["peak_rss_mb"] = _peak_rss_mb(row["model_uri"], request)
    return {"table": table, "verdict": verdict}


def _ci(low, high) -> str:
    return "" if low is None else f"{low:.3f}–{high:.3f}"


def markdown(table: dict) -> str:
    cats = sorted(next(iter(table.values()))["categories"])
    head = ["model", "accuracy (95 % CI)", "Δ vs reference (95 % CI), McNemar p", *cats, "agreement", "KLD mean",
            "KLD p99", "top-1", "ppl ratio", "ms/question", "tokens/s", "size MB", "peak RSS MB",
            "meets goals"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in table.items():
        vs, fid = r.get("vs_reference"), r.get("fidelity") or {}
        delta = f"{vs['delta']:+.3f} ({vs['low']:+.3f}…{vs['high']:+.3f}), p={vs['p_value']:.2g}" if vs else "—"
        cells = [name, f"{r['accuracy']:.3f} ({_ci(r.get('accuracy_low'), r.get('accuracy_high'))})", delta,
                 *(f"{r['categories'][c]:.2f}" for c in cats), f"{r['agreement']:.3f}",
                 # evaluate logs fidelity rounded to 6 decimals: fp32's ~1e-11 reads 0.
                 *((f"{fid[k]:.2g}" if fid[k] else "< 5e-7") if k in fid else "—" for k in ("kld_mean", "kld_p99")),
                 f"{100 * fid['top1_agreement']:.1f} %" if "top1_agreement" in fid else "—",
                 f"{fid['ppl_ratio']:.3f}" if "ppl_ratio" in fid else "—",
                 f"{r['ms_per_question']:.0f}" if r.get("ms_per_question") is not None else "—",
                 f"{r['tokens_per_s']:.0f}", f"{r['size_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                 "yes" if r["meets_goals"] else "no"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.real_model", description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    found = collect(args.model)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(found, f, indent=2)
    print(markdown(found["table"]))
    print(f"\nevaluate: {found['verdict']}")


if __name__ == "__main__":
    main()
