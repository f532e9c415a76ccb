"""Answer-quality and speed metrics, as plain functions and as MLflow evaluation metrics.

Quality is judged on normalised text (lower case, no punctuation, single spaces). The expected
answer may list accepted aliases separated by ``|`` ("8 | eight"): ``accuracy`` - some alias occurs
in the prediction as whole words ("8" does not match "18"); ``exact_match`` - the prediction equals
an alias; ``f1`` - SQuAD-style token overlap with the closest alias. Speed comes from columns the
evaluation loop records per question: ``latency_ms`` and ``completion_tokens``.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")

# name -> True when greater is better; the metrics a user may select the winner by.
METRICS = {
    "accuracy": True,
    "exact_match": True,
    "f1": True,
    "latency_p50_ms": False,
    "latency_p95_ms": False,
    "tokens_per_s": True,
}


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def aliases(expected: str) -> list[str]:
    """The accepted answers, normalised: ``"8 | eight"`` -> ``["8", "eight"]``."""
    found = [normalize(a) for a in str(expected).split("|")]
    return [a for a in found if a] or [""]


def contains(prediction: str, expected: str) -> float:
    padded = f" {normalize(prediction)} "
    return float(any(f" {a} " in padded for a in aliases(expected)))


def exact(prediction: str, expected: str) -> float:
    return float(normalize(prediction) in aliases(expected))


def token_f1(prediction: str, expected: str) -> float:
    return max(_f1(prediction, a) for a in aliases(expected))


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize(prediction).split(), answer.split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def agreement(a: list[str], b: list[str]) -> float:
    """Share of questions on which two models gave the same (normalised) answer."""
    if not a:
        return 0.0
    return float(np.mean([normalize(x) == normalize(y) for x, y in zip(a, b, strict=True)]))


def better(metric: str, a: float, b: float) -> bool:
    return a > b if METRICS[metric] else a < b


def mlflow_metrics():
    """The METRICS as ``mlflow.models.make_metric`` objects for ``mlflow.models.evaluate``.

    Each aggregate is keyed by the metric's own name, so with ``metric_prefix="chat_"`` the run
    gets ``chat_accuracy`` rather than ``chat_accuracy/mean``.
    """
    from mlflow.metrics import MetricValue
    from mlflow.models import make_metric

    def per_row(fn, name):
        def eval_fn(predictions, targets, metrics):
            scores = [fn(p, t) for p, t in zip(predictions, targets, strict=True)]
            return MetricValue(scores=scores, aggregate_results={name: float(np.mean(scores))})

        return eval_fn

    def latency(q, name):
        def eval_fn(predictions, targets, metrics, latency_ms):
            return MetricValue(aggregate_results={name: float(np.percentile(latency_ms, q))})

        return eval_fn

    def tokens_per_s(predictions, targets, metrics, latency_ms, completion_tokens):
        seconds = float(np.sum(latency_ms)) / 1000
        return MetricValue(aggregate_results={"tokens_per_s": float(np.sum(completion_tokens)) / max(seconds, 1e-9)})

    fns = {
        "accuracy": per_row(contains, "accuracy"),
        "exact_match": per_row(exact, "exact_match"),
        "f1": per_row(token_f1, "f1"),
        "latency_p50_ms": latency(50, "latency_p50_ms"),
        "latency_p95_ms": latency(95, "latency_p95_ms"),
        "tokens_per_s": tokens_per_s,
    }
    return [make_metric(eval_fn=fns[name], greater_is_better=METRICS[name], name=name) for name in METRICS]
