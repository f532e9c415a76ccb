"""What evaluate decides and register reads: the ranked candidates, their paired comparisons and the
verdict against the champion, as a typed record.

evaluate builds it with :func:`build` from the answers of one run (every candidate, the current
champion among them, asked the same questions) and logs it as ``summary.json``; register loads it
back with :meth:`Summary.from_dict` and decides from it alone, never from metrics stored elsewhere.

The rules, each respecting the noise of a finite question set (phi3mlflow/evaluation/stats.py):
- ``max_accuracy_drop`` is a non-inferiority margin: a candidate meets it when the lower end of
  the 95 % interval of its accuracy difference to the reference is at or above ``-max_accuracy_drop``.
- ``min_accuracy`` is a floor on the accuracy itself; ``max_kld`` a ceiling on the mean KL
  divergence from the reference (ONNX candidates of the reference's own model).
- Among the challengers that meet the goals, those whose selected quality metric is not
  significantly below the best one's are tied, and a tie goes to the lowest time per question
  measured in this run, except that the champion, when it is one of them, keeps it unless another
  is faster by more than ``TIE_MARGIN`` and ``TIE_FLOOR_MS``. Speed metrics (no per-question pairing) rank by value.
- The alias moves when the winner is significantly better than the champion, or tied with it and
  faster by more than ``TIE_MARGIN`` and ``TIE_FLOOR_MS`` in this run; otherwise it stays.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from phi3mlflow.evaluation.candidates import CHAMPION
from phi3mlflow.evaluation.stats import Paired, by_category, interval, paired
from phi3mlflow.metrics import METRICS, agreement

# Metrics scored per question, so two candidates compare question by question.
PAIRED_METRICS = ("accuracy", "exact_match", "f1")
# A tie on quality goes to a challenger only if its time per question is this much lower than the
# champion's in the same run: the same model timed twice on a shared 2-core machine differs by up
# to ~24 % (the benchmark's A/A pairs).
TIE_MARGIN = 0.25
# ... and lower by more than this many milliseconds: a question the tiny model answers in ~2 ms is
# timed at the scheduler's grain, and a clean-clone CI run saw an identical rerun's candidates differ
# by more than 25 % there (the alias moved on noise). Real models take 100+ ms per question.
TIE_FLOOR_MS = 5.0


def clearly_faster(ms: float, than_ms: float, margin: float = TIE_MARGIN) -> bool:
    """Whether ``ms`` per question beats ``than_ms`` by more than the timing noise of one run."""
    return ms < than_ms * (1 - margin) and than_ms - ms > TIE_FLOOR_MS


@dataclass(frozen=True)
class Goals:
    """What a candidate must reach to win: an absolute floor, a non-inferiority margin against the
    reference, and a ceiling on the KL divergence from it (None: no ceiling)."""

    min_accuracy: float = 0.0
    max_accuracy_drop: float = 1.0
    max_kld: float | None = None


@dataclass
class Candidate:
    """One evaluated model: its scores, its comparison with the reference, and whether it meets the goals."""

    key: str  # chat, onnx_<precision>, or champion: the metric prefix on the evaluate run
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
    model_id: str | None = None
    version: str | None = None  # the registered version, for the champion
    accuracy_low: float | None = None  # the 95 % interval of its own accuracy
    accuracy_high: float | None = None
    # Against the reference (the transformers pipeline); None for the reference itself or without one.
    accuracy_delta: float | None = None  # accuracy minus the reference's: negative when it loses
    agreement: float | None = None  # share of questions answered as the reference did (normalised text)
    vs_reference: dict | None = None  # stats.Paired of accuracy against the reference
    fidelity: dict | None = None  # fidelity.Fidelity.metrics() against the reference, when measured
    fidelity_note: str = ""  # why there are no fidelity figures, when there are none
    meets_goals: bool = True
    missed: str = ""  # why it misses the goals, one sentence; empty when it meets them
    rank: int = 0  # 1 = best; challengers tied on quality rank by ms_per_question

    @classmethod
    def scored(cls, key: str, wrapper: str, precision: str, model_uri: str, scores: dict[str, float],
               **extra) -> Candidate:  # fmt: skip
        """A candidate from its METRICS (metrics.aggregate)."""
        return cls(key, wrapper, precision, model_uri, accuracy=scores["accuracy"], exact_match=scores["exact_match"],
                   f1=scores["f1"], latency_p50_ms=scores["latency_p50_ms"], latency_p95_ms=scores["latency_p95_ms"],
                   tokens_per_s=scores["tokens_per_s"], ms_per_question=scores["ms_per_question"], **extra)  # fmt: skip

    def __getitem__(self, metric: str) -> float:
        if metric not in METRICS:
            raise KeyError(metric)
        return getattr(self, metric)


@dataclass
class Summary:
    metric: str  # the selected metric (METRICS)
    reference: str | None  # the key others are compared with, when the transformers pipeline was evaluated
    goals: Goals
    winner: str  # the best challenger that meets the goals; else the best challenger
    candidates: list[Candidate]  # best first (rank 1..n)
    categories: dict[str, dict[str, float]] = field(default_factory=dict)  # category -> key -> accuracy
    # category -> key -> stats.Paired (as a dict) against the reference, for categories large enough
    category_stats: dict[str, dict[str, dict]] = field(default_factory=dict)
    champion: str | None = None  # the candidate that is the alias's holder, when there is one
    champion_version: str | None = None
    champion_error: str = ""  # why the alias's holder could not be asked, when it could not
    vs_champion: dict | None = None  # stats.Paired of the winner against the champion
    alias_should_move: bool = False  # the verdict against the champion (force aside)
    alias_reason: str = ""
    tie_margin: float = TIE_MARGIN
    tied: list[str] = field(default_factory=list)  # challengers within the noise of the winner, decided on time

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
        optional = ("categories", "category_stats", "champion", "champion_version", "champion_error", "vs_champion",
                    "alias_should_move", "alias_reason", "tie_margin", "tied")  # fmt: skip
        simple = {k: d[k] for k in optional if k in d}
        return cls(d["metric"], d.get("reference"), Goals(**d["goals"]), d["winner"], candidates, **simple)


def missed_goals(c: Candidate, goals: Goals) -> str:
    """Why ``c`` misses the goals (empty when it meets them); its comparison with the reference is set."""
    if c.accuracy < goals.min_accuracy:
        return f"{c.key} accuracy {c.accuracy:.4g} is below min_accuracy {goals.min_accuracy:.4g}"
    if c.vs_reference is not None:
        vs = Paired(**c.vs_reference)
        if vs.low < -goals.max_accuracy_drop - 1e-9:  # the interval reaches below the margin
            return (f"{c.key} may lose more than max_accuracy_drop {goals.max_accuracy_drop:.4g} against the "
                    f"reference: {vs.text()}")  # fmt: skip
    if goals.max_kld is not None and c.fidelity is not None and c.fidelity["kld_mean"] > goals.max_kld:
        return f"{c.key} mean KL divergence {c.fidelity['kld_mean']:.4g} is above max_kld {goals.max_kld:.4g}"
    return ""


def build(
    candidates: list[Candidate],
    metric: str,
    goals: Goals,
    reference: str | None,
    scores: dict[str, dict[str, list[float]]],
    answers: dict[str, list[str]] | None = None,
    categories: list[str] | None = None,
    champion: str | None = None,
    champion_version: str | None = None,
    champion_error: str = "",
) -> Summary:
    """Rank ``candidates`` and decide, from one run's answers.

    ``scores``: key -> PAIRED_METRICS -> one score per question (the same questions, in order, for
    every candidate); ``answers``: key -> answer texts (for agreement); ``categories``: one per
    question; ``champion``: the key of the candidate that holds the alias now (its version
    ``champion_version``), or None with ``champion_error`` saying why it could not be asked.
    """
    by_key = {c.key: c for c in candidates}
    ref = by_key.get(reference) if reference else None
    for c in candidates:
        c.accuracy_low, c.accuracy_high = interval(scores[c.key]["accuracy"])
        if ref is not None and c is not ref:
            c.accuracy_delta = round(c.accuracy - ref.accuracy, 6)
            c.vs_reference = paired(scores[c.key]["accuracy"], scores[ref.key]["accuracy"]).to_dict()
            if answers and c.key in answers and ref.key in answers:
                c.agreement = agreement(answers[c.key], answers[ref.key])
        c.missed = missed_goals(c, goals)
        c.meets_goals = not c.missed

    # The alias's holder asked as a candidate of its own is no challenger (it is what they challenge);
    # when it is one of the candidates (the same logged model), it challenges like the others.
    challengers = [c for c in candidates if c.key != CHAMPION]
    ranked, tied = _rank(challengers, metric, scores, incumbent=champion)
    rest = sorted((c for c in candidates if c not in challengers), key=lambda c: _sort_key(c, metric))
    for i, c in enumerate([*ranked, *rest], start=1):
        c.rank = i
    winner = next((c for c in ranked if c.meets_goals), ranked[0])

    category_stats: dict[str, dict[str, dict]] = {}
    per_category: dict[str, dict[str, float]] = {}
    if categories:
        for cat in sorted(set(categories)):
            idx = [i for i, k in enumerate(categories) if k == cat]
            per_category[cat] = {c.key: round(sum(scores[c.key]["accuracy"][i] for i in idx) / len(idx), 6)
                                 for c in candidates}  # fmt: skip
        if ref is not None:
            for c in candidates:
                if c is not ref:
                    found = by_category(scores[c.key]["accuracy"], scores[ref.key]["accuracy"], categories)
                    for cat, p in found.items():
                        category_stats.setdefault(cat, {})[c.key] = p.to_dict()

    summary = Summary(metric, ref.key if ref else None, goals, winner.key, [*ranked, *rest], per_category,
                      category_stats, champion, champion_version, champion_error)  # fmt: skip
    summary.tied = [k for k in tied if k != winner.key] if winner.key in tied else []
    summary.alias_should_move, summary.alias_reason, summary.vs_champion = _against_champion(summary, scores)
    return summary


def _sort_key(c: Candidate, metric: str) -> tuple[float, float]:
    sign = 1 if METRICS[metric] else -1
    return (-sign * c[metric], c.ms_per_question)


def _rank(candidates: list[Candidate], metric: str, scores: dict[str, dict[str, list[float]]],
          incumbent: str | None = None) -> tuple[list[Candidate], list[str]]:  # fmt: skip
    """Best first, and the keys of the best's tie group. On a per-question metric, the candidates
    (among those that meet the goals) not significantly below the best are tied with it and ordered
    by time per question, except that the ``incumbent`` (the champion, when it is one of them) stays
    first unless another is clearly faster (``clearly_faster``): a tie decided by timing noise would
    register another version at every identical rerun. The others follow by value. A speed metric
    ranks by value."""
    by_value = sorted(candidates, key=lambda c: _sort_key(c, metric))
    if metric not in PAIRED_METRICS:
        return by_value, []
    eligible = [c for c in by_value if c.meets_goals] or by_value
    top = eligible[0]
    tied = [c for c in eligible if c is top or not paired(scores[c.key][metric], scores[top.key][metric]).worse]
    tied.sort(key=lambda c: c.ms_per_question)
    held = next((c for c in tied if c.key == incumbent), None)
    if held is not None and tied[0] is not held and not clearly_faster(tied[0].ms_per_question, held.ms_per_question):
        tied.remove(held)
        tied.insert(0, held)
    return tied + [c for c in by_value if c not in tied], [c.key for c in tied] if len(tied) > 1 else []


def _against_champion(s: Summary, scores: dict[str, dict[str, list[float]]]) -> tuple[bool, str, dict | None]:
    """Whether the alias should move to the winner, and why, from this run's answers alone."""
    winner = s[s.winner]
    if not winner.meets_goals:
        refused = "; ".join(c.missed for c in s.candidates if c.missed and c.key != s.champion)
        return False, f"no candidate meets the goals ({refused})", None
    if s.champion is None:
        if s.champion_error:
            return True, f"{winner.key} meets the goals; {s.champion_error}, so the gated winner replaces it", None
        return True, f"{winner.key} meets the goals; no version holds the alias", None
    holder = f"version {s.champion_version}" if s.champion_version else "the champion"
    if s.champion == winner.key:
        return False, f"{winner.key} is {holder} itself: it stays", None
    champ = s[s.champion]
    metric = s.metric if s.metric in PAIRED_METRICS else "accuracy"
    vs = paired(scores[winner.key][metric], scores[champ.key][metric])
    evidence = vs.text(metric)
    if vs.better:
        return True, f"{winner.key} beats {holder} on the same questions: {evidence}", vs.to_dict()
    if vs.worse:
        return False, f"{winner.key} is worse than {holder}: {evidence}; it stays", vs.to_dict()
    faster = clearly_faster(winner.ms_per_question, champ.ms_per_question, s.tie_margin)
    times = f"{winner.ms_per_question:.4g} vs {champ.ms_per_question:.4g} ms per question"
    if faster:
        return True, (f"{winner.key} ties with {holder} ({evidence}) and is faster by more than "
                      f"{s.tie_margin:.0%} in this run and by more than {TIE_FLOOR_MS:g} ms per question "
                      f"({times})"), vs.to_dict()  # fmt: skip
    return (
        False,
        f"tied with {holder}: {evidence}; no speed gain beyond {s.tie_margin:.0%} and {TIE_FLOOR_MS:g} ms per "
        f"question ({times}): it stays",
        (vs.to_dict()),
    )


def verdict(summary: Summary) -> str:
    """Who won the evaluation and why, with the intervals: says so when candidates tied within the
    noise and time per question decided, names every candidate the goals refused, and ends with the
    verdict against the champion."""
    metric, winner = summary.metric, summary[summary.winner]
    refused = "; ".join(c.missed for c in summary.candidates if not c.meets_goals)
    if not winner.meets_goals:
        return f"no candidate meets the goals ({refused}); the best by {metric} is {winner.key}"
    own = f"{metric} {winner[metric]:.4g}"
    if winner.accuracy_low is not None and metric == "accuracy":
        own += f" (95 % CI {winner.accuracy_low:.3f}…{winner.accuracy_high:.3f})"
    eligible = [c for c in summary.candidates if c.meets_goals and c is not winner and c.key != summary.champion]
    tied = [summary[k] for k in summary.tied]
    if not eligible:
        text = f"{winner.key} is the only challenger that meets the goals ({own})"
    elif tied:
        names = ", ".join(c.key for c in tied)
        times = ", ".join(f"{c.key} {c.ms_per_question:.0f} ms" for c in tied)
        text = (f"{winner.key} wins ({own}): tied within the noise with {names}, and the fastest per question "
                f"({winner.ms_per_question:.0f} ms vs {times})")  # fmt: skip
    else:
        text = f"{winner.key} wins ({own}), significantly ahead of {eligible[0].key} ({eligible[0][metric]:.4g})"
    if winner.vs_reference:
        text += f"; against {summary.reference}: {Paired(**winner.vs_reference).text()}"
    if refused:
        text += f"; refused: {refused}"
    if summary.alias_reason:
        text += f"; alias: {'moves' if summary.alias_should_move else 'stays'} ({summary.alias_reason})"
    return text
