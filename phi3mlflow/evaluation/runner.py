"""The evaluate step's work: every candidate (and the alias's current holder, as a candidate of its
own) asked the same questions in one run, compared question by question, measured for distribution
fidelity against the reference, ranked and decided (phi3mlflow/summary.py), and logged to MLflow."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from phi3mlflow import report, spark_scoring, tags
from phi3mlflow.evaluation import answering, callers, candidates
from phi3mlflow.evaluation.dataset import load_dataset
from phi3mlflow.evaluation.plot import plot
from phi3mlflow.evaluation.stats import Paired
from phi3mlflow.metrics import METRICS, aggregate, normalize, score_rows
from phi3mlflow.progress import Progress
from phi3mlflow.registry import check_names
from phi3mlflow.summary import PAIRED_METRICS, Candidate, Goals, Summary, build, verdict
from phi3mlflow.tracking import log_params_once

LATENCY_NOTE = (
    "latency_p50_ms and latency_p95_ms are per question; questions asked in one request (an ONNX "
    "model's batch, questions_per_request) each count the whole request's wall time. ms_per_question "
    "is the answering wall time over the questions and tokens_per_s generated tokens over that wall "
    "time: these two compare batched and one-at-a-time answering."
)
STATS_NOTE = (
    "Intervals are 95 % paired bootstrap intervals (10,000 resamples, fixed seed) of the difference "
    "of per-question scores on the same questions; p_value is the exact McNemar test on the questions "
    "where the two disagree. A difference counts only when its interval excludes 0. Fidelity figures "
    "are teacher-forced on the reference's own answers: per-token KL divergence from the reference "
    "(mean, 99th percentile, max), the share of positions with the same top token, and the ratio of "
    "the reference answers' perplexity under the candidate to that under the reference."
)


@dataclass(frozen=True)
class Settings:
    """What the evaluate step was asked (steps/evaluate.py's flags)."""

    chat_model_uri: str = ""
    onnx_model_uris: str = ""
    dataset: str = "data/questions.jsonl"
    question_column: str = "question"
    answer_column: str = "answer"
    max_new_tokens: int = 64
    temperature: float = 0.0
    select_metric: str = "accuracy"
    min_accuracy: float = 0.9
    max_accuracy_drop: float = 1.0
    max_kld: float | None = None
    engine: str = "local"
    registered_model_name: str = ""
    alias: str = ""
    fidelity: bool = True


@contextlib.contextmanager
def traces_linked_to(model_id: str | None):
    """Traces started inside are linked to the logged model ``model_id`` (to none when None)."""
    import mlflow  # heavy: MLflow

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


def evaluate(s: Settings, params: dict) -> Summary:
    """Run the evaluation ``s`` describes in a new MLflow run (``params`` logged on it)."""
    with contextlib.ExitStack() as stack:
        return _evaluate(s, params, stack)


def _evaluate(s: Settings, params: dict, stack: contextlib.ExitStack) -> Summary:
    import mlflow  # heavy: MLflow
    from mlflow.data.pandas_dataset import from_pandas  # heavy: as above

    if s.registered_model_name.strip():
        check_names(s.registered_model_name, s.alias or "champion", mlflow.get_registry_uri())
    data = load_dataset(s.dataset, s.question_column, s.answer_column)
    refs = candidates.check_candidates(s.chat_model_uri, s.onnx_model_uris)
    champion = candidates.find_champion(s.registered_model_name, s.alias)
    champion_key, champion_error = None, champion.error
    if champion.ref is not None:
        same = next((r for r in refs if r.model_id and r.model_id == champion.ref.model_id), None)
        if same is not None:
            champion_key = same.key  # the alias holds one of the candidates: asked once, under its key
        else:
            refs.append(champion.ref)
            champion_key = candidates.CHAMPION
    if champion_error:
        print(f"evaluate: {champion_error}", file=sys.stderr, flush=True)
    questions = data["question"].tolist()
    # MLflow downloads a model from the tracking server into a temporary folder it never removes.
    downloads = stack.enter_context(tempfile.TemporaryDirectory(prefix="phi3-evaluate-"))
    models: dict[str, callers.Caller] = {}
    if s.engine == "spark":
        spark_scoring.check_available()
    else:
        # Load every model and check every question against every context before answering any.
        for ref in refs:
            try:
                models[ref.key] = callers.CALLERS[ref.wrapper](ref, f"{downloads}/{ref.key}")
            except Exception as e:  # noqa: BLE001
                if ref.key != candidates.CHAMPION:
                    raise
                # The alias's holder is gone (artifacts deleted, say): decide without it, and say so.
                champion_error = f"@{s.alias} (version {champion.version}) cannot be loaded: {_first_line(e)}"
                print(f"evaluate: {champion_error}", file=sys.stderr, flush=True)
                refs.remove(ref)
                champion_key = None
        callers.check_fits(list(models.values()), questions, s.dataset, s.max_new_tokens)

    table = data.copy()
    scored: list[Candidate] = []
    answers: dict[str, list[str]] = {}
    per_question: dict[str, dict[str, list[float]]] = {}
    per_request: dict[str, int] = {}
    with mlflow.start_run():
        log_params_once(params)
        dataset = from_pandas(data, source=str(Path(s.dataset).resolve()), name=Path(s.dataset).stem)
        mlflow.log_input(dataset, context="evaluation")
        if champion.version:
            mlflow.set_tag(tags.CHAMPION_VERSION, champion.version)
        for ref in refs:
            print(f"evaluate: {ref.key} {ref.uri} on {len(questions)} questions", flush=True)
            if s.engine == "spark":
                answered = spark_scoring.score(spark_scoring.session(), ref, questions, s.max_new_tokens,
                                               s.temperature)  # fmt: skip
            else:
                with traces_linked_to(ref.model_id):
                    answered = answering.ask_all(models[ref.key], questions, s.max_new_tokens, s.temperature)
            answers[ref.key] = [a.text for a in answered]
            rows = score_rows(answers[ref.key], data["expected"].tolist())
            per_question[ref.key] = {m: rows[m] for m in PAIRED_METRICS}
            scores = aggregate(rows, [a.latency_ms for a in answered], [a.completion_tokens for a in answered])
            # A batch's questions share its wall time as their latency: throughput is over wall time.
            scores["tokens_per_s"] = answering.tokens_per_s(answered)
            scores["ms_per_question"] = answering.wall_seconds(answered) * 1000 / len(answered)
            per_request[ref.key] = max(a.batch_size for a in answered)
            version = champion.version if ref.key == champion_key else None
            scored.append(Candidate.scored(ref.key, ref.wrapper, ref.precision, ref.uri, scores,
                                           model_id=ref.model_id, version=version))  # fmt: skip
            table[f"{ref.key}_answer"] = answers[ref.key]
            table[f"{ref.key}_correct"] = [x == 1.0 for x in rows["accuracy"]]
            table[f"{ref.key}_f1"] = [round(x, 4) for x in rows["f1"]]
            table[f"{ref.key}_latency_ms"] = [round(a.latency_ms, 2) for a in answered]
            table[f"{ref.key}_completion_tokens"] = [a.completion_tokens for a in answered]

        reference = candidates.REFERENCE if any(r.key == candidates.REFERENCE for r in refs) else None
        if s.fidelity and reference and s.engine == "local":
            _fidelity(models, reference, scored, questions, answers[reference])
        goals = Goals(s.min_accuracy, s.max_accuracy_drop, s.max_kld)
        categories = data["category"].astype(str).tolist() if "category" in data.columns else None
        result = build(scored, s.select_metric, goals, reference, per_question, answers, categories,
                       champion_key, champion.version, champion_error)  # fmt: skip
        _log(result, refs, table, answers, dataset, per_request)
    _print(result)
    return result


def _fidelity(models, reference: str, scored: list[Candidate], questions: list[str], ref_answers: list[str]) -> None:
    """Teacher-forced fidelity of every ONNX candidate made from the reference's own model. Two
    candidates whose ORT GenAI folders hold the same files (a champion logged by an earlier chain
    from the export a candidate logs again, say) are measured once: the same files give the same
    figures, and each pass costs a prefill per question."""
    from phi3mlflow import fidelity  # heavy: torch, through the reference's forward passes

    pipe = models[reference].model.get_raw_model()
    scorer = fidelity.TransformersScorer(pipe.model, pipe.tokenizer)
    measured: dict[str, fidelity.GenAIScorer] = {}
    twins: dict[str, str] = {}  # candidate key -> the measured candidate with the same files
    for c in scored:
        if c.wrapper != "onnx":
            continue
        chat = models[c.key].chat
        if not fidelity.same_tokenizer(scorer, chat):
            c.fidelity_note = "another tokenizer than the reference's: compared on answers alone"
            continue
        twin = next((k for k, m in measured.items() if _same_files(m.chat.folder, chat.folder)), None)
        if twin is None:
            measured[c.key] = fidelity.GenAIScorer(chat)
        else:
            twins[c.key] = twin
    if not measured:
        return
    same = "".join(f"; {k} has the files of {t}" for k, t in twins.items())
    print(f"evaluate: fidelity of {', '.join(measured)} against {reference}, teacher-forced on its answers{same}",
          flush=True)  # fmt: skip
    with Progress("evaluate fidelity", len(questions)) as progress:
        figures = fidelity.measure(scorer, measured, questions, ref_answers,
                                   progress=lambda done, total: progress.update(done - progress.done))  # fmt: skip
    figures.update({k: figures[t] for k, t in twins.items()})
    for c in scored:
        if c.key in figures:
            c.fidelity = {k: round(float(v), 6) for k, v in figures[c.key].metrics().items()}


def _same_files(a: Path, b: Path) -> bool:
    """Whether two model folders hold the same files, byte for byte (sizes first, then SHA-256)."""
    files = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
    if files != sorted(f.relative_to(b) for f in b.rglob("*") if f.is_file()):
        return False
    if any((a / f).stat().st_size != (b / f).stat().st_size for f in files):
        return False
    return all(_sha256(a / f) == _sha256(b / f) for f in files)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _log(result: Summary, refs, table, answers: dict[str, list[str]], dataset, per_request: dict[str, int]) -> None:
    import mlflow  # heavy: MLflow

    run_metrics: dict[str, float] = {}
    rows = []
    for c in result.candidates:
        own: dict[str, float | None] = {m: c[m] for m in METRICS}
        own.update({"accuracy_ci_low": c.accuracy_low, "accuracy_ci_high": c.accuracy_high,
                    "agreement": c.agreement, **(c.fidelity or {})})  # fmt: skip
        if c.vs_reference:
            own.update(Paired(**c.vs_reference).metrics("vs_reference"))
        logged = {k: float(v) for k, v in own.items() if v is not None}
        run_metrics.update({f"{c.key}_{k}": v for k, v in logged.items()})
        if c.model_id:
            # On the logged model too, linked to the dataset: the model page shows them and
            # mlflow.search_logged_models ranks by them. From a nested run named after the candidate,
            # so the evaluate run's own rows are only the prefixed ones.
            with mlflow.start_run(run_name=f"evaluate {c.key}", nested=True):
                mlflow.set_tag(report.NOTE, f"The metrics of {c.key} ({c.model_uri}) in its parent evaluate run.")
                mlflow.log_metrics(logged, model_id=c.model_id, dataset=dataset)
        if result.reference and c.key != result.reference:
            pairs = zip(answers[c.key], answers[result.reference], strict=True)
            table[f"{c.key}_agrees"] = [normalize(a) == normalize(b) for a, b in pairs]
        rows.append(_table_row(c, result))
    if result.vs_champion:
        run_metrics.update(Paired(**result.vs_champion).metrics("winner_vs_champion"))
    mlflow.log_metrics(run_metrics)
    mlflow.log_table(table, artifact_file="eval_table.json")
    mlflow.log_table(_frame(rows), artifact_file="candidates_table.json")
    mlflow.log_dict({**result.to_dict(), "questions_per_request": per_request, "latency": LATENCY_NOTE,
                     "statistics": STATS_NOTE}, "summary.json")  # fmt: skip
    mlflow.log_figure(plot(result.candidates), "comparison.png")
    mlflow.set_tags({tags.BEST: result.best, tags.WINNER: result.winner})
    report.name_and_note("evaluate", f"{verdict(result)}.")


def _table_row(c: Candidate, result: Summary) -> dict:
    """The side-by-side table's row of one candidate: what decided, with its intervals."""
    vs = Paired(**c.vs_reference) if c.vs_reference else None
    fid = c.fidelity or {}
    return {
        "rank": c.rank, "candidate": c.key, "version": c.version or "", "accuracy": c.accuracy,
        "accuracy_95ci": f"{c.accuracy_low:.3f}…{c.accuracy_high:.3f}",
        "vs_reference": vs.text() if vs else "", "p_value": vs.p_value if vs else None,
        "kld_mean": fid.get("kld_mean"), "kld_p99": fid.get("kld_p99"), "top1_agreement": fid.get("top1_agreement"),
        "ppl_ratio": fid.get("ppl_ratio"), "ms_per_question": round(c.ms_per_question, 2),
        "tokens_per_s": round(c.tokens_per_s, 1), "meets_goals": c.meets_goals, "missed": c.missed,
        "winner": c.key == result.winner, "champion": c.key == result.champion,
    }  # fmt: skip


def _frame(rows: list[dict]):
    import pandas as pd  # heavy: pandas

    return pd.DataFrame(rows)


def _print(result: Summary) -> None:
    for c in result.candidates:
        shown = {m: c[m] for m in METRICS} | {"agreement": c.agreement} | (c.fidelity or {})
        goals_text = "meets the goals" if c.meets_goals else f"misses the goals: {c.missed}"
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if v is not None)
        interval = f" (95 % CI {c.accuracy_low:.3f}…{c.accuracy_high:.3f})"
        vs = f"; vs {result.reference}: {Paired(**c.vs_reference).text()}" if c.vs_reference else ""
        print(f"evaluate: #{c.rank} {c.key}{f' (version {c.version})' if c.version else ''}: {numbers}{interval}{vs}; "
              f"{goals_text}")  # fmt: skip
    for cat, accs in result.categories.items():
        print(f"evaluate: {cat}: " + ", ".join(f"{k} accuracy={v:.3g}" for k, v in accs.items()))
    print(f"evaluate: {verdict(result)}", flush=True)


def _first_line(e: BaseException) -> str:
    """The error as one line (a multi-line cause joined), at most 300 characters."""
    return " ".join(str(getattr(e, "message", e)).split())[:300] or type(e).__name__
