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
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from phi3mlflow.batching import Delta, Done, Event, Failed
from phi3mlflow.errors import InvalidRequest, Overloaded
from phi3mlflow.serve import protocol
from phi3mlflow.serve.auth import RequireKey
from phi3mlflow.serve.backends import Backend, Prepared
from phi3mlflow.serve.limits import BodyLimit, QuietErrors, error_body, send_json
from phi3mlflow.serve.metrics import CountRequests, Metrics
from phi3mlflow.serve.options import Options
from phi3mlflow.serve.slot import Follower, ModelInfo, ModelSlot, Served

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


def create_app(served: ModelSlot | Backend, model_name: str = "", fallback=None, trace: Trace | None = None,
               options: Options | None = None, follower: Follower | None = None) -> FastAPI:  # fmt: skip
    """The OpenAI routes over the slot's current model (or one fixed ``backend``, ``fallback`` the
    ASGI app that answers every other path, MLflow's scoring app, its errors trimmed); ``trace(body,
    events)`` wraps each completion's events when tracing; ``follower`` runs while the app does."""
    if not isinstance(served, ModelSlot):
        served = ModelSlot(Served(ModelInfo(model_name, model_name), served, fallback))
    slot = served
    options = options or Options()
    metrics = Metrics() if options.metrics else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(follower.run()) if follower is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()

    app = FastAPI(lifespan=lifespan)
    created = int(time.time())

    if metrics is not None:
        metrics.serving(slot.current.info)
        metrics.observe_batches(slot.current.backend, slot.current.info.fingerprint)
        swap = slot.swap

        def swap_and_count(new: Served) -> Served:
            old = swap(new)
            metrics.serving(new.info, old.info)
            metrics.observe_batches(new.backend, new.info.fingerprint)
            return old

        slot.swap = swap_and_count  # type: ignore[method-assign]

    def events_of(
        served: Served, prepared: Prepared, body: dict | None = None, choice: int = 0
    ) -> AsyncIterator[Event]:
        events = served.backend.events(prepared, choice) if choice else served.backend.events(prepared)
        if trace is not None and body is not None:
            events = trace(body, events)
        if metrics is not None:
            events = metrics.observed(events, served.info.fingerprint)
        return events

    def choices_of(served: Served, prepared: Prepared, body: dict | None = None) -> AsyncIterator[Indexed]:
        n = prepared.request.n
        return merge([events_of(served, prepared, body, i) for i in range(n)])

    @app.get("/v1/models")
    async def models():
        info = slot.current.info
        entry = {"id": info.id, "object": "model", "created": created, "owned_by": "phi3mlflow"}
        return {"object": "list", "data": [{**entry, **{k: v for k, v in info.describe().items() if k != "id"}}]}

    @app.get("/health")
    async def health():
        return slot.health()

    if metrics is not None:

        @app.get("/metrics")
        async def prometheus():
            data, content_type = metrics.exposition()
            return Response(data, media_type=content_type)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        served = slot.acquire()
        handed_on = False
        try:
            try:
                # Parsing and tokenizing off the event loop: a long conversation costs its own request only.
                body, prepared = await asyncio.to_thread(_prepare, served.backend, await http.body())
            except InvalidRequest as e:
                return error(400, str(e), param=e.param)
            watch = _Watch(http, choices_of(served, prepared, body))
            try:
                # The first event is awaited here, so an overloaded loop is a 503 rather than a broken stream.
                first = await watch.next()
            except Overloaded as e:
                await watch.close()
                if metrics is not None:
                    metrics.rejected.labels(served.info.fingerprint).inc()
                return error(503, str(e), "overloaded", headers={"Retry-After": "1"})
            if first is None:
                await watch.close()
                return JSONResponse({}, status_code=499)  # the client left before the first token
            name = prepared.request.model or served.info.id
            if prepared.request.stream:
                handed_on = True
                stream = _sse(first, watch, name, served.info.fingerprint, lambda: slot.release(served),
                              prepared.request.include_usage, prepared.request.n)  # fmt: skip
                return StreamingResponse(stream, media_type="text/event-stream")
            return await _complete(watch, first, name, served.info.fingerprint, prepared.request.n)
        finally:
            if not handed_on:
                slot.release(served)

    @app.post("/invocations")
    async def invocations(http: Request):
        served = slot.acquire()
        response = None
        try:
            response = await _invocations(http, served)
            return response
        finally:
            if isinstance(response, _Forward):
                response.done = lambda: slot.release(served)  # once MLflow's app has answered
            else:
                slot.release(served)

    async def _invocations(http: Request, served: Served):
        raw = await http.body()
        quiet = QuietErrors(served.fallback) if served.fallback is not None else None
        if not _is_json(http.headers.get("content-type", "")) or quiet is None:
            return _Forward(quiet, raw) if quiet is not None else error(404, "no such route")
        try:
            rows, unwrapped = await asyncio.to_thread(_chat_rows, raw)
            if rows is None:
                return _Forward(quiet, raw)  # a prompt request: MLflow's scoring app answers it
            prepared = await asyncio.to_thread(_prepare_rows, served.backend, rows)
        except InvalidRequest as e:
            return _mlflow_error(400, "INVALID_PARAMETER_VALUE", str(e))
        try:
            answers = await asyncio.gather(*(_answer(http, choices_of(served, p), p, served.info) for p in prepared))
        except Overloaded as e:
            if metrics is not None:
                metrics.rejected.labels(served.info.fingerprint).inc()
            return _mlflow_error(503, "TEMPORARILY_UNAVAILABLE", f"the model is busy: {e}", {"Retry-After": "1"})
        if any(a is None for a in answers):
            return JSONResponse({}, status_code=499)
        failed = [a for a in answers if isinstance(a, str)]
        if failed:
            return _mlflow_error(500, "INTERNAL_ERROR", failed[0])
        return JSONResponse(answers if unwrapped else {"predictions": answers})

    async def current_fallback(scope, receive, send):
        """MLflow's scoring app of the version current when the request came (/ping, /version, ...)."""
        served = slot.acquire()
        try:
            if served.fallback is None:
                await send_json(send, 404, error_body(404, "no such route", "invalid_request_error"))
            else:
                await QuietErrors(served.fallback)(scope, receive, send)
        finally:
            slot.release(served)

    # Not a mount at "/": that would match every path first and turn the OpenAI routes'
    # trailing-slash redirects and 405s into 404s.
    app.router.default = current_fallback
    app.state.slot = slot
    app.state.follower = follower
    app.state.metrics = metrics
    # Added innermost first: the count sees every answer (401s and 413s too), CORS answers
    # preflights before the key is asked for, the key is checked before the body is read.
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    if options.api_key:
        app.add_middleware(RequireKey, key=options.api_key)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    if metrics is not None:
        app.add_middleware(CountRequests, metrics=metrics)
    return app


def _prepare(backend, raw: bytes) -> tuple[dict, Prepared]:
    body = _parse(raw)
    return body, backend.prepare(body)


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


async def _answer(http: Request, events, prepared: Prepared, info: ModelInfo) -> dict | str | None:
    """One row's chat.completion, its failure's message, or None when the client left."""
    watch = _Watch(http, events)
    first = await watch.next()
    if first is None:
        await watch.close()
        return None
    response = await _complete(watch, first, prepared.request.model or info.id, info.fingerprint, prepared.request.n)
    if response.status_code == 200:
        return json.loads(bytes(response.body))
    return None if response.status_code == 499 else json.loads(bytes(response.body))["error"]["message"]


class _Forward(Response):
    """Hands a request whose body was read already to another ASGI app (MLflow's scoring app)."""

    def __init__(self, asgi, body: bytes):
        super().__init__()
        self.asgi = asgi
        self.raw = body
        self.done: Callable[[], None] | None = None

    async def __call__(self, scope, receive, send):
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": self.raw, "more_body": False}
            return await receive()

        try:
            await self.asgi(scope, replay, send)
        finally:
            if self.done is not None:
                self.done()


class _Watch:
    """The next event of a generation, while checking every DISCONNECT_POLL_S that the client still
    waits: None once it has gone (its generation is then cancelled). The pending step is waited on,
    never cancelled while the client is there: cancelling it would end the generator."""

    def __init__(self, http: Request, events):
        self.http = http
        self.events = events
        self.pending: asyncio.Future | None = None
        self.checked = time.monotonic()

    async def next(self):
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


async def _complete(watch: _Watch, first: Indexed, name: str, fingerprint: str | None = None, n: int = 1):
    """The whole answer of every choice as one chat.completion (usage: the prompt once, the
    completions summed), a 500 when one fails, a 499 when the client left."""
    parts: list[list[str]] = [[] for _ in range(n)]
    scores: list[list[dict]] = [[] for _ in range(n)]
    scored = False
    reasons: list[str | None] = [None] * n
    prompt_tokens = completion_tokens = cached_tokens = 0
    indexed: Indexed | None = first
    try:
        while True:
            if indexed is None:
                return JSONResponse({}, status_code=499)
            i, event = indexed
            if isinstance(event, Delta):
                parts[i].append(event.text)
                if event.logprobs is not None:
                    scored = True
                    scores[i].extend(event.logprobs)
            elif isinstance(event, Failed):
                return error(500, event.message, "server_error")
            elif isinstance(event, Done):
                reasons[i] = event.finish_reason
                prompt_tokens = event.prompt_tokens
                completion_tokens += event.completion_tokens
                cached_tokens = event.cached_tokens if i == 0 else cached_tokens  # the prompt's, counted once
                if all(r is not None for r in reasons):
                    answers = [("".join(p), r or "stop") for p, r in zip(parts, reasons, strict=True)]
                    return JSONResponse(protocol.completion(name, answers, None, prompt_tokens, completion_tokens,
                                                            fingerprint=fingerprint,
                                                            logprobs=scores if scored else None,
                                                            cached_tokens=cached_tokens))  # fmt: skip
            indexed = await watch.next()
    finally:
        await watch.close()


async def _sse(first: Indexed, watch: _Watch, name: str, fingerprint: str | None = None, done=None,
               include_usage: bool = False, n: int = 1):  # fmt: skip
    id, created = protocol.new_id(), int(time.time())

    def data(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def chunk(i: int, delta: dict, finish_reason: str | None = None, logprobs: list[dict] | None = None) -> str:
        return data(protocol.chunk(id, name, created, delta, finish_reason, None, fingerprint, i, logprobs))

    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        ended, prompt_tokens, completion_tokens, cached_tokens = 0, 0, 0, 0
        indexed = first
        while True:
            i, event = indexed
            if isinstance(event, Delta):
                if event.text or event.logprobs:
                    yield chunk(i, {"content": event.text}, None, event.logprobs)
            elif isinstance(event, Failed):
                yield data({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
                break
            elif isinstance(event, Done):
                yield chunk(i, {}, event.finish_reason)
                ended += 1
                prompt_tokens = event.prompt_tokens
                completion_tokens += event.completion_tokens
                cached_tokens = event.cached_tokens if i == 0 else cached_tokens  # the prompt's, counted once
                if ended == n:
                    if include_usage:  # as OpenAI sends it: a chunk of its own, no choices
                        yield data(protocol.usage_chunk(id, name, created, prompt_tokens, completion_tokens,
                                                        fingerprint, cached_tokens))  # fmt: skip
                    break
            indexed = await anext(watch.events)
        yield "data: [DONE]\n\n"
    finally:
        try:
            await watch.close()  # a disconnected client lands here: cancel its generation
        finally:
            if done is not None:
                done()


Indexed = tuple[int, Event]


async def merge(streams: list[AsyncIterator[Event]]) -> AsyncIterator[Indexed]:
    """The events of one request's choices as (choice, event), in the order they come; closing it
    (or an exception from one choice, Overloaded say) ends every choice's generation."""
    if len(streams) == 1:
        [only] = streams
        try:
            async for event in only:
                yield 0, event
        finally:
            await only.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
            await queue.put((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        ended = 0
        while ended < len(streams):
            i, item = await queue.get()
            if item is None:
                ended += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
