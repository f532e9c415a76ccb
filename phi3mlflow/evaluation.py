"""Evaluation of the two wrappers on a question set: loading and checking inputs, calling each
model through its own MLflow interface, and choosing the winner."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from phi3mlflow import PROJECT_ROOT
from phi3mlflow.errors import InputError
from phi3mlflow.metrics import aliases
from phi3mlflow.summary import Scores, Summary, rank

# Relative to the project, like every path a profile or MLproject default names.
DEFAULT_DATASET = "data/questions.jsonl"
# What each wrapper's signature takes, so a URI of the wrong kind is caught before loading.
INPUT_FIELD = {"chat": "messages", "onnx": "prompt"}


# An optional column of the dataset: accuracy is also reported per category.
CATEGORY_COLUMN = "category"


def _fail(param: str, message: str):
    raise InputError(param, message)


def load_dataset(path: str, question_column: str, answer_column: str):
    """The dataset as columns question, expected (and category when present), every row checked."""
    import pandas as pd

    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (PROJECT_ROOT / p).exists():
        p = PROJECT_ROOT / p
    if not p.is_file():
        _fail("dataset", f"no such file: {path}")
    try:
        if p.suffix.lower() == ".csv":
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        elif p.suffix.lower() in (".jsonl", ".json"):
            df = pd.read_json(p, lines=p.suffix.lower() == ".jsonl", dtype=False)
        else:
            _fail("dataset", f"expected a .jsonl, .json or .csv file, got {p.name}")
    except (ValueError, pd.errors.ParserError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError("dataset", f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if df.empty:
        _fail("dataset", f"{path} has no rows")
    for param, column in (("question_column", question_column), ("answer_column", answer_column)):
        if column not in df.columns:
            _fail(param, f"column {column!r} is not in {p.name} (columns: {', '.join(map(str, df.columns))})")
    for i, (q, a) in enumerate(zip(df[question_column], df[answer_column], strict=True), start=1):
        where = f"{p.name} row {i}"
        if not isinstance(q, str):
            _fail("dataset", f"{where}: {question_column} is not text (got {q!r})")
        if not q.strip():
            _fail("dataset", f"{where}: {question_column} is empty")
        if a is None or (isinstance(a, float) and a != a) or not str(a).strip():
            _fail("dataset", f"{where}: {answer_column} is missing")
        if not isinstance(a, str | int | float) or isinstance(a, bool):
            _fail("dataset", f"{where}: {answer_column} must be text (aliases as 'a | b'), got {a!r}")
        if aliases(str(a)) == [""]:
            _fail("dataset", f"{where}: {answer_column} {a!r} has no alias left after normalising")
    columns = {question_column: "question", answer_column: "expected"}
    if CATEGORY_COLUMN in df.columns and CATEGORY_COLUMN not in (question_column, answer_column):
        columns[CATEGORY_COLUMN] = "category"
    out = df[list(columns)].rename(columns=columns)
    out["expected"] = out["expected"].astype(str)
    return out


def check_model_uri(key: str, uri: str) -> None:
    """Resolve ``uri`` (reads only its MLmodel) and check it is the kind of model ``key`` expects."""
    import mlflow

    param = f"{key}_model_uri"
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as e:  # noqa: BLE001 - any failure to resolve is the user's URI
        raise InputError(param, f"cannot resolve {uri!r}: {str(e).splitlines()[0][:200]}") from None
    inputs = info.signature.inputs.input_names() if info.signature else []
    if INPUT_FIELD[key] not in inputs:
        _fail(
            param, f"{uri} takes {inputs or 'no declared inputs'}, not {INPUT_FIELD[key]!r}: is it the right wrapper?"
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


def _fresh(path: str | None) -> str | None:
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
    return path


class ChatCaller:
    """The llm/v1/chat model, called with an OpenAI-style chat request as a user would."""

    key = "chat"

    def __init__(self, uri: str, dst_path: str | None = None):
        import mlflow
        from transformers.utils import logging as hf_logging

        # Counting a too-long question's tokens is our context check, not a mistake to warn about;
        # the weight-loading bar is noise in a step's log.
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.model = mlflow.pyfunc.load_model(uri, dst_path=_fresh(dst_path))
        pipe = self.model.get_raw_model()
        self.tokenizer = pipe.tokenizer
        self.context_length = int(getattr(pipe.model.config, "max_position_embeddings", 0) or 0) or None

    def prompt_tokens(self, question: str) -> int:
        messages = chat_request(question, 1, 0.0)["messages"]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if isinstance(ids, dict) else ids)

    def __call__(self, question: str, max_new_tokens: int, temperature: float) -> Answer:
        request = chat_request(question, max_new_tokens, temperature)
        start = time.perf_counter()
        [out] = self.model.predict(request)
        ms = (time.perf_counter() - start) * 1000
        return Answer(out["choices"][0]["message"]["content"], ms, int(out["usage"]["completion_tokens"]))


class OnnxCaller:
    """The ONNX pyfunc, called with ``{"prompt": ...}`` and generation params as a user would."""

    key = "onnx"

    def __init__(self, uri: str, dst_path: str | None = None):
        import mlflow

        self.model = mlflow.pyfunc.load_model(uri, dst_path=_fresh(dst_path))
        # The pyfunc returns text only; its own tokenizer counts the generated tokens.
        self.chat = self.model.unwrap_python_model().chat
        self.context_length = self.chat.context_length

    def prompt_tokens(self, question: str) -> int:
        return self.chat.prompt_tokens(question)

    def __call__(self, question: str, max_new_tokens: int, temperature: float) -> Answer:
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "do_sample": temperature > 0}
        start = time.perf_counter()
        [text] = self.model.predict({"prompt": question}, params=params)
        ms = (time.perf_counter() - start) * 1000
        return Answer(text, ms, self.chat.completion_tokens(text, max_new_tokens))


def check_fits(callers: list, questions: list[str], dataset: str, max_new_tokens: int) -> None:
    """Every question leaves room for a whole answer (max_new_tokens) in every model's context,
    checked before any is asked: otherwise one model's answer is cut short and the other's not."""
    for caller in callers:
        if not caller.context_length:
            continue
        for i, q in enumerate(questions, start=1):
            n = caller.prompt_tokens(q)
            if n + max_new_tokens > caller.context_length:
                _fail(
                    "dataset",
                    f"{Path(dataset).name} row {i}: the question is {n} tokens with the chat template, which "
                    f"leaves less than max_new_tokens {max_new_tokens} of the {caller.key} model's context of "
                    f"{caller.context_length} tokens",
                )


def answer_all(caller, questions: list[str], max_new_tokens: int, temperature: float) -> list[Answer]:
    """Ask every question: a bar with questions done and tokens/s on a terminal, and a line with
    the totals when the model is done."""
    from phi3mlflow.progress import bar

    answers: list[Answer] = []
    tokens, seconds = 0, 0.0
    with bar(questions, desc=f"evaluate {caller.key}", unit="q") as progress:
        for q in progress:
            answers.append(caller(q, max_new_tokens, temperature))
            tokens, seconds = tokens + answers[-1].completion_tokens, seconds + answers[-1].latency_ms / 1000
            progress.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.0f}", refresh=False)
    rate = tokens / max(seconds, 1e-9)
    print(f"evaluate: {caller.key}: {len(answers)} questions in {seconds:.1f} s, {rate:.0f} tokens/s", file=sys.stderr)
    return answers


def choose_best(models: dict[str, Scores], metric: str) -> str:
    """The key of the best model on ``metric``; ties go to the lower p50 latency."""
    return rank(models, metric)[0]


REFERENCE = "chat"


def summary(models: dict[str, Scores], metric: str, agreement: float | None, categories: dict | None = None) -> Summary:
    """What register reads. The transformers pipeline is the reference: every other model records
    its accuracy difference to it (``accuracy_delta``, negative when it loses accuracy)."""
    reference = REFERENCE if REFERENCE in models else None
    if reference:
        for key, m in models.items():
            if key != reference:
                m.accuracy_delta = m.accuracy - models[reference].accuracy
    return Summary(metric, choose_best(models, metric), reference, agreement, models, categories or {})


def plot(models: dict[str, Scores]):
    """Accuracy and latency side by side, as a matplotlib figure for mlflow.log_figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(models)
    colors = ["#4C72B0", "#DD8452"][: len(keys)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.5))
    ax1.bar(keys, [models[k].accuracy for k in keys], color=colors)
    ax1.set_ylim(0, 1.05)
    ax1.set_title("accuracy (higher is better)")
    p50 = [models[k].latency_p50_ms for k in keys]
    p95 = [models[k].latency_p95_ms for k in keys]
    ax2.bar(keys, p50, color=colors, label="p50")
    ax2.scatter(keys, p95, color="black", marker="_", s=400, label="p95", zorder=3)
    ax2.set_title("latency per question, ms (lower is better)")
    ax2.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig
