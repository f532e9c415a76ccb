"""The protocol: the one request and answer format of every model this project serves, OpenAI's
chat completions.

``parse`` checks a request (a JSON object) field by field and raises ``InvalidRequest`` carrying
the field (``param``), before any model work; ``completion`` and ``chunk`` build the
``chat.completion`` object and the ``chat.completion.chunk`` of a stream. Both wrappers (the
transformers llm/v1/chat model and the ONNX pyfunc) and the OpenAI-compatible server use them.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from phi3mlflow.errors import InvalidRequest

ROLES = ("system", "user", "assistant")
# Fields an OpenAI client may send that change nothing here: accepted so that stock clients work;
# every other unknown field is refused rather than silently ignored.
IGNORED = frozenset({"model", "user"})
# Fields taken only at the value that asks for nothing (a 400 naming the field otherwise): the
# penalties at 0.
ONLY_OFF = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0)}
MAX_TOP_LOGPROBS = 20  # OpenAI's own limit
MAX_STOP = 4  # OpenAI's own limit
MAX_N = 4  # choices per request: rows of one batch on the ONNX model
# The longest stop string: matching runs on the one generation thread, so a request's stop strings
# must cost it microseconds per token whatever their length (a 1 MB stop string once stalled every
# client for a minute).
MAX_STOP_CHARS = 256


def check_text(value: str, field: str) -> None:
    """Text a model can encode as it is: no NUL (the ONNX tokenizer cuts the text there) and no lone
    surrogate (no UTF-8 encoding exists for it)."""
    if "\x00" in value:
        raise InvalidRequest(field, "contains a NUL character")
    # In C, not character by character in Python: that took ~65 ms of the GIL for a 900 kB message,
    # and every other client's request waited behind it.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(field, "contains a lone surrogate (not valid Unicode text)") from None


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int | None = None  # None: the model's logged default
    temperature: float | None = None  # None: the model's logged default; 0 is greedy
    top_p: float | None = None  # None: the model's logged default (1.0)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    model: str | None = None  # echoed in the answer; the server answers for one model whatever it says
    seed: int | None = None  # sampling from this seed: the same seed, the same answer
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage and no choices
    guidance: tuple[str, str] | None = None  # response_format as ORT GenAI guidance: ("json_schema", schema)
    n: int = 1  # choices to generate
    logprobs: int | None = None  # None: no logprobs; k: each token's and the k most likely (top_logprobs)


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(name, f"must be a finite number, got {value!r}")
    return float(value)


def parse(body, context_length: int | None = None) -> ChatRequest:
    """A checked request; ``InvalidRequest`` naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequest(None, f"the request must be a JSON object, got {type(body).__name__}")
    taken = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "stream",
             "stream_options", "seed", "response_format", "logprobs", "top_logprobs"}  # fmt: skip
    unknown = sorted(set(body) - taken - IGNORED - set(ONLY_OFF))
    if unknown:
        raise InvalidRequest(unknown[0], "unsupported field")
    for name, off in ONLY_OFF.items():
        value = body.get(name)
        if value is not None and (isinstance(value, bool) != isinstance(off[0], bool) or value not in off):
            raise InvalidRequest(name, f"not supported by this server: only {json.dumps(off[0])} (or leave it out), "
                                       f"got {json.dumps(value)[:40]}")  # fmt: skip
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of {role, content} objects")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}]", "must be an object with role and content")
        if m.get("role") not in ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}].content", f"must be a string, got {type(m.get('content')).__name__}")
        check_text(m["content"], f"messages[{i}].content")
        checked.append({"role": m["role"], "content": m["content"]})
    if checked[-1]["role"] == "assistant":
        raise InvalidRequest("messages", "the last message must be from the user or the system")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidRequest("max_tokens", f"must be a positive integer, got {max_tokens!r}")
        if context_length and max_tokens >= context_length:
            raise InvalidRequest("max_tokens", f"{max_tokens} is beyond the model's context of {context_length} tokens")
    temperature = _number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise InvalidRequest("temperature", f"must be >= 0, got {temperature}")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p}")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop)
    ):
        raise InvalidRequest("stop", f"must be a non-empty string or a list of up to {MAX_STOP} of them")
    for s in stop or []:
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequest("stop", f"a stop string may be at most {MAX_STOP_CHARS} characters, got {len(s)}")
        check_text(s, "stop")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise InvalidRequest("n", f"must be an integer from 1 to {MAX_N}, got {json.dumps(n)[:40]}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream", f"must be true or false, got {stream!r}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model", f"must be a string, got {type(model).__name__}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequest("seed", f"must be an integer, got {json.dumps(seed)[:40]}")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidRequest("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise InvalidRequest("stream_options", 'must be an object with "include_usage" only')
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise InvalidRequest("stream_options.include_usage", f"must be true or false, got {include_usage!r}")
    guidance = response_format(body.get("response_format"))
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise InvalidRequest("logprobs", f"must be true or false, got {json.dumps(wanted)[:40]}")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidRequest("top_logprobs", f"must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
        if not wanted:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
    logprobs = (top or 0) if wanted else None
    return ChatRequest(checked, max_tokens, temperature, top_p, stop or [], stream, model, seed, include_usage,
                       guidance, n, logprobs)  # fmt: skip


def response_format(value) -> tuple[str, str] | None:
    """OpenAI's ``response_format`` as a constraint on generation: None for plain text,
    ("json_schema", <schema>) for ``json_object`` (any JSON object) and ``json_schema``."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_schema", json.dumps({"type": "object"}))
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format", 'json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return ("json_schema", json.dumps(schema))
    raise InvalidRequest("response_format", f'type must be "text", "json_object" or "json_schema", got {kind!r}')


def check_length(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    """The conversation and the answer must fit the model's context."""
    if prompt_tokens >= context_length:
        raise InvalidRequest("messages", f"are {prompt_tokens} tokens long; the model's context is {context_length}")
    if prompt_tokens + max_tokens > context_length:
        raise InvalidRequest(
            "max_tokens",
            f"{max_tokens} is beyond the model's context: {prompt_tokens} prompt tokens + {max_tokens} > "
            f"{context_length}",
        )


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(model: str, content: str | list[tuple[str, str]], finish_reason: str | None, prompt_tokens: int,
               completion_tokens: int, id: str | None = None, fingerprint: str | None = None,
               logprobs: list[list[dict]] | None = None, cached_tokens: int | None = None) -> dict:  # fmt: skip
    """A ``chat.completion``: ``content`` and ``finish_reason``, or a list of (content, finish
    reason), one per choice; ``fingerprint`` (the served model version, when the server knows it)
    is OpenAI's ``system_fingerprint``; ``cached_tokens``, where given, OpenAI's
    ``usage.prompt_tokens_details.cached_tokens`` (prompt tokens the prompt cache had)."""
    answers = content if isinstance(content, list) else [(content, finish_reason or "stop")]
    return {
        "id": id or new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        **({"system_fingerprint": fingerprint} if fingerprint else {}),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                **({"logprobs": {"content": logprobs[i]}} if logprobs is not None else {}),
            }
            for i, (text, reason) in enumerate(answers)
        ],  # fmt: skip
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    out: dict = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def usage_chunk(id: str, model: str, created: int, prompt_tokens: int, completion_tokens: int,
                fingerprint: str | None = None, cached_tokens: int | None = None) -> dict:  # fmt: skip
    """The stream's last chunk when ``stream_options.include_usage`` asks for it: no choices, the usage."""
    out = chunk(id, model, created, {}, fingerprint=fingerprint)
    out["choices"] = []
    out["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
    return out


def chunk(id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          usage: dict | None = None, fingerprint: str | None = None, index: int = 0,
          logprobs: list[dict] | None = None) -> dict:  # fmt: skip
    out = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        **({"system_fingerprint": fingerprint} if fingerprint else {}),
        "choices": [
            {
                "index": index,
                "delta": delta,
                "finish_reason": finish_reason,
                **({"logprobs": {"content": logprobs}} if logprobs is not None else {}),
            }
        ],  # fmt: skip
    }
    if usage is not None:
        out["usage"] = usage
    return out
