"""An OpenAI-compatible server for any model this project logs: ``python -m phi3mlflow.serve <model URI>``.

Routes: ``POST /v1/chat/completions`` (with ``"stream": true``: server-sent events in OpenAI's chunk
format, ending with ``data: [DONE]``), ``GET /v1/models``, and MLflow's own scoring server for the
same loaded model (``POST /invocations``, ``GET /health``, ``/ping``, ``/version``):
``mlflow.pyfunc.scoring_server.init`` builds that app and it answers every path the OpenAI routes
do not (the router's default), so ``/invocations`` answers exactly as ``mlflow models serve`` does.
The OpenAI routes stay outside its request-timeout middleware: a Starlette ``BaseHTTPMiddleware``
hides a client's disconnect from ``Request.is_disconnected`` (a non-streaming answer would run to
its end for nobody), and a long answer must not be cut at MLflow's scoring timeout. MLflow 3.17's
``mlflow.genai.agent_server`` serves the Responses API of agents, not chat completions, so it is
not used.

Every request is checked (phi3mlflow.openai_chat) before any generation: a bad one gets a 400
whose message names the field. The ONNX model generates through its batching loop
(phi3mlflow/engine.py), so concurrent requests, streaming or not, are batched; a client that
disconnects cancels its generation; more requests than the loop takes get a 503 with Retry-After.
The transformers model answers one request at a time (its pipeline is not safe to call from
several threads) and streams its answer as one chunk (the llm/v1/chat flavor has no token stream).

``--trace`` (off by default: a trace costs every request a little, see ``tracing_cost`` in
bench/README.md) leaves an MLflow trace per chat completion in the active tracking store, linked
to the served logged model: a root span with the request and the answer, and a ``generate`` span
with prompt and completion tokens, the finish reason and the time to the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

# At module level: FastAPI reads the route's annotation (a string, with postponed evaluation) here.
from fastapi import Request

from phi3mlflow import openai_chat
from phi3mlflow.engine import Delta, Done, Event, Failed, Overloaded, Turn
from phi3mlflow.errors import InputError
from phi3mlflow.genai import InvalidRequest

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.5
# On SIGTERM, how long requests in progress may go on before they are cancelled: a stream may
# have thousands of tokens to go, and an orchestrator kills the process after its own grace period.
GRACEFUL_SHUTDOWN_S = 5


@dataclass(frozen=True)
class Prepared:
    request: openai_chat.ChatRequest
    turn: Turn


class OnnxBackend:
    """The ONNX pyfunc's batching loop: concurrent requests batched, each cancellable."""

    wrapper = "onnx"

    def __init__(self, python_model):
        self.model = python_model
        self.context_length = python_model.chat.context_length
        self.batcher = python_model.chat.batcher  # started now, not on the first request

    def prepare(self, body) -> Prepared:
        request = openai_chat.parse(body, self.context_length)
        return Prepared(request, self.model.chat_turn(request))

    async def events(self, prepared: Prepared) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        box: asyncio.Queue = asyncio.Queue()
        ticket = self.batcher.submit(prepared.turn, lambda e: loop.call_soon_threadsafe(box.put_nowait, e))
        finished = False
        try:
            while not finished:
                event = await box.get()
                finished = not isinstance(event, Delta)
                yield event
        finally:
            if not finished:  # the client went away: stop generating for it
                self.batcher.cancel(ticket)


class PipelineBackend:
    """The transformers llm/v1/chat model through its pyfunc, one request at a time."""

    wrapper = "chat"

    def __init__(self, pyfunc_model):
        self.model = pyfunc_model
        pipe = pyfunc_model.get_raw_model()
        self.tokenizer = pipe.tokenizer
        self.context_length = int(getattr(pipe.model.config, "max_position_embeddings", 0) or 0) or None
        self.default_max_tokens = int((pyfunc_model.model_config or {}).get("max_new_tokens", 64))
        self.lock = threading.Lock()

    def prepare(self, body) -> Prepared:
        request = openai_chat.parse(body, self.context_length)
        max_tokens = request.max_tokens or self.default_max_tokens
        try:
            ids = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template error is the request's
            raise InvalidRequest(f"messages: the model's chat template refused them: {e}") from None
        prompt_tokens = len(self.tokenizer(ids, add_special_tokens=False)["input_ids"])
        if self.context_length:
            openai_chat.check_length(prompt_tokens, max_tokens, self.context_length)
        return Prepared(request, Turn([], max_tokens, request.temperature or 0.0, request.top_p or 1.0, request.stop))

    def _predict(self, prepared: Prepared) -> dict:
        body: dict = {"messages": prepared.request.messages, "max_tokens": prepared.turn.max_tokens}
        for name in ("temperature", "top_p"):
            if getattr(prepared.request, name) is not None:
                body[name] = getattr(prepared.request, name)
        # No "stop" for the flavor: MLflow's llm/v1/chat pipeline would reload the tokenizer by the
        # model's name to honour it (a hub download); events() cuts the answer at the stop strings.
        with self.lock:
            [out] = self.model.predict(body)
        return out

    async def events(self, prepared: Prepared) -> AsyncIterator[Event]:
        out = await asyncio.to_thread(self._predict, prepared)
        choice = out["choices"][0]
        text, stopped = openai_chat.truncate_at_stop(choice["message"]["content"] or "", prepared.turn.stop)
        yield Delta(text)
        reason = "stop" if stopped else choice.get("finish_reason") or "stop"
        yield Done(reason, int(out["usage"]["prompt_tokens"]), int(out["usage"]["completion_tokens"]))


class RequestTrace:
    """One chat completion's MLflow trace (``--trace``). Spans are started and ended by hand: a
    streamed answer outlives the request handler that starts it."""

    def __init__(self, body: dict, wrapper: str):
        import mlflow
        from mlflow.entities import SpanType

        self.start = time.perf_counter()
        self.first: float | None = None
        self.parts: list[str] = []
        self.root = mlflow.start_span_no_context(
            "chat.completions", span_type=SpanType.CHAT_MODEL, inputs=body, attributes={"wrapper": wrapper}
        )
        self.generate = mlflow.start_span_no_context("generate", span_type=SpanType.LLM, parent_span=self.root)

    def see(self, event: Event) -> None:
        if isinstance(event, Delta) and event.text:
            if self.first is None:
                self.first = (time.perf_counter() - self.start) * 1000
            self.parts.append(event.text)

    def end(self, last: Event | None) -> None:
        from mlflow.entities import SpanStatusCode

        attributes: dict = {}
        if isinstance(last, Done):
            attributes = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                          "finish_reason": last.finish_reason}  # fmt: skip
        if self.first is not None:
            attributes["ttft_ms"] = round(self.first, 3)
        status = SpanStatusCode.OK if isinstance(last, Done) else SpanStatusCode.ERROR
        self.generate.set_attributes(attributes)
        self.generate.end(status=status)
        self.root.end(outputs={"content": "".join(self.parts)}, status=status)


async def _traced(events: AsyncGenerator[Event, None], trace: RequestTrace) -> AsyncIterator[Event]:
    last: Event | None = None
    try:
        async for last in events:
            trace.see(last)
            yield last
    finally:
        trace.end(last)  # a disconnect or an overloaded loop ends it as an error
        await events.aclose()  # closing this generator must still cancel the generation


def backend_for(pyfunc_model):
    if "transformers" in pyfunc_model.metadata.flavors:
        return PipelineBackend(pyfunc_model)
    python_model = pyfunc_model.unwrap_python_model()
    if hasattr(python_model, "chat_turn"):
        return OnnxBackend(python_model)
    raise InputError("model_uri", "not a model this project logs (neither the chat nor the ONNX wrapper)")


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    from fastapi.responses import JSONResponse

    # The checks' messages start with the field ("messages[0].role: ..."); others name none.
    named = re.match(r"^([A-Za-z_]\w*)[\w.\[\]]*:", message) if kind == "invalid_request_error" else None
    param = named.group(1) if named else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(pyfunc_model, model_name: str, trace: bool = False):
    """MLflow's scoring app for ``pyfunc_model`` with the OpenAI routes added; ``trace``: an MLflow
    trace per chat completion, linked to the model."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from mlflow.pyfunc import scoring_server

    backend = backend_for(pyfunc_model)
    app = FastAPI()
    if trace:
        import mlflow

        model_id = getattr(pyfunc_model.metadata, "model_id", None)
        if model_id:
            mlflow.set_active_model(model_id=model_id)
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
            return _error(400, f"body: not JSON ({e})")
        try:
            prepared = backend.prepare(body)
        except InvalidRequest as e:
            return _error(400, str(e))
        events = backend.events(prepared)
        if trace:
            events = _traced(events, RequestTrace(body, backend.wrapper))
        try:
            # The first event is awaited here, so an overloaded loop is a 503 rather than a broken stream.
            first = await anext(events)
        except Overloaded as e:
            return _error(503, str(e), "overloaded", {"Retry-After": "1"})
        if prepared.request.stream:
            return StreamingResponse(_sse(first, events, prepared, model_name), media_type="text/event-stream")
        return await _complete(http, first, events, prepared, model_name)

    # Not a mount at "/": that would match every path first and turn the OpenAI routes' trailing-slash
    # redirects and 405s into 404s.
    app.router.default = scoring_server.init(pyfunc_model)
    app.state.backend = backend
    return app


async def _complete(http, first: Event, events, prepared: Prepared, model_name: str):
    from fastapi.responses import JSONResponse

    parts: list[str] = []
    event: Event | None = first
    checked = time.monotonic()
    pending: asyncio.Future | None = None
    try:
        while True:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                return _error(500, event.message, "server_error")
            elif isinstance(event, Done):
                name = prepared.request.model or model_name
                return JSONResponse(openai_chat.completion(name, "".join(parts), event.finish_reason,
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
    id, created = openai_chat.new_id(), int(time.time())
    name = prepared.request.model or model_name

    def data(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        yield data(openai_chat.chunk(id, name, created, {"role": "assistant", "content": ""}))
        event = first
        while True:
            if isinstance(event, Delta):
                if event.text:
                    yield data(openai_chat.chunk(id, name, created, {"content": event.text}))
            elif isinstance(event, Failed):
                yield data({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
                break
            elif isinstance(event, Done):
                usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                         "total_tokens": event.prompt_tokens + event.completion_tokens}  # fmt: skip
                yield data(openai_chat.chunk(id, name, created, {}, event.finish_reason, usage))
                break
            event = await anext(events)
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a disconnected client lands here: cancel its generation


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m phi3mlflow.serve", description=__doc__.split("\n", 1)[0])
    p.add_argument("model_uri", help="models:/<name>@<alias>, models:/<name>/<version>, models:/m-..., runs:/...")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-name", default="", help="the id /v1/models reports (default: the model URI)")
    p.add_argument("--trace", action="store_true", help="an MLflow trace per chat completion (off by default)")
    return p.parse_args(argv)


def serve(model_uri: str, host: str, port: int, model_name: str = "", trace: bool = False) -> None:
    import mlflow
    import uvicorn

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # noqa: BLE001 - any failure to load is the URI's
        raise InputError("model_uri", f"cannot load {model_uri!r}: {str(e).strip().splitlines()[0][:300]}") from None
    app = build_app(model, model_name or model_uri, trace)
    print(f"serving {model_uri} ({app.state.backend.wrapper} wrapper) on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        serve(args.model_uri, args.host, args.port, args.model_name, args.trace)
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
