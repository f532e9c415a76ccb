"""What evaluate decides and register reads: the ranked candidates as a typed record.

evaluate builds it with :func:`build` and logs it as ``summary.json`` (``mlflow.log_dict``);
register loads it back (``mlflow.artifacts.load_dict``) with :meth:`Summary.from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from phi3mlflow.metrics import METRICS, agreement


@dataclass(frozen=True)
class Goals:
    """What a candidate must reach to win: an absolute floor and a relative bound against the reference."""

    min_accuracy: float = 0.0
    max_accuracy_drop: float = 1.0


@dataclass
class Candidate:
    """One evaluated model: its scores, its difference to the reference, and whether it meets the goals."""

    key: str  # chat, or onnx_<precision>: the metric prefix on the evaluate run
    wrapper: str  # chat or onnx
    precision: str  # fp32 for the transformers pipeline; fp32, int8, int4 or prebuilt for ONNX
    model_uri: str
    accuracy: float
    exact_match: float
    f1: float
    latency_p50_ms: float
    latency_p95_ms: float
    tokens_per_s: float
    ms_per_question: float
    # Against the reference (the transformers pipeline); None for the reference itself or without one.
    accuracy_delta: float | None = None  # accuracy minus the reference's: negative when it loses
    agreement: float | None = None  # share of questions answered as the reference did (normalised text)
    meets_goals: bool = True
    missed: str = ""  # why it misses the goals, one sentence; empty when it meets them
    rank: int = 0  # 1 = best by the selected metric, ties to the lower ms_per_question

    @classmethod
    def scored(cls, key: str, wrapper: str, precision: str, model_uri: str, scores: dict[str, float]) -> Candidate:
        """A candidate from its METRICS (metrics.aggregate)."""
        return cls(
            key, wrapper, precision, model_uri, accuracy=scores["accuracy"], exact_match=scores["exact_match"],
            f1=scores["f1"], latency_p50_ms=scores["latency_p50_ms"], latency_p95_ms=scores["latency_p95_ms"],
            tokens_per_s=scores["tokens_per_s"], ms_per_question=scores["ms_per_question"],
        )  # fmt: skip

    def __getitem__(self, metric: str) -> float:
        if metric not in METRICS:
            raise KeyError(metric)
        return getattr(self, metric)


@dataclass
class Summary:
    metric: str  # the selected metric (METRICS)
    reference: str | None  # the key others are compared with, when the transformers pipeline was evaluated
    goals: Goals
    winner: str  # the best by ``metric`` among candidates that meet the goals; else the best of all
    candidates: list[Candidate]  # best first (rank 1..n)
    categories: dict[str, dict[str, float]] = field(default_factory=dict)  # category -> key -> accuracy

    @property
    def best(self) -> str:
        """The best candidate by the selected metric, goals aside."""
        return self.candidates[0].key

    @property
    def models(self) -> dict[str, Candidate]:
        return {c.key: c for c in self.candidates}

    def __getitem__(self, key: str) -> Candidate:
        return self.models[key]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        candidates = [Candidate(**c) for c in d["candidates"]]
        return cls(d["metric"], d.get("reference"), Goals(**d["goals"]), d["winner"], candidates,
                   d.get("categories") or {})  # fmt: skip


def rank_key(c: Candidate, metric: str) -> tuple[float, float]:
    """Sort key, best first: the selected metric, then the less answering time per question (not
    p50 latency: a batched question's latency is its whole batch's time)."""
    sign = 1 if METRICS[metric] else -1
    return (-sign * c[metric], c.ms_per_question)


def missed_goals(c: Candidate, reference: Candidate | None, goals: Goals) -> str:
    """Why ``c`` misses the goals (empty when it meets them)."""
    if c.accuracy < goals.min_accuracy:
        return f"{c.key} accuracy {c.accuracy:.4g} is below min_accuracy {goals.min_accuracy:.4g}"
    if reference is not None and c.key != reference.key:
        drop = reference.accuracy - c.accuracy
        if drop > goals.max_accuracy_drop + 1e-9:
            return (
                f"{c.key} loses {drop:.4g} accuracy against the reference {reference.key} "
                f"({c.accuracy:.4g} vs {reference.accuracy:.4g}), more than max_accuracy_drop "
                f"{goals.max_accuracy_drop:.4g}"
            )
    return ""


def build(
    candidates: list[Candidate],
    metric: str,
    goals: Goals,
    reference: str | None,
    answers: dict[str, list[str]] | None = None,
    categories: dict | None = None,
) -> Summary:
    """Rank ``candidates`` and choose the winner.

    Every candidate but the reference records its accuracy difference to the reference and, given
    ``answers`` (key -> one answer per question), the share of answers equal to the reference's.
    """
    by_key = {c.key: c for c in candidates}
    ref = by_key.get(reference) if reference else None
    for c in candidates:
        if ref is not None and c is not ref:
            c.accuracy_delta = c.accuracy - ref.accuracy
            if answers and c.key in answers and ref.key in answers:
                c.agreement = agreement(answers[c.key], answers[ref.key])
        c.missed = missed_goals(c, ref, goals)
        c.meets_goals = not c.missed
    ranked = sorted(candidates, key=lambda c: rank_key(c, metric))
    for i, c in enumerate(ranked, start=1):
        c.rank = i
    winner = next((c for c in ranked if c.meets_goals), ranked[0])
    return Summary(metric, ref.key if ref else None, goals, winner.key, ranked, categories or {})
