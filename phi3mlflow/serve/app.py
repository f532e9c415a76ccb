"""The server's HTTP app: ``POST /v1/chat/completions`` (with ``"stream": true``: server-sent events
in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``, and MLflow's own
scoring server for the same loaded model (``POST /invocations``, ``GET /health``, ``/ping``,
``/version``): ``mlflow.pyfunc.scoring_server.init`` builds that app and it answers every path the
OpenAI routes do not (the router's default), so ``/invocations`` answers exactly as ``mlflow
models serve`` does. The OpenAI routes stay outside its request-timeout middleware: a Starlette
``BaseHTTPMiddleware`` hides a client's disconnect from ``Request.is_disconnected`` (a
non-streaming answer would run to its end for nobody), and a long answer must not be cut at
MLflow's scoring timeout. MLflow 3.17's ``mlflow.genai.agent_server`` serves the Responses API of
agents, not chat completions, so it is not used.

Every request is checked (phi3mlflow.serve.protocol) before any generation: a bad one gets a 400
whose ``param`` is the field the check named. A client that disconnects cancels its generation;
more requests than the batching loop takes get a 503 with Retry-After; a failed generation a 500.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from phi3mlflow.batching import Delta, Done, Event, Failed
from phi3mlflow.errors import InvalidRequest, Overloaded
from phi3mlflow.serve import protocol
from phi3mlflow.serve.backends import Backend, Prepared
from phi3mlflow.serve.limits import MAX_BODY_BYTES, BodyLimit, QuietErrors

# How often a request waiting for its answer checks whether its client is still there.
DISCONNECT_POLL_S = 0.5
# Chat requests in one /invocations body (as the ONNX model's max_prompts_per_request default).
MAX_ROWS = 32


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          headers: dict | None = None) -> JSONResponse:  # fmt: skip
    """OpenAI's error object."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


Trace = Callable[[dict, AsyncIterator[Event]], AsyncIterator[Event]]


def _parse(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError as e:
        raise InvalidRequest("body", f"not JSON ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise InvalidRequest("body", "nested too deeply") from None


def create_app(backend: Backend, model_name: str, fallback=None, trace: Trace | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:  # fmt: skip
    """The OpenAI routes over ``backend``; ``fallback`` (an ASGI app, MLflow's scoring app) answers
    every other path, its errors trimmed (phi3mlflow.serve.limits.QuietErrors); ``trace(body,
    events)`` wraps each completion's events when tracing; a body over ``max_body_bytes`` is a 413."""
    app = FastAPI()
    created = int(time.time())
    quiet = QuietErrors(fallback) if fallback is not None else None

    def prepare(raw: bytes) -> tuple[dict, Prepared]:
        body = _parse(raw)
        return body, backend.prepare(body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "phi3mlflow"}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        try:
            # Parsing and tokenizing off the event loop: a long conversation costs its own request only.
            body, prepared = await asyncio.to_thread(prepare, await http.body())
        except InvalidRequest as e:
            return error(400, str(e), param=e.param)
        events = backend.events(prepared)
        if trace is not None:
            events = trace(body, events)
        watch = _Watch(http, events)
        try:
            # The first event is awaited here, so an overloaded loop is a 503 rather than a broken stream.
            first = await watch.next()
        except Overloaded as e:
            await watch.close()
            return error(503, str(e), "overloaded", headers={"Retry-After": "1"})
        if first is None:
            await watch.close()
            return JSONResponse({}, status_code=499)  # the client left before the first token
        if prepared.request.stream:
            return StreamingResponse(_sse(first, events, prepared, model_name), media_type="text/event-stream")
        return await _complete(watch, first, prepared, model_name)

    @app.post("/invocations")
    async def invocations(http: Request):
        raw = await http.body()
        if not _is_json(http.headers.get("content-type", "")) or quiet is None:
            return _Forward(quiet, raw) if quiet is not None else error(404, "no such route")
        try:
            rows, unwrapped = await asyncio.to_thread(_chat_rows, raw)
            if rows is None:
                return _Forward(quiet, raw)  # a prompt request: MLflow's scoring app answers it
            prepared = await asyncio.to_thread(_prepare_rows, backend, rows)
        except InvalidRequest as e:
            return _mlflow_error(400, "INVALID_PARAMETER_VALUE", str(e))
        try:
            answers = await asyncio.gather(*(_answer(http, backend.events(p), p, model_name) for p in prepared))
        except Overloaded as e:
            return _mlflow_error(503, "TEMPORARILY_UNAVAILABLE", f"the model is busy: {e}", {"Retry-After": "1"})
        if any(a is None for a in answers):
            return JSONResponse({}, status_code=499)
        failed = [a for a in answers if isinstance(a, str)]
        if failed:
            return _mlflow_error(500, "INTERNAL_ERROR", failed[0])
        return JSONResponse(answers if unwrapped else {"predictions": answers})

    if quiet is not None:
        # Not a mount at "/": that would match every path first and turn the OpenAI routes'
        # trailing-slash redirects and 405s into 404s.
        app.router.default = quiet
    app.state.backend = backend
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in ("application/json", "")


def _mlflow_error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """An error in the shape MLflow's scoring server answers /invocations with (no stack trace)."""
    return JSONResponse({"error_code": code, "message": message}, status_code=status, headers=headers)


def _chat_rows(raw: bytes) -> tuple[list | None, bool]:
    """The chat requests of an /invocations body, and whether MLflow would answer them unwrapped
    (its "unified LLM input", a body with ``messages`` at the top); (None, False) for a body that is
    not chat-shaped, which MLflow's scoring app answers."""
    body = _parse(raw)
    if isinstance(body, dict) and "messages" in body:
        return [body], True
    records = _records(body)
    if records and any(isinstance(r, dict) and "messages" in r for r in records):
        return records, False
    # A prompt request goes to MLflow's app, its prompts checked first as the chat fields are:
    # MLflow's schema check would turn a null or an object into text.
    cells = [body["prompt"]] if isinstance(body, dict) and "prompt" in body else []
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if isinstance(inputs, dict) and "prompt" in inputs:
        cells.append(inputs["prompt"])
    cells += [r["prompt"] for r in records or [] if isinstance(r, dict) and "prompt" in r]
    prompts = [p for cell in cells for p in (cell if isinstance(cell, list) else [cell])]
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InvalidRequest("prompt", f"prompt {i} must be a non-empty string, got {json.dumps(p)[:40]}")
    return None, False


def _records(body) -> list | None:
    """The rows of a body in one of MLflow's row formats (dataframe_split, dataframe_records,
    instances, inputs as a list), or None."""
    if not isinstance(body, dict) or len(body) != 1:
        return None
    [(key, value)] = body.items()
    if key == "dataframe_split" and isinstance(value, dict) and isinstance(value.get("columns"), list):
        columns, data = value["columns"], value.get("data")
        if not isinstance(data, list) or not all(isinstance(r, list) and len(r) == len(columns) for r in data):
            raise InvalidRequest("dataframe_split", "data must be a list of rows as long as columns")
        return [{c: v for c, v in zip(columns, r, strict=True) if v is not None} for r in data]
    if key in ("dataframe_records", "instances", "inputs") and isinstance(value, list):
        return value
    return None


def _prepare_rows(backend: Backend, rows: list) -> list[Prepared]:
    """Every row checked as /v1/chat/completions checks a request, before any is answered."""
    if len(rows) > MAX_ROWS:
        raise InvalidRequest(None, f"{len(rows)} chat requests in one body; at most {MAX_ROWS}")
    prepared = []
    for i, row in enumerate(rows):
        try:
            p = backend.prepare(row)
        except InvalidRequest as e:
            raise InvalidRequest(e.param, f"row {i}: {e}" if len(rows) > 1 else str(e)) from None
        if p.request.stream:
            raise InvalidRequest("stream", "/invocations answers whole; stream from /v1/chat/completions")
        prepared.append(p)
    return prepared


async def _answer(http: Request, events, prepared: Prepared, model_name: str) -> dict | str | None:
    """One row's chat.completion, its failure's message, or None when the client left."""
    watch = _Watch(http, events)
    try:
        parts: list[str] = []
        while True:
            event = await watch.next()
            if event is None:
                return None
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                return event.message
            elif isinstance(event, Done):
                return protocol.completion(prepared.request.model or model_name, "".join(parts), event.finish_reason,
                                           event.prompt_tokens, event.completion_tokens)  # fmt: skip
    finally:
        await watch.close()


class _Forward(Response):
    """Hands a request whose body was read already to another ASGI app (MLflow's scoring app)."""

    def __init__(self, asgi, body: bytes):
        super().__init__()
        self.asgi = asgi
        self.raw = body

    async def __call__(self, scope, receive, send):
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": self.raw, "more_body": False}
            return await receive()

        await self.asgi(scope, replay, send)


class _Watch:
    """The next event of a generation, while checking every DISCONNECT_POLL_S that the client still
    waits: None once it has gone (its generation is then cancelled). The pending step is waited on,
    never cancelled while the client is there: cancelling it would end the generator."""

    def __init__(self, http: Request, events):
        self.http = http
        self.events = events
        self.pending: asyncio.Future | None = None
        self.checked = time.monotonic()

    async def next(self) -> Event | None:
        self.pending = asyncio.ensure_future(anext(self.events))
        while not (await asyncio.wait({self.pending}, timeout=self.checked + DISCONNECT_POLL_S - time.monotonic()))[0]:
            self.checked = time.monotonic()
            if await self.http.is_disconnected():
                self.pending.cancel()  # the generator sees the cancel where it waits, and stops generating
                await asyncio.wait({self.pending})
                return None
        return self.pending.result()

    async def close(self) -> None:
        # Cancelled itself (a server shutting down) while a step is pending: end that step first, or
        # closing the generator fails as "already running" and the generation goes on.
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()
            await asyncio.wait({self.pending})
        await self.events.aclose()  # cancels the generation if it is still running


async def _complete(watch: _Watch, first: Event, prepared: Prepared, model_name: str):
    parts: list[str] = []
    event: Event | None = first
    try:
        while True:
            if event is None:
                return JSONResponse({}, status_code=499)
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                return error(500, event.message, "server_error")
            elif isinstance(event, Done):
                name = prepared.request.model or model_name
                return JSONResponse(protocol.completion(name, "".join(parts), event.finish_reason,
                                                        event.prompt_tokens, event.completion_tokens))  # fmt: skip
            event = await watch.next()
    finally:
        await watch.close()


async def _sse(first: Event, events, prepared: Prepared, model_name: str):
    id, created = protocol.new_id(), int(time.time())
    name = prepared.request.model or model_name

    def data(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        yield data(protocol.chunk(id, name, created, {"role": "assistant", "content": ""}))
        event = first
        while True:
            if isinstance(event, Delta):
                if event.text:
                    yield data(protocol.chunk(id, name, created, {"content": event.text}))
            elif isinstance(event, Failed):
                yield data({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
                break
            elif isinstance(event, Done):
                usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                         "total_tokens": event.prompt_tokens + event.completion_tokens}  # fmt: skip
                yield data(protocol.chunk(id, name, created, {}, event.finish_reason, usage))
                break
            event = await anext(events)
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a disconnected client lands here: cancel its generation
