"""Text generation on onnxruntime-genai (0.18 API), shared by the ONNX pyfunc, the server and the
benchmarks.

The model and tokenizer are loaded once. A one-prompt request gets its own ``GeneratorParams`` and
``Generator``, so concurrent requests never share search state; chat requests and requests of
several prompts go through the model's one batching loop (phi3mlflow/batching.py), which decodes
the requests that are in flight together as ORT GenAI generator batches.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phi3mlflow.batching import BatchLoop, GenerationRequest, start_generator
from phi3mlflow.chat_text import ConversationText, check_fits, longest_token
from phi3mlflow.errors import InvalidRequest
from phi3mlflow.serve.protocol import check_text

SENTINEL = "\x00PROMPT\x00"
# Caps on one request's work, so that no request holds a server for longer than its timeout
# (`mlflow models serve` gives up after 60 s): 4096 tokens are ~19 s of SmolLM2-135M int4 on two
# cores. Logged in the model's model_config (onnx_wrapper's flags of the same names).
MAX_PROMPTS_PER_REQUEST = 32
MAX_TOTAL_NEW_TOKENS = 4096
# Requests (or prompts of one request) decoded as one ORT GenAI generator batch (phi3mlflow/batching.py).
# Measured on SmolLM2-135M int4, 2 threads (bench/README.md, batched evaluation): a step of 16 rows
# costs ~5x a step of one, of 32 rows ~9x, and a batch runs until its longest answer, so 32 gains
# a few per cent over 16 for twice the KV cache (gigabytes on Phi-3-mini).
MAX_BATCH_SIZE = 16
# The most KV cache one batch may hold (rows x their shared length x bytes per token): 2 GiB is
# 16 evaluation questions of Phi-3-mini (fp32 KV, 768 KiB a token) or ~2700 tokens of chat, and
# no limit that SmolLM2 (45 KiB a token) reaches at 16 rows.
MAX_BATCH_KV_BYTES = 2 * 2**30


@dataclass(frozen=True)
class SearchOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    do_sample: bool = False

    @classmethod
    def from_params(cls, params: dict | None, defaults: SearchOptions) -> SearchOptions:
        params = params or {}
        opts = cls(
            max_new_tokens=_as_int(params.get("max_new_tokens", defaults.max_new_tokens), "max_new_tokens"),
            temperature=_as_float(params.get("temperature", defaults.temperature), "temperature"),
            top_p=_as_float(params.get("top_p", defaults.top_p), "top_p"),
            do_sample=_as_bool(params.get("do_sample", defaults.do_sample), "do_sample"),
        )
        if opts.max_new_tokens <= 0:
            raise InvalidRequest("max_new_tokens", f"must be > 0, got {opts.max_new_tokens}")
        if not 0 <= opts.temperature < float("inf"):
            raise InvalidRequest("temperature", f"must be >= 0, got {opts.temperature}")
        if not 0 < opts.top_p <= 1:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {opts.top_p}")
        return opts


def _as_int(v, name):
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise InvalidRequest(name, f"must be an integer, got {v!r}")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise InvalidRequest(name, f"must be an integer, got {v!r}") from None


def _as_float(v, name):
    if isinstance(v, bool):
        raise InvalidRequest(name, f"must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise InvalidRequest(name, f"must be a number, got {v!r}") from None


def _as_bool(v, name):
    # numpy's bool (what a DataFrame or JSON-decoded params may hold) is no subclass of bool.
    if isinstance(v, bool) or type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_"):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise InvalidRequest(name, f"must be true or false, got {v!r}")


def special_tokens(folder: Path) -> list[str]:
    """The text of every special token the folder's tokenizer.json declares."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return []
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
    return [
        t["content"] for t in added if isinstance(t, dict) and t.get("special") and isinstance(t.get("content"), str)
    ]


def vocabulary(folder: Path) -> list[str]:
    """The token strings of the folder's tokenizer.json (its model's vocabulary and added tokens)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = (data.get("model") or {}).get("vocab") or {}
    tokens = list(vocab) if isinstance(vocab, dict) else [v[0] for v in vocab if isinstance(v, list) and v]
    return [t for t in tokens if isinstance(t, str)] + special_tokens(folder)


def default_threads() -> int:
    """All cores this process may use; ORT GenAI would otherwise run on one intra-op thread."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class GenAIChat:
    """An ORT GenAI model folder behind a prompt-in, text-out interface."""

    def __init__(self, folder: str | Path, intra_op_num_threads: int = 0, max_batch_size: int = MAX_BATCH_SIZE):
        import onnxruntime_genai as og  # heavy: loaded with a model, never on the fast path

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
        # What batches are right-padded with: the pad id ORT GenAI's config names (Tokenizer.encode_batch pads so).
        self.pad_token_id = int(genai_config["model"].get("pad_token_id", 0))
        decoder = genai_config["model"]["decoder"]
        # Keys and values of every layer, fp32 (the builder's CPU exports keep the KV cache in float).
        self.kv_bytes_per_token = (
            2
            * 4
            * int(decoder["num_hidden_layers"])
            * int(decoder.get("num_key_value_heads", decoder.get("num_attention_heads", 1)))
            * int(decoder.get("head_size", 0))
        )
        # The text the template puts before a user turn (e.g. "<|user|>"): a prompt that already
        # contains it was formatted by the caller and is passed through untouched.
        probe = self.tokenizer.apply_chat_template(
            json.dumps([{"role": "user", "content": SENTINEL}]), add_generation_prompt=True
        )
        self.user_marker = probe.split(SENTINEL, 1)[0].strip()
        self.conversation = ConversationText(self._render, lambda text: list(self.tokenizer.encode(text)),
                                             special_tokens(self.folder))  # fmt: skip
        self.longest_token = longest_token(vocabulary(self.folder))
        self._batcher: BatchLoop | None = None
        self._batcher_lock = threading.Lock()

    @property
    def batcher(self) -> BatchLoop:
        """The model's one batching loop (phi3mlflow/batching.py), started on first use."""
        with self._batcher_lock:
            if self._batcher is None:
                self._batcher = BatchLoop(self.og, self.model, self.tokenizer, self.eos, self.pad_token_id,
                                          self.context_length, self.max_batch_size, self.kv_bytes_per_token,
                                          MAX_BATCH_KV_BYTES)  # fmt: skip
            return self._batcher

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation (checked by phi3mlflow.serve.protocol) as ids, through the model's chat
        template; what the messages say is encoded as text, never as special tokens (phi3mlflow/chat_text.py)."""
        check_fits([m["content"] for m in messages], self.context_length, self.longest_token)
        return self.conversation.encode_conversation(messages)

    def _render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - ORT GenAI raises plain RuntimeErrors
            raise InvalidRequest("messages", f"the model's chat template refused them: {e}") from None

    def check_guidance(self, guidance: tuple[str, str]) -> None:
        """A constraint ORT GenAI can compile (it compiles one when a generator starts: ~ms), or
        InvalidRequest naming response_format."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=2, batch_size=1)
        try:
            params.set_guidance(*guidance)
            self.og.Generator(self.model, params)
        except Exception as e:  # noqa: BLE001 - ORT GenAI raises plain RuntimeErrors
            said = " ".join(str(e).split())[:300]
            raise InvalidRequest("response_format", f"this model cannot follow it: {said}") from None

    def format_prompt(self, prompt: str) -> str:
        if self.user_marker and self.user_marker in prompt:
            return prompt
        return self.tokenizer.apply_chat_template(
            json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True
        )

    def encode(self, prompt) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt", f"must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InvalidRequest("prompt", "must not be empty")
        check_text(prompt, "prompt")
        check_fits([prompt], self.context_length, self.longest_token, "prompt")
        ids = self.tokenizer.encode(self.format_prompt(prompt))
        if len(ids) >= self.context_length:
            raise InvalidRequest(
                "prompt", f"is {len(ids)} tokens long; the model's context is {self.context_length} tokens"
            )
        return ids

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` as the model sees it, chat template included."""
        return len(self.tokenizer.encode(self.format_prompt(prompt)))

    def completion_tokens(self, text: str, max_new_tokens: int) -> int:
        """Tokens generated for the answer ``text``: like the transformers chat model's usage, the
        end token it stopped on counts, unless it ran out of tokens first."""
        return min(len(self.tokenizer.encode(text)) + 1, max_new_tokens)

    def _generator(self, ids, opts: SearchOptions):
        temperature = opts.temperature if opts.do_sample else 0.0
        max_length = min(self.context_length, len(ids) + opts.max_new_tokens)
        return start_generator(self.og, self.model, ids, max_length, temperature, opts.top_p)

    def generate_ids(self, ids, opts: SearchOptions) -> list[int]:
        generator = self._generator(ids, opts)
        while not generator.is_done():
            generator.generate_next_token()
        return list(generator.get_sequence(0)[len(ids) :])

    def generate_many(self, batch: list[list[int]], opts: SearchOptions) -> list[str]:
        """Answers to several prompts, decoded as batches of up to ``max_batch_size`` by the batching
        loop, in the order given (a caller that sends prompts of similar length together pads less);
        greedy answers equal the one-at-a-time ones. A single prompt goes through the plain loop."""
        if len(batch) == 1:
            return [self.tokenizer.decode(self.generate_ids(batch[0], opts))]
        sampled = opts.do_sample and opts.temperature > 0
        requests = [
            GenerationRequest([int(t) for t in ids], min(opts.max_new_tokens, self.context_length - len(ids)),
                              opts.temperature if sampled else 0.0, opts.top_p)
            for ids in batch
        ]  # fmt: skip
        return [text for text, _ in self.batcher.complete_all(requests)]

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
