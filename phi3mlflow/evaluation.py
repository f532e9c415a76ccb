"""Evaluation of the two wrappers on a question set: loading and checking inputs, calling each
model through its own MLflow interface, and choosing the winner."""

from __future__ import annotations

import abc
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from phi3mlflow import PROJECT_ROOT
from phi3mlflow.errors import InputError
from phi3mlflow.metrics import aliases
from phi3mlflow.summary import Candidate

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


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate, as named on the command line and as its logging run tagged it."""

    key: str  # chat, or onnx_<precision>: the candidate's name in metrics, tables and summary.json
    wrapper: str  # chat or onnx
    precision: str
    uri: str
    model_id: str | None  # the LoggedModel's ID, when the URI resolves to one


def check_model_uri(param: str, wrapper: str, uri: str) -> ModelRef:
    """Resolve ``uri`` (reads only its MLmodel and its run's tags) and check it is a ``wrapper`` model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from phi3mlflow import tags

    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as e:  # noqa: BLE001 - any failure to resolve is the user's URI
        raise InputError(param, f"cannot resolve {uri!r}: {str(e).splitlines()[0][:200]}") from None
    inputs = info.signature.inputs.input_names() if info.signature else []
    if INPUT_FIELD[wrapper] not in inputs:
        takes = inputs or "no declared inputs"
        _fail(param, f"{uri} takes {takes}, not {INPUT_FIELD[wrapper]!r}: is it the right wrapper?")
    # Both wrappers take chat requests now: the flavor tells them apart.
    is_transformers = "transformers" in (info.flavors or {})
    if is_transformers != (wrapper == "chat"):
        kind = "a transformers pipeline" if is_transformers else "not a transformers pipeline"
        _fail(param, f"{uri} is {kind}: is it the right wrapper?")
    run_tags: dict = {}
    if info.run_id:
        try:
            run_tags = mlflow.MlflowClient().get_run(info.run_id).data.tags
        except MlflowException:
            pass  # a model whose run is gone still evaluates; it is named by position
    precision = "fp32" if wrapper == "chat" else run_tags.get(tags.PRECISION, "unknown")
    key = "chat" if wrapper == "chat" else f"onnx_{precision}"
    return ModelRef(key, wrapper, precision, uri, getattr(info, "model_id", None))


def check_candidates(chat_uri: str, onnx_uris: str) -> list[ModelRef]:
    """The models to evaluate: the transformers reference (if given) and every ONNX model, each
    resolved and named; ONNX models of the same precision are numbered (onnx_int4, onnx_int4_2)."""
    onnx = [u.strip() for u in onnx_uris.split(",") if u.strip()]
    if not chat_uri.strip() and not onnx:
        _fail("chat_model_uri", "give chat_model_uri, onnx_model_uris or both")
    dupes = sorted({u for u in onnx if onnx.count(u) > 1})
    if dupes:
        _fail("onnx_model_uris", f"{dupes[0]} is listed more than once")
    refs = [check_model_uri("chat_model_uri", "chat", chat_uri.strip())] if chat_uri.strip() else []
    for uri in onnx:
        ref = check_model_uri("onnx_model_uris", "onnx", uri)
        same = next((r for r in refs if ref.model_id and r.model_id == ref.model_id), None)
        if same is not None:
            _fail("onnx_model_uris", f"{uri} is the same logged model ({ref.model_id}) as {same.uri}")
        taken = {r.key for r in refs}
        key, n = ref.key, 2
        while key in taken:
            key, n = f"{ref.key}_{n}", n + 1
        refs.append(ModelRef(key, ref.wrapper, ref.precision, ref.uri, ref.model_id))
    return refs


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


@dataclass
class Answer:
    text: str
    latency_ms: float
    completion_tokens: int
    prompt_tokens: int | None = None
    ttft_ms: float | None = None  # time to the first streamed text; None where the wrapper cannot stream
    # Questions in the request that answered this one: latency_ms is that request's wall time, shared
    # by all of them, so the wall time of a batch is latency_ms / batch_size summed over its answers.
    batch_size: int = 1


class Caller(abc.ABC):
    """One candidate, called as a user would, each request leaving an MLflow trace (when a
    tracking store is active): a root span for the question, a ``chat_template`` span and a
    ``generate`` span with prompt and completion token counts and, where the wrapper streams, the
    time to the first token. The trace is linked to the candidate's LoggedModel."""

    def __init__(self, ref: ModelRef, dst_path: str | None = None):
        import mlflow

        self.ref, self.key = ref, ref.key
        self.model = mlflow.pyfunc.load_model(ref.uri, dst_path=_fresh(dst_path))
        self.context_length: int | None = None

    @abc.abstractmethod
    def prompt_tokens(self, question: str) -> int:
        """Tokens of the question as the model sees it, chat template applied."""

    @abc.abstractmethod
    def generate(self, question: str, max_new_tokens: int, temperature: float) -> tuple[str, int, float | None]:
        """(text, completion tokens, ms to the first token or None)."""

    def batch_size(self, max_new_tokens: int) -> int:
        """Questions sent in one request; 1 where the model answers one at a time."""
        return 1

    def ask(self, questions: list[str], max_new_tokens: int, temperature: float) -> list[Answer]:
        """One request for ``questions``; the base class asks them one by one."""
        return [self(q, max_new_tokens, temperature) for q in questions]

    def __call__(self, question: str, max_new_tokens: int, temperature: float) -> Answer:
        import mlflow
        from mlflow.entities import SpanType

        start = time.perf_counter()
        with mlflow.start_span(name=f"answer {self.key}", span_type=SpanType.CHAT_MODEL) as root:
            root.set_inputs({"question": question, "max_new_tokens": max_new_tokens, "temperature": temperature})
            root.set_attributes({"candidate": self.key, "model_uri": self.ref.uri})
            with mlflow.start_span(name="chat_template", span_type=SpanType.PARSER) as span:
                n_prompt = self.prompt_tokens(question)
                span.set_attributes({"prompt_tokens": n_prompt})
            with mlflow.start_span(name="generate", span_type=SpanType.LLM) as span:
                span.set_inputs({"question": question})
                text, n_completion, ttft_ms = self.generate(question, max_new_tokens, temperature)
                span.set_outputs({"text": text})
                span.set_attributes({"prompt_tokens": n_prompt, "completion_tokens": n_completion})
                if ttft_ms is not None:
                    span.set_attribute("ttft_ms", round(ttft_ms, 3))
            root.set_outputs({"answer": text})
        ms = (time.perf_counter() - start) * 1000
        return Answer(text, ms, n_completion, n_prompt, ttft_ms)


class ChatCaller(Caller):
    """The llm/v1/chat model, called with an OpenAI-style chat request. The flavor applies the
    chat template itself and cannot stream: the template span applies it apart to count the tokens."""

    def __init__(self, ref: ModelRef, dst_path: str | None = None):
        from transformers.utils import logging as hf_logging

        # Counting a too-long question's tokens is our context check, not a mistake to warn about;
        # the weight-loading bar is noise in a step's log.
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        super().__init__(ref, dst_path)
        pipe = self.model.get_raw_model()
        self.tokenizer = pipe.tokenizer
        self.context_length = int(getattr(pipe.model.config, "max_position_embeddings", 0) or 0) or None

    def prompt_tokens(self, question: str) -> int:
        messages = chat_request(question, 1, 0.0)["messages"]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding (a Mapping, not a dict): its len() is its number of keys.
        return len(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    def generate(self, question: str, max_new_tokens: int, temperature: float):
        [out] = self.model.predict(chat_request(question, max_new_tokens, temperature))
        return out["choices"][0]["message"]["content"], int(out["usage"]["completion_tokens"]), None


class OnnxCaller(Caller):
    """The ONNX pyfunc, called with ``{"prompt": ...}`` and generation params as a user would.

    Questions go in batches, ``{"prompt": [q1, ..., qn]}`` in one request, which the model decodes
    as ORT GenAI generator batches: n is as many as one request may hold (the model's
    ``max_prompts_per_request``, and ``max_total_new_tokens`` / max_new_tokens). Each batch leaves
    one trace, its spans counting the tokens of the whole request (and per question); every answer's
    latency is the batch's wall time, and there is no time to first token, since a batch does not
    stream. A request of one question (``batch_size`` 1) is streamed, so its time to the first token
    is measured."""

    def __init__(self, ref: ModelRef, dst_path: str | None = None, batch_size: int | None = None):
        super().__init__(ref, dst_path)
        # The pyfunc returns text only; its own tokenizer counts the tokens.
        self.python_model = self.model.unwrap_python_model()
        self.chat = self.python_model.chat
        self.context_length = self.chat.context_length
        self._batch_size = batch_size

    def batch_size(self, max_new_tokens: int) -> int:
        if self._batch_size:
            return self._batch_size
        by_tokens = self.python_model.max_total_new_tokens // max(max_new_tokens, 1)
        return max(1, min(self.python_model.max_prompts, by_tokens))

    def ask(self, questions: list[str], max_new_tokens: int, temperature: float) -> list[Answer]:
        if len(questions) == 1:
            return [self(questions[0], max_new_tokens, temperature)]
        import mlflow
        from mlflow.entities import SpanType

        n = len(questions)
        start = time.perf_counter()
        with mlflow.start_span(name=f"answer {self.key}", span_type=SpanType.CHAT_MODEL) as root:
            root.set_inputs({"questions": questions, "max_new_tokens": max_new_tokens, "temperature": temperature})
            root.set_attributes({"candidate": self.key, "model_uri": self.ref.uri, "batch_size": n})
            with mlflow.start_span(name="chat_template", span_type=SpanType.PARSER) as span:
                n_prompt = [self.prompt_tokens(q) for q in questions]
                span.set_attributes({"prompt_tokens": sum(n_prompt), "prompt_tokens_per_question": n_prompt})
            with mlflow.start_span(name="generate", span_type=SpanType.LLM) as span:
                span.set_inputs({"questions": questions})
                texts = list(self.model.predict({"prompt": questions}, params=_params(max_new_tokens, temperature)))
                n_completion = [self.chat.completion_tokens(t, max_new_tokens) for t in texts]
                span.set_outputs({"texts": texts})
                span.set_attributes({"batch_size": n, "prompt_tokens": sum(n_prompt),
                                     "completion_tokens": sum(n_completion),
                                     "completion_tokens_per_question": n_completion})  # fmt: skip
            root.set_outputs({"answers": texts})
        ms = (time.perf_counter() - start) * 1000
        return [Answer(t, ms, c, p, None, n) for t, c, p in zip(texts, n_completion, n_prompt, strict=True)]

    def prompt_tokens(self, question: str) -> int:
        return self.chat.prompt_tokens(question)

    def generate(self, question: str, max_new_tokens: int, temperature: float):
        start, first, chunks = time.perf_counter(), None, []
        for chunk in self.model.predict_stream({"prompt": question}, params=_params(max_new_tokens, temperature)):
            if first is None:
                first = (time.perf_counter() - start) * 1000
            chunks.append(chunk)
        text = "".join(chunks)
        return text, self.chat.completion_tokens(text, max_new_tokens), first


def _params(max_new_tokens: int, temperature: float) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "do_sample": temperature > 0}


CALLERS: dict[str, type[ChatCaller] | type[OnnxCaller]] = {"chat": ChatCaller, "onnx": OnnxCaller}


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


def answer_all(
    caller, questions: list[str], max_new_tokens: int, temperature: float, batch_size: int | None = None
) -> list[Answer]:
    """Ask every question, in requests of ``batch_size`` questions (default: the caller's; the ONNX
    model takes batches, the chat model one at a time): a bar with questions done and tokens/s on
    a terminal, and a line with the totals when the model is done. tokens/s is the real throughput,
    generated tokens over the wall time of the requests."""
    from phi3mlflow.progress import bar

    size = batch_size or caller.batch_size(max_new_tokens)
    # Requests of several questions are asked shortest prompt first: a batch's prompts are padded to
    # its longest (phi3mlflow/engine.py), so neighbours by length pad least.
    order = list(range(len(questions)))
    if size > 1:
        order.sort(key=lambda i: caller.prompt_tokens(questions[i]))
    answers: list = [None] * len(questions)
    done: list[Answer] = []
    with bar(range(len(questions)), desc=f"evaluate {caller.key}", unit="q", total=len(questions)) as progress:
        for k in range(0, len(order), size):
            ids = order[k : k + size]
            batch = caller.ask([questions[i] for i in ids], max_new_tokens, temperature)
            for i, answer in zip(ids, batch, strict=True):
                answers[i] = answer
            done += batch
            progress.update(len(batch))
            progress.set_postfix(tok_s=f"{tokens_per_s(done):.0f}", refresh=False)
    seconds = wall_seconds(done)
    print(f"evaluate: {caller.key}: {len(done)} questions in {seconds:.1f} s ({size} per request), "
          f"{tokens_per_s(done):.0f} tokens/s", file=sys.stderr)  # fmt: skip
    return answers


def wall_seconds(answers: list[Answer]) -> float:
    """The wall time of the requests that gave ``answers`` (a batch counted once)."""
    return sum(a.latency_ms / a.batch_size for a in answers) / 1000


def tokens_per_s(answers: list[Answer]) -> float:
    """Generated tokens per second of wall time: the real throughput, batched or not."""
    return sum(a.completion_tokens for a in answers) / max(wall_seconds(answers), 1e-9)


REFERENCE = "chat"


def plot(candidates: list[Candidate]):
    """Accuracy and latency of every candidate side by side, as a matplotlib figure for mlflow.log_figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [c.key for c in candidates]
    palette = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]
    colors = [palette[i % len(palette)] for i in range(len(keys))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 1.5 * len(keys), 3.5))
    ax1.bar(keys, [c.accuracy for c in candidates], color=colors)
    ax1.set_ylim(0, 1.05)
    ax1.set_title("accuracy (higher is better)")
    p50 = [c.latency_p50_ms for c in candidates]
    p95 = [c.latency_p95_ms for c in candidates]
    ax2.bar(keys, p50, color=colors, label="p50")
    ax2.scatter(keys, p95, color="black", marker="_", s=400, label="p95", zorder=3)
    ax2.set_title("latency per question, ms (lower is better)")
    ax2.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig
