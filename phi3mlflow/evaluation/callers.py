"""The callers: each candidate called as a user would, through its own MLflow interface, each
request leaving an MLflow trace linked to the candidate's LoggedModel."""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from phi3mlflow.errors import InputError
from phi3mlflow.evaluation.candidates import ModelRef


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
        import mlflow  # heavy: loaded with the model

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
        import mlflow  # heavy: loaded with the model
        from mlflow.entities import SpanType  # heavy: as above

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
        from transformers.utils import logging as hf_logging  # heavy: loaded with the model

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
        import mlflow  # heavy: loaded with the model
        from mlflow.entities import SpanType  # heavy: as above

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
                raise InputError(
                    "dataset",
                    f"{Path(dataset).name} row {i}: the question is {n} tokens with the chat template, which "
                    f"leaves less than max_new_tokens {max_new_tokens} of the {caller.key} model's context of "
                    f"{caller.context_length} tokens",
                )
