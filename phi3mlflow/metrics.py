"""Answer-quality and speed metrics, as plain functions (mlflow.models.evaluate is deprecated for LLMs
in MLflow 3; these are logged with log_metrics, on the run and on each LoggedModel).

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
    # Answering wall time over questions: comparable between one-at-a-time and batched answering
    # (a batch's questions share its time), so it breaks ties between candidates.
    "ms_per_question": False,
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


def score_rows(predictions: list[str], expected: list[str]) -> dict[str, list[float]]:
    """Per-question accuracy, exact match and F1."""
    pairs = list(zip(predictions, expected, strict=True))
    return {
        "accuracy": [contains(p, e) for p, e in pairs],
        "exact_match": [exact(p, e) for p, e in pairs],
        "f1": [token_f1(p, e) for p, e in pairs],
    }


def aggregate(rows: dict[str, list[float]], latency_ms: list[float], completion_tokens: list[int]) -> dict[str, float]:
    """The METRICS of one model: mean quality, latency percentiles, generated tokens per second."""
    seconds = float(np.sum(latency_ms)) / 1000
    return {
        **{name: float(np.mean(scores)) for name, scores in rows.items()},
        "latency_p50_ms": float(np.percentile(latency_ms, 50)),
        "latency_p95_ms": float(np.percentile(latency_ms, 95)),
        "tokens_per_s": float(np.sum(completion_tokens)) / max(seconds, 1e-9),
        "ms_per_question": float(np.mean(latency_ms)),
    }
