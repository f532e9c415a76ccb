"""evaluate: every candidate, and the current champion, on one question set in one run - ranked with intervals.

Inputs (flags, spelled like the MLproject parameters):
  --chat_model_uri    the transformers pipeline (the reference others are compared with); may be
                      empty to evaluate ONNX models alone
  --onnx_model_uris   comma-separated ONNX models (models:/..., runs:/...); each is named
                      onnx_<precision> after the precision its run tagged
  --registered_model_name, --alias
                      when the registered model has the alias, the version it points to is asked
                      the same questions as a candidate of its own (``champion``), so that
                      register decides from this run alone; empty (the default): no champion
  --dataset           JSONL or CSV of questions and expected answers (default: the bundled set)
  --question_column / --answer_column  the column names in it
  --max_new_tokens, --temperature      generation settings sent with every request
  --select_metric     the metric that ranks the candidates (accuracy by default)
  --min_accuracy      goal: a candidate's accuracy must reach it
  --max_accuracy_drop goal, a non-inferiority margin: the lower end of the 95 % interval of a
                      candidate's accuracy difference to the reference must be above -max_accuracy_drop
  --max_kld           goal: the most mean KL divergence from the reference an ONNX candidate may
                      have (empty: none)
  --fidelity          true/false (default true): measure every ONNX candidate's distribution
                      fidelity against the reference, teacher-forced on the reference's answers
  --engine            local (default): answer in this process; spark: score with Spark (the active
                      session, or a local one), the ONNX models through mlflow.pyfunc.spark_udf;
                      latency is then the job's wall time per row (see phi3mlflow.spark_scoring)
Outputs (on the run):
  metrics ``<key>_<metric>`` for every candidate (accuracy with accuracy_ci_low/high, exact_match,
  f1, latency_p50_ms, latency_p95_ms, ms_per_question, tokens_per_s; against the reference
  agreement and vs_reference_delta/_ci_low/_ci_high/_p_value; fidelity kld_mean, kld_p99, kld_max,
  top1_agreement, ppl_ratio), winner_vs_champion_* when a champion was asked; tags ``best``,
  ``winner`` and ``champion_version``; the dataset as an input; artifacts ``summary.json`` (the
  ranked candidates with their intervals, goals met, per category, and the verdict against the
  champion that register acts on), ``comparison.png``, the per-question table ``eval_table.json``
  and the side-by-side ``candidates_table.json``. Each candidate's own metrics are also logged on
  its LoggedModel (from a nested run named after it), linked to the dataset, and every request
  leaves a trace linked to that model (local engine).
Batches (local engine): an ONNX model gets its questions as requests of several prompts, shortest
prompt first, which it decodes as batches; greedy answers equal one-at-a-time ones.
Checked before any question is asked: every row (non-empty text question, an answer), every URI,
and that each question fits the context of every model evaluated. Answers may list aliases: "8 | eight".
"""

from __future__ import annotations

import argparse

from phi3mlflow.cli import StepParser, non_negative_float, positive_int, run_main, true_false, unit_interval
from phi3mlflow.evaluation.dataset import DEFAULT_DATASET
from phi3mlflow.evaluation.runner import Settings, evaluate
from phi3mlflow.metrics import METRICS
from phi3mlflow.summary import Summary


def optional_float(value: str) -> float | str:
    """Empty: no value (""); else a finite number >= 0."""
    return "" if not str(value).strip() else non_negative_float(value)


def parse_args(argv=None) -> argparse.Namespace:
    p = StepParser(prog="evaluate", description=__doc__.split("\n", 1)[0])
    p.add_argument("--chat_model_uri", default="")
    p.add_argument("--onnx_model_uris", default="")
    p.add_argument("--registered_model_name", default="")
    p.add_argument("--alias", default="")
    p.add_argument("--dataset", default=DEFAULT_DATASET)
    p.add_argument("--question_column", default="question")
    p.add_argument("--answer_column", default="answer")
    p.add_argument("--max_new_tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0)
    p.add_argument("--select_metric", choices=list(METRICS), default="accuracy")
    p.add_argument("--min_accuracy", type=unit_interval, default=0.9)
    p.add_argument("--max_accuracy_drop", type=unit_interval, default=1.0)
    p.add_argument("--max_kld", type=optional_float, default="")
    p.add_argument("--fidelity", type=true_false, default=True)
    p.add_argument("--engine", choices=("local", "spark"), default="local")
    return p.parse_args(argv)


def main(args) -> Summary:
    settings = Settings(**{**vars(args), "max_kld": None if args.max_kld == "" else args.max_kld})
    return evaluate(settings, vars(args))


if __name__ == "__main__":
    run_main(main, parse_args)
