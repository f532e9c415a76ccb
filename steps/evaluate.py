"""evaluate: every candidate on one question set, ranked - accuracy, latency, agreement, goals.

Inputs (flags, spelled like the MLproject parameters):
  --chat_model_uri    the transformers pipeline (the reference others are compared with); may be
                      empty to evaluate ONNX models alone
  --onnx_model_uris   comma-separated ONNX models (models:/..., runs:/...); each is named
                      onnx_<precision> after the precision its run tagged
  --dataset           JSONL or CSV of questions and expected answers (default: the bundled set)
  --question_column / --answer_column  the column names in it
  --max_new_tokens, --temperature      generation settings sent with every request
  --select_metric     the metric that ranks the candidates (accuracy by default)
  --min_accuracy      goal: a candidate's accuracy must reach it
  --max_accuracy_drop goal: a candidate may lose at most this much accuracy against the reference
  --engine            local (default): answer in this process; spark: score with Spark (the active
                      session, or a local one), the ONNX models through mlflow.pyfunc.spark_udf;
                      latency is then the job's wall time per row (see phi3mlflow.spark_scoring)
Outputs (on the run):
  metrics ``<key>_<metric>`` for every candidate (accuracy, exact_match, f1, latency_p50_ms,
  latency_p95_ms, tokens_per_s, and against the reference accuracy_delta and agreement); tags
  ``best`` (by the metric) and ``winner`` (the best that meets the goals); the dataset as an input;
  artifacts ``summary.json`` (the ranked candidates, each with its scores, difference to the
  reference and goals met; per category when the dataset has a ``category`` column),
  ``comparison.png`` and the side-by-side table ``eval_table.json``. Each candidate's metrics are
  also logged on its LoggedModel (``model_id``), linked to the dataset, and every request leaves
  a trace linked to that model (local engine).
Batches (local engine): an ONNX model gets its questions as requests of several prompts (as many as
one request may hold: its max_prompts_per_request, and max_total_new_tokens / max_new_tokens),
shortest prompt first, which it decodes as batches; greedy answers equal one-at-a-time ones. A question's latency is
then its batch's wall time (said so in summary.json, with questions_per_request), and tokens_per_s
is generated tokens over the requests' wall time, the real throughput. Each request (a batch)
leaves one trace; the transformers reference is asked one question per request.
Checked before any question is asked: every row (non-empty text question, an answer), every URI,
and that each question fits the context of every model evaluated. Answers may list aliases: "8 | eight".
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from phi3mlflow.cli import StepParser, non_negative_float, positive_int, run_main, unit_interval
from phi3mlflow.evaluation import DEFAULT_DATASET
from phi3mlflow.metrics import METRICS
from phi3mlflow.summary import Summary

LATENCY_NOTE = (
    "latency_p50_ms and latency_p95_ms are per question; questions asked in one request (an ONNX "
    "model's batch, questions_per_request) each count the whole request's wall time. tokens_per_s is "
    "generated tokens over the wall time of all requests, the real throughput."
)


def parse_args(argv=None):
    p = StepParser(prog="evaluate", description=__doc__.split("\n", 1)[0])
    p.add_argument("--chat_model_uri", default="")
    p.add_argument("--onnx_model_uris", default="")
    p.add_argument("--dataset", default=DEFAULT_DATASET)
    p.add_argument("--question_column", default="question")
    p.add_argument("--answer_column", default="answer")
    p.add_argument("--max_new_tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0)
    p.add_argument("--select_metric", choices=list(METRICS), default="accuracy")
    p.add_argument("--min_accuracy", type=unit_interval, default=0.9)
    p.add_argument("--max_accuracy_drop", type=unit_interval, default=1.0)
    p.add_argument("--engine", choices=("local", "spark"), default="local")
    return p.parse_args(argv)


@contextlib.contextmanager
def traces_linked_to(model_id: str | None):
    """Traces started inside are linked to the logged model ``model_id`` (to none when None)."""
    import mlflow

    # MLflow logs "Active model is set/cleared" at INFO twice per candidate; the step's own lines say more.
    logger = logging.getLogger("mlflow.tracking.fluent")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        if model_id:
            mlflow.set_active_model(model_id=model_id)
        yield
    finally:
        mlflow.clear_active_model()
        logger.setLevel(level)


def main(args) -> Summary:
    with contextlib.ExitStack() as stack:
        return _main(args, stack)


def _main(args, stack: contextlib.ExitStack) -> Summary:
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    from phi3mlflow import evaluation as ev
    from phi3mlflow import report, tags
    from phi3mlflow.metrics import aggregate, normalize, score_rows
    from phi3mlflow.summary import Candidate, Goals, build
    from phi3mlflow.tracking import log_params_once

    data = ev.load_dataset(args.dataset, args.question_column, args.answer_column)
    refs = ev.check_candidates(args.chat_model_uri, args.onnx_model_uris)
    questions = data["question"].tolist()
    # MLflow downloads a model from the tracking server into a temporary folder it never removes.
    downloads = stack.enter_context(tempfile.TemporaryDirectory(prefix="phi3-evaluate-"))
    if args.engine == "spark":
        from phi3mlflow import spark_scoring

        spark_scoring.check_available()
        callers = {}
    else:
        # Load every model and check every question against every context before answering any.
        callers = {ref.key: ev.CALLERS[ref.wrapper](ref, f"{downloads}/{ref.key}") for ref in refs}
        ev.check_fits(list(callers.values()), questions, args.dataset, args.max_new_tokens)

    table = data.copy()
    candidates, answers = [], {}
    per_request: dict[str, int] = {}
    with mlflow.start_run():
        log_params_once(vars(args))
        dataset = from_pandas(data, source=str(Path(args.dataset).resolve()), name=Path(args.dataset).stem)
        mlflow.log_input(dataset, context="evaluation")
        for ref in refs:
            print(f"evaluate: {ref.key} {ref.uri} on {len(questions)} questions", flush=True)
            if args.engine == "spark":
                spark = spark_scoring.session()
                answered = spark_scoring.score(spark, ref, questions, args.max_new_tokens, args.temperature)
            else:
                with traces_linked_to(ref.model_id):
                    answered = ev.answer_all(callers[ref.key], questions, args.max_new_tokens, args.temperature)
            answers[ref.key] = [a.text for a in answered]
            rows = score_rows(answers[ref.key], data["expected"].tolist())
            scores = aggregate(rows, [a.latency_ms for a in answered], [a.completion_tokens for a in answered])
            # A batch's questions share its wall time as their latency: throughput is over wall time.
            scores["tokens_per_s"] = ev.tokens_per_s(answered)
            scores["ms_per_question"] = ev.wall_seconds(answered) * 1000 / len(answered)
            per_request[ref.key] = max(a.batch_size for a in answered)
            candidates.append(Candidate.scored(ref.key, ref.wrapper, ref.precision, ref.uri, scores))
            table[f"{ref.key}_answer"] = answers[ref.key]
            table[f"{ref.key}_correct"] = [s == 1.0 for s in rows["accuracy"]]
            table[f"{ref.key}_f1"] = [round(s, 4) for s in rows["f1"]]
            table[f"{ref.key}_latency_ms"] = [round(a.latency_ms, 2) for a in answered]
            table[f"{ref.key}_completion_tokens"] = [a.completion_tokens for a in answered]
        categories = {}
        if "category" in table.columns:
            for cat, rows in table.groupby("category", sort=True):
                categories[str(cat)] = {c.key: float(rows[f"{c.key}_correct"].mean()) for c in candidates}
        goals = Goals(args.min_accuracy, args.max_accuracy_drop)
        reference = ev.REFERENCE if any(r.key == ev.REFERENCE for r in refs) else None
        result = build(candidates, args.select_metric, goals, reference, answers, categories)
        for c, ref in ((result[r.key], r) for r in refs):
            metrics = {m: c[m] for m in METRICS}
            metrics.update({k: v for k, v in (("accuracy_delta", c.accuracy_delta), ("agreement", c.agreement))
                            if v is not None})  # fmt: skip
            mlflow.log_metrics({f"{c.key}_{m}": v for m, v in metrics.items()})
            if ref.model_id:
                # On the logged model too, linked to the dataset: the model page shows them and
                # mlflow.search_logged_models ranks by them.
                mlflow.log_metrics(metrics, model_id=ref.model_id, dataset=dataset)
            if reference and c.key != reference:
                pairs = zip(answers[c.key], answers[reference], strict=True)
                table[f"{c.key}_agrees"] = [normalize(a) == normalize(b) for a, b in pairs]
        mlflow.log_table(table, artifact_file="eval_table.json")
        mlflow.log_dict({**result.to_dict(), "questions_per_request": per_request, "latency": LATENCY_NOTE},
                        "summary.json")  # fmt: skip
        mlflow.log_figure(ev.plot(result.candidates), "comparison.png")
        mlflow.set_tags({tags.BEST: result.best, tags.WINNER: result.winner})
        report.name_and_note("evaluate", f"{report.verdict(result)}.")
    for c in result.candidates:
        shown = {m: c[m] for m in METRICS} | {"accuracy_delta": c.accuracy_delta, "agreement": c.agreement}
        goals_text = "meets the goals" if c.meets_goals else f"misses the goals: {c.missed}"
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if v is not None)
        print(f"evaluate: #{c.rank} {c.key}: {numbers}; {goals_text}")
    for cat, accs in categories.items():
        print(f"evaluate: {cat}: " + ", ".join(f"{k} accuracy={v:.3g}" for k, v in accs.items()))
    print(f"evaluate: {report.verdict(result)}", flush=True)
    return result


if __name__ == "__main__":
    run_main(main, parse_args)
