"""Text generation on onnxruntime-genai (0.18 API), shared by the ONNX pyfunc, the server and the
benchmarks.

The model and tokenizer are loaded once. A one-prompt request gets its own ``GeneratorParams`` and
``Generator``, so concurrent requests never share search state; chat requests and requests of
several prompts go through one ``og.Engine`` (phi3mlflow/engine.py), which batches the requests
that are in flight together. (ORT GenAI's own static batch, ``batch_size`` with left-padded
prompts, is not used: on SmolLM2 int4 it changed the greedy answers of 23 of 24 questions, while
prompts of equal length, unpadded, agreed; this export has no position_ids input, so the padding
most likely shifts the padded prompts' positions.)
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from phi3mlflow.engine import EngineLoop

SENTINEL = "\x00PROMPT\x00"
# Caps on one request's work, so that no request holds a server for longer than its timeout
# (`mlflow models serve` gives up after 60 s): 4096 tokens are ~19 s of SmolLM2-135M int4 on two
# cores. Logged in the model's model_config (onnx_wrapper's flags of the same names).
MAX_PROMPTS_PER_REQUEST = 32
MAX_TOTAL_NEW_TOKENS = 4096
# Prompts of one request decoded as one ORT GenAI generator batch (prompts of equal length only; see
# generate_many). Measured on SmolLM2-135M int4, 2 threads (bench/README.md, batched evaluation):
# a step of 16 rows costs ~5x a step of one, of 32 rows ~9x, and answers of different lengths
# leave rows idle, so beyond 16 nothing is gained.
MAX_BATCH_SIZE = 16


class InvalidRequest(ValueError):
    """A request the model cannot serve; the message names the offending field."""


@dataclass(frozen=True)
class SearchOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    do_sample: bool = False

    @classmethod
    def from_params(cls, params: dict | None, defaults: SearchOptions) -> SearchOptions:
        params = params or {}
        try:
            opts = cls(
                max_new_tokens=_as_int(params.get("max_new_tokens", defaults.max_new_tokens), "max_new_tokens"),
                temperature=_as_float(params.get("temperature", defaults.temperature), "temperature"),
                top_p=_as_float(params.get("top_p", defaults.top_p), "top_p"),
                do_sample=_as_bool(params.get("do_sample", defaults.do_sample), "do_sample"),
            )
        except (TypeError, ValueError) as e:
            raise InvalidRequest(str(e)) from None
        if opts.max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens must be > 0, got {opts.max_new_tokens}")
        if not 0 <= opts.temperature < float("inf"):
            raise InvalidRequest(f"temperature must be >= 0, got {opts.temperature}")
        if not 0 < opts.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {opts.top_p}")
        return opts


def _as_int(v, name):
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {v!r}") from None


def _as_float(v, name):
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None


def _as_bool(v, name):
    # numpy's bool (what a DataFrame or JSON-decoded params may hold) is no subclass of bool.
    if isinstance(v, bool) or type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_"):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ValueError(f"{name} must be true or false, got {v!r}")


def default_threads() -> int:
    """All cores this process may use; ORT GenAI would otherwise run on one intra-op thread."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class GenAIChat:
    """An ORT GenAI model folder behind a prompt-in, text-out interface."""

    def __init__(self, folder: str | Path, intra_op_num_threads: int = 0, max_batch_size: int = MAX_BATCH_SIZE):
        import onnxruntime_genai as og

        self.og = og
        self.folder = Path(folder)
        self.threads = int(intra_op_num_threads) or default_threads()
        self.max_batch_size = max(1, int(max_batch_size))
        config = og.Config(str(self.folder))
        overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}}
        config.overlay(json.dumps(overlay))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.eos = set(self.tokenizer.eos_token_ids)
        genai_config = json.loads((self.folder / "genai_config.json").read_text())
        self.context_length = int(genai_config["model"]["context_length"])
        # The text the template puts before a user turn (e.g. "<|user|>"): a prompt that already
        # contains it was formatted by the caller and is passed through untouched.
        probe = self.tokenizer.apply_chat_template(
            json.dumps([{"role": "user", "content": SENTINEL}]), add_generation_prompt=True
        )
        self.user_marker = probe.split(SENTINEL, 1)[0].strip()
        self._engine: EngineLoop | None = None
        self._engine_lock = threading.Lock()

    @property
    def engine(self) -> EngineLoop:
        """The model's one og.Engine worker, started on first use."""
        with self._engine_lock:
            if self._engine is None:
                from phi3mlflow.engine import EngineLoop

                self._engine = EngineLoop(self.og, self.model, self.tokenizer, self.eos)
            return self._engine

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation (checked by phi3mlflow.openai_chat) as ids, through the model's chat template."""
        try:
            text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - ORT GenAI raises plain RuntimeErrors
            raise InvalidRequest(f"messages: the model's chat template refused them: {e}") from None
        return list(self.tokenizer.encode(text))

    def format_prompt(self, prompt: str) -> str:
        if self.user_marker and self.user_marker in prompt:
            return prompt
        return self.tokenizer.apply_chat_template(
            json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True
        )

    def encode(self, prompt) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InvalidRequest("prompt must not be empty")
        ids = self.tokenizer.encode(self.format_prompt(prompt))
        if len(ids) >= self.context_length:
            raise InvalidRequest(
                f"prompt is {len(ids)} tokens long; the model's context is {self.context_length} tokens"
            )
        return ids

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` as the model sees it, chat template included."""
        return len(self.tokenizer.encode(self.format_prompt(prompt)))

    def completion_tokens(self, text: str, max_new_tokens: int) -> int:
        """Tokens generated for the answer ``text``: like the transformers chat model's usage, the
        end token it stopped on counts, unless it ran out of tokens first."""
        return min(len(self.tokenizer.encode(text)) + 1, max_new_tokens)

    def _generator(self, ids, opts: SearchOptions, rows: int = 1):
        og = self.og
        params = og.GeneratorParams(self.model)
        length = len(ids[0]) if rows > 1 else len(ids)
        search: dict[str, int | float | bool] = {"max_length": min(self.context_length, length + opts.max_new_tokens)}
        if opts.do_sample and opts.temperature > 0:
            search.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p)
        else:
            search.update(do_sample=False)
        if rows > 1:
            search["batch_size"] = rows
        params.set_search_options(**search)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32) if rows > 1 else ids)
        return generator

    def generate_ids(self, ids, opts: SearchOptions) -> list[int]:
        generator = self._generator(ids, opts)
        while not generator.is_done():
            generator.generate_next_token()
        return list(generator.get_sequence(0)[len(ids) :])

    def _answer(self, ids) -> str:
        """The text of generated ``ids``, up to the first end token (a batch row that finished early
        is filled with end tokens while the others go on)."""
        end = next((i for i, t in enumerate(ids) if t in self.eos), len(ids))
        return self.tokenizer.decode(np.asarray(ids[:end], dtype=np.int32))

    def generate_many(self, batch: list[list[int]], opts: SearchOptions) -> list[str]:
        """Answers to several prompts, decoded in batches whose greedy answers equal the one-at-a-time ones.

        Prompts of equal length go as one ORT GenAI generator batch (up to ``max_batch_size`` rows):
        nothing is padded, so each row computes exactly what it would alone. A padded batch is not
        used: this export has no position_ids input, and left padding changed 23 of 24 greedy answers
        (bench/README.md). The prompts left over (lengths no other prompt shares) go through og.Engine,
        which takes prompts of different lengths unpadded but batches at most 4 on CPU (its static
        scheduler's fixed batch size in onnxruntime-genai 0.18); a single one through the plain loop.
        A batch runs until its longest answer: the caller gets more rows busy by sending prompts of
        similar length together (evaluate sorts its questions by length)."""
        texts: list[str | None] = [None] * len(batch)
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(batch):
            by_length.setdefault(len(ids), []).append(i)
        rest = []
        for rows in by_length.values():
            if len(rows) == 1:
                rest += rows
                continue
            for k in range(0, len(rows), self.max_batch_size):
                chunk = rows[k : k + self.max_batch_size]
                if len(chunk) == 1:
                    rest += chunk
                    continue
                generator = self._generator([[int(t) for t in batch[i]] for i in chunk], opts, rows=len(chunk))
                while not generator.is_done():
                    generator.generate_next_token()
                for row, i in enumerate(chunk):
                    texts[i] = self._answer(list(generator.get_sequence(row)[len(batch[i]) :]))
        if len(rest) == 1:
            texts[rest[0]] = self._answer(self.generate_ids(batch[rest[0]], opts))
        elif rest:
            from phi3mlflow.engine import Turn

            sampled = opts.do_sample and opts.temperature > 0
            turns = [
                Turn([int(t) for t in batch[i]], min(opts.max_new_tokens, self.context_length - len(batch[i])),
                     opts.temperature if sampled else 0.0, opts.top_p)
                for i in rest
            ]  # fmt: skip
            for i, (text, _) in zip(rest, self.engine.answer_all(turns), strict=True):
                texts[i] = text
        return [t or "" for t in texts]

    def generate(self, prompt: str, opts: SearchOptions) -> str:
        return self.tokenizer.decode(self.generate_ids(self.encode(prompt), opts))

    def stream_ids(self, ids, opts: SearchOptions) -> Iterator[str]:
        generator = self._generator(ids, opts)
        decoder = self.tokenizer.create_stream()
        while not generator.is_done():
            generator.generate_next_token()
            token = generator.get_next_tokens()[0]
            if token in self.eos:
                continue
            chunk = decoder.decode(token)
            if chunk:
                yield chunk
