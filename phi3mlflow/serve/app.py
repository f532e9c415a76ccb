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
from fastapi.responses import JSONResponse, StreamingResponse

from phi3mlflow.batching import Delta, Done, Event, Failed
from phi3mlflow.errors import InvalidRequest, Overloaded
from phi3mlflow.serve import protocol
from phi3mlflow.serve.backends import Backend, Prepared

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.5


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          headers: dict | None = None) -> JSONResponse:  # fmt: skip
    """OpenAI's error object."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


Trace = Callable[[dict, AsyncIterator[Event]], AsyncIterator[Event]]


def create_app(backend: Backend, model_name: str, fallback=None, trace: Trace | None = None) -> FastAPI:
    """The OpenAI routes over ``backend``; ``fallback`` (an ASGI app, MLflow's scoring app) answers
    every other path; ``trace(body, events)`` wraps each completion's events when tracing."""
    app = FastAPI()
    created = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "phi3mlflow"}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        try:
            body = json.loads(await http.body())
        except ValueError as e:
            return error(400, f"body: not JSON ({e})")
        except RecursionError:
            return error(400, "body: nested too deeply")
        try:
            prepared = backend.prepare(body)
        except InvalidRequest as e:
            return error(400, str(e), param=e.param)
        events = backend.events(prepared)
        if trace is not None:
            events = trace(body, events)
        try:
            # The first event is awaited here, so an overloaded loop is a 503 rather than a broken stream.
            first = await anext(events)
        except Overloaded as e:
            return error(503, str(e), "overloaded", headers={"Retry-After": "1"})
        if prepared.request.stream:
            return StreamingResponse(_sse(first, events, prepared, model_name), media_type="text/event-stream")
        return await _complete(http, first, events, prepared, model_name)

    if fallback is not None:
        # Not a mount at "/": that would match every path first and turn the OpenAI routes'
        # trailing-slash redirects and 405s into 404s.
        app.router.default = fallback
    app.state.backend = backend
    return app


async def _complete(http: Request, first: Event, events, prepared: Prepared, model_name: str):
    parts: list[str] = []
    event: Event | None = first
    checked = time.monotonic()
    pending: asyncio.Future | None = None
    try:
        while True:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                return error(500, event.message, "server_error")
            elif isinstance(event, Done):
                name = prepared.request.model or model_name
                return JSONResponse(protocol.completion(name, "".join(parts), event.finish_reason,
                                                        event.prompt_tokens, event.completion_tokens))  # fmt: skip
            # See every DISCONNECT_POLL_S whether the client still waits for the answer: between
            # tokens that come quickly, and while a step takes longer. The pending step is waited on,
            # never cancelled: cancelling it would end the generator.
            pending = asyncio.ensure_future(anext(events))
            while not (await asyncio.wait({pending}, timeout=checked + DISCONNECT_POLL_S - time.monotonic()))[0]:
                checked = time.monotonic()
                if await http.is_disconnected():
                    pending.cancel()  # the generator sees the cancel where it waits, and stops generating
                    await asyncio.wait({pending})
                    return JSONResponse({}, status_code=499)
            event = pending.result()
    finally:
        # Cancelled itself (a server shutting down) while a step is pending: end that step first, or
        # closing the generator fails as "already running" and the generation goes on.
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait({pending})
        await events.aclose()  # cancels the generation if it is still running


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
