"""Evaluation of the two wrappers on a question set: loading and checking inputs, calling each
model through its own MLflow interface, and choosing the winner."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from phi3mlflow import DATA_DIR
from phi3mlflow.metrics import better

DEFAULT_DATASET = DATA_DIR / "questions.jsonl"
# What each wrapper's signature takes, so a URI of the wrong kind is caught before loading.
INPUT_FIELD = {"chat": "messages", "onnx": "prompt"}


class EvaluationInputError(ValueError):
    """Bad evaluation input; the message starts with the parameter's name."""


def load_dataset(path: str, question_column: str, answer_column: str):
    import pandas as pd

    p = Path(path).expanduser()
    if not p.is_file():
        raise EvaluationInputError(f"dataset: no such file: {path}")
    try:
        if p.suffix.lower() == ".csv":
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        elif p.suffix.lower() in (".jsonl", ".json"):
            df = pd.read_json(p, lines=p.suffix.lower() == ".jsonl", dtype=False)
        else:
            raise EvaluationInputError(f"dataset: expected a .jsonl, .json or .csv file, got {p.name}")
    except (ValueError, pd.errors.ParserError) as e:
        if isinstance(e, EvaluationInputError):
            raise
        raise EvaluationInputError(f"dataset: cannot parse {path}: {str(e).splitlines()[0]}") from None
    if df.empty:
        raise EvaluationInputError(f"dataset: {path} has no rows")
    for param, column in (("question_column", question_column), ("answer_column", answer_column)):
        if column not in df.columns:
            raise EvaluationInputError(
                f"{param}: column {column!r} is not in {p.name} (columns: {', '.join(map(str, df.columns))})"
            )
    return df[[question_column, answer_column]].rename(columns={question_column: "question", answer_column: "expected"})


def check_model_uri(key: str, uri: str) -> None:
    """Resolve ``uri`` (reads only its MLmodel) and check it is the kind of model ``key`` expects."""
    import mlflow

    param = f"{key}_model_uri"
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as e:  # noqa: BLE001 - any failure to resolve is the user's URI
        raise EvaluationInputError(f"{param}: cannot resolve {uri!r}: {str(e).splitlines()[0][:200]}") from None
    inputs = info.signature.inputs.input_names() if info.signature else []
    if INPUT_FIELD[key] not in inputs:
        raise EvaluationInputError(
            f"{param}: {uri} takes {inputs or 'no declared inputs'}, not {INPUT_FIELD[key]!r}: is it the right wrapper?"
        )


@dataclass
class Answer:
    text: str
    latency_ms: float
    completion_tokens: int


def chat_request(question: str, max_new_tokens: int, temperature: float) -> dict:
    """The OpenAI-style request both engines send the chat model for one question."""
    request = {"messages": [{"role": "user", "content": question}], "max_tokens": max_new_tokens}
    if temperature > 0:
        # Samples only if the model was logged with temperature > 0 (transformers' do_sample).
        request["temperature"] = temperature
    return request


class ChatCaller:
    """The llm/v1/chat model, called with an OpenAI-style chat request as a user would."""

    key = "chat"

    def __init__(self, uri: str):
        import mlflow

        self.model = mlflow.pyfunc.load_model(uri)

    def __call__(self, question: str, max_new_tokens: int, temperature: float) -> Answer:
        request = chat_request(question, max_new_tokens, temperature)
        start = time.perf_counter()
        [out] = self.model.predict(request)
        ms = (time.perf_counter() - start) * 1000
        return Answer(out["choices"][0]["message"]["content"], ms, int(out["usage"]["completion_tokens"]))


class OnnxCaller:
    """The ONNX pyfunc, called with ``{"prompt": ...}`` and generation params as a user would."""

    key = "onnx"

    def __init__(self, uri: str):
        import mlflow

        self.model = mlflow.pyfunc.load_model(uri)
        # The pyfunc returns text only; its own tokenizer counts the generated tokens.
        self.tokenizer = self.model.unwrap_python_model().chat.tokenizer

    def __call__(self, question: str, max_new_tokens: int, temperature: float) -> Answer:
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "do_sample": temperature > 0}
        start = time.perf_counter()
        [text] = self.model.predict({"prompt": question}, params=params)
        ms = (time.perf_counter() - start) * 1000
        # Like the chat model's usage, count the end token it stopped on, unless it ran out of tokens.
        return Answer(text, ms, min(len(self.tokenizer.encode(text)) + 1, max_new_tokens))


def answer_all(caller, questions: list[str], max_new_tokens: int, temperature: float) -> list[Answer]:
    """Ask every question; a progress bar on a terminal, quiet in CI logs."""
    from tqdm import tqdm

    bar = tqdm(questions, desc=caller.key, unit="q", disable=not sys.stderr.isatty())
    return [caller(q, max_new_tokens, temperature) for q in bar]


def choose_best(models: dict[str, dict], metric: str) -> str:
    """The key of the best model on ``metric``; ties go to the lower p50 latency."""
    best = None
    for key, m in models.items():
        if best is None or better(metric, m[metric], models[best][metric]):
            best = key
        elif m[metric] == models[best][metric] and m["latency_p50_ms"] < models[best]["latency_p50_ms"]:
            best = key
    return best


def summary(models: dict[str, dict], metric: str, agreement: float | None) -> dict:
    return {"metric": metric, "best": choose_best(models, metric), "agreement": agreement, "models": models}


def plot(models: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(models)
    colors = ["#4C72B0", "#DD8452"][: len(keys)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.5))
    ax1.bar(keys, [models[k]["accuracy"] for k in keys], color=colors)
    ax1.set_ylim(0, 1.05)
    ax1.set_title("accuracy (higher is better)")
    p50 = [models[k]["latency_p50_ms"] for k in keys]
    p95 = [models[k]["latency_p95_ms"] for k in keys]
    ax2.bar(keys, p50, color=colors, label="p50")
    ax2.scatter(keys, p95, color="black", marker="_", s=400, label="p95", zorder=3)
    ax2.set_title("latency per question, ms (lower is better)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(obj, path: Path) -> Path:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return path
