"""evaluate: both wrappers on one question set - accuracy, latency, agreement, tables and plots.

Inputs (flags, spelled like the MLproject parameters):
  --chat_model_uri / --onnx_model_uri  the logged models (models:/..., runs:/...); either may be
                                       empty to evaluate one model, not both
  --dataset           JSONL or CSV of questions and expected answers (default: the bundled set)
  --question_column / --answer_column  the column names in it
  --max_new_tokens, --temperature      generation settings sent with every request
  --select_metric     the metric that picks the winner (accuracy by default)
  --engine            local (default): answer in this process; spark: score with Spark (the active
                      session, or a local one), the ONNX model through mlflow.pyfunc.spark_udf;
                      latency is then the job's wall time per row (see phi3mlflow.spark_scoring)
Outputs (on the run):
  metrics ``<key>_<metric>`` for key chat/onnx (accuracy, exact_match, f1, latency_p50_ms,
  latency_p95_ms, tokens_per_s), ``agreement`` and ``onnx_accuracy_delta`` (ONNX accuracy minus
  the reference's, the transformers pipeline); tag ``best``; the dataset as an input; artifacts
  ``summary.json`` (per model, and per category when the dataset has a ``category`` column),
  ``comparison.png`` and the side-by-side table ``eval_table.json``. Each model's metrics are also
  logged on its LoggedModel (``model_id``), linked to the dataset.
Checked before any question is asked: every row (non-empty text question, an answer) and that each
question fits the context of every model evaluated. Answers may list aliases: "8 | eight".
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict
from pathlib import Path

from phi3mlflow.cli import StepParser, non_negative_float, positive_int, run_main
from phi3mlflow.evaluation import DEFAULT_DATASET
from phi3mlflow.metrics import METRICS
from phi3mlflow.summary import Scores, Summary


def parse_args(argv=None):
    p = StepParser(prog="evaluate", description=__doc__.split("\n", 1)[0])
    p.add_argument("--chat_model_uri", default="")
    p.add_argument("--onnx_model_uri", default="")
    p.add_argument("--dataset", default=DEFAULT_DATASET)
    p.add_argument("--question_column", default="question")
    p.add_argument("--answer_column", default="answer")
    p.add_argument("--max_new_tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0)
    p.add_argument("--select_metric", choices=list(METRICS), default="accuracy")
    p.add_argument("--engine", choices=("local", "spark"), default="local")
    return p.parse_args(argv)


def main(args) -> Summary:
    with contextlib.ExitStack() as stack:
        return _main(args, stack)


def _main(args, stack: contextlib.ExitStack) -> Summary:
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    from phi3mlflow import evaluation as ev
    from phi3mlflow import report, tags
    from phi3mlflow.errors import InputError
    from phi3mlflow.metrics import aggregate, agreement, score_rows
    from phi3mlflow.tracking import log_params_once

    uris = {k: u.strip() for k, u in (("chat", args.chat_model_uri), ("onnx", args.onnx_model_uri)) if u.strip()}
    if not uris:
        raise InputError("chat_model_uri", "give chat_model_uri, onnx_model_uri or both")
    data = ev.load_dataset(args.dataset, args.question_column, args.answer_column)
    for key, uri in uris.items():
        ev.check_model_uri(key, uri)
    questions = data["question"].tolist()
    # MLflow downloads a model from the tracking server into a temporary folder it never removes.
    downloads = stack.enter_context(tempfile.TemporaryDirectory(prefix="phi3-evaluate-"))
    if args.engine == "spark":
        from phi3mlflow import spark_scoring

        spark_scoring.check_available()
        callers = {}
    else:
        # Load both models and check every question against both contexts before answering any.
        callers = {
            key: {"chat": ev.ChatCaller, "onnx": ev.OnnxCaller}[key](uri, f"{downloads}/{key}")
            for key, uri in uris.items()
        }
        ev.check_fits(list(callers.values()), questions, args.dataset, args.max_new_tokens)

    table = data.copy()
    models = {}
    with mlflow.start_run():
        log_params_once(vars(args))
        dataset = from_pandas(data, source=str(Path(args.dataset).resolve()), name=Path(args.dataset).stem)
        mlflow.log_input(dataset, context="evaluation")
        for key, uri in uris.items():
            print(f"evaluate: {key} model {uri} on {len(questions)} questions", flush=True)
            if args.engine == "spark":
                spark = spark_scoring.session()
                answers = spark_scoring.score(spark, key, uri, questions, args.max_new_tokens, args.temperature)
            else:
                answers = ev.answer_all(callers[key], questions, args.max_new_tokens, args.temperature)
            predictions = [a.text for a in answers]
            rows = score_rows(predictions, data["expected"].tolist())
            scores = aggregate(rows, [a.latency_ms for a in answers], [a.completion_tokens for a in answers])
            models[key] = Scores(model_uri=uri, **scores)
            mlflow.log_metrics({f"{key}_{m}": v for m, v in scores.items()})
            if uri.startswith("models:/m-"):
                # On the logged model too, linked to the dataset: the model page shows them and
                # mlflow.search_logged_models ranks by them.
                mlflow.log_metrics(scores, model_id=uri.split("/")[1], dataset=dataset)
            table[f"{key}_answer"] = predictions
            table[f"{key}_correct"] = [s == 1.0 for s in rows["accuracy"]]
            table[f"{key}_f1"] = [round(s, 4) for s in rows["f1"]]
            table[f"{key}_latency_ms"] = [round(a.latency_ms, 2) for a in answers]
            table[f"{key}_completion_tokens"] = [a.completion_tokens for a in answers]
        agree = agreement(table["chat_answer"].tolist(), table["onnx_answer"].tolist()) if len(models) == 2 else None
        if agree is not None:
            mlflow.log_metric("agreement", agree)
            table["agree"] = [a == b for a, b in zip(table["chat_answer"], table["onnx_answer"], strict=True)]
        categories = {}
        if "category" in table.columns:
            for cat, rows in table.groupby("category", sort=True):
                categories[str(cat)] = {key: float(rows[f"{key}_correct"].mean()) for key in models}
        result = ev.summary(models, args.select_metric, agree, categories)
        if "onnx" in models and models["onnx"].accuracy_delta is not None:
            mlflow.log_metric("onnx_accuracy_delta", models["onnx"].accuracy_delta)
        mlflow.log_table(table, artifact_file="eval_table.json")
        mlflow.log_dict(result.to_dict(), "summary.json")
        mlflow.log_figure(ev.plot(models), "comparison.png")
        mlflow.set_tag(tags.BEST, result.best)
        report.name_and_note("evaluate", f"{report.verdict(result)}.")
    for key, m in models.items():
        shown = {k: v for k, v in asdict(m).items() if k != "model_uri" and v is not None}
        print(f"evaluate: {key}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    for cat, accs in categories.items():
        print(f"evaluate: {cat}: " + ", ".join(f"{k} accuracy={v:.3g}" for k, v in accs.items()))
    print(f"evaluate: best by {args.select_metric}: {result.best}", flush=True)
    return result


if __name__ == "__main__":
    run_main(main, parse_args)
