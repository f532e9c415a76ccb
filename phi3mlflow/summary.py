"""What evaluate decides and register reads: the evaluation summary as a typed record.

evaluate logs it as ``summary.json`` (``mlflow.log_dict``); register loads it back
(``mlflow.artifacts.load_dict``) with :meth:`Summary.from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from phi3mlflow.metrics import METRICS


@dataclass
class Scores:
    """One candidate model's evaluation."""

    model_uri: str
    accuracy: float
    exact_match: float
    f1: float
    latency_p50_ms: float
    latency_p95_ms: float
    tokens_per_s: float
    # Accuracy minus the reference's (negative: it loses accuracy); None for the reference itself.
    accuracy_delta: float | None = None

    def __getitem__(self, metric: str) -> float:
        if metric not in METRICS and metric != "accuracy_delta":
            raise KeyError(metric)
        return getattr(self, metric)


def rank(models: dict[str, Scores], metric: str) -> list[str]:
    """Candidate keys best first by ``metric``; ties go to the lower p50 latency."""
    sign = 1 if METRICS[metric] else -1
    return sorted(models, key=lambda k: (-sign * models[k][metric], models[k].latency_p50_ms))


@dataclass
class Summary:
    metric: str  # the selected metric (METRICS)
    best: str  # the best candidate by it, ties to the lower p50 latency, before any goal
    reference: str | None  # the candidate others are compared with (the transformers pipeline)
    agreement: float | None  # share of questions both models answered alike (two models only)
    models: dict[str, Scores]
    categories: dict[str, dict[str, float]] = field(default_factory=dict)  # category -> model -> accuracy

    def to_dict(self) -> dict:
        out = asdict(self)
        for scores in out["models"].values():
            if scores["accuracy_delta"] is None:
                del scores["accuracy_delta"]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        models = {k: Scores(**v) for k, v in d["models"].items()}
        return cls(d["metric"], d["best"], d.get("reference"), d.get("agreement"), models, d.get("categories") or {})
