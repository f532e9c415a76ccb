"""The server's HTTP app in-process (Starlette's TestClient) over a scripted backend: SSE framing to
``[DONE]``, 400s carrying ``param``, 503 with Retry-After, a failed generation, and the
non-streaming path's disconnect polling. No model, no process."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.testclient import TestClient

from phi3mlflow.batching import Delta, Done, Failed, GenerationRequest
from phi3mlflow.errors import Overloaded
from phi3mlflow.serve import app as app_module
from phi3mlflow.serve import protocol
from phi3mlflow.serve.backends import Prepared
from tests.support import sse_events

USER = [{"role": "user", "content": "What is the capital of Spain?"}]


class ScriptedBackend:
    """Answers every request with ``script`` (a list of events, or an exception to raise first)."""

    wrapper = "scripted"

    def __init__(self, script):
        self.script = script
        self.closed = 0

    def prepare(self, body) -> Prepared:
        request = protocol.parse(body, 256)
        return Prepared(request, GenerationRequest([1, 2, 3], request.max_tokens or 16))

    async def events(self, prepared: Prepared, choice: int = 0):
        try:
            if isinstance(self.script, Exception):
                raise self.script
            for event in self.script:
                yield event
        finally:
            self.closed += 1


def client(script) -> tuple[TestClient, ScriptedBackend]:
    backend = ScriptedBackend(script)
    return TestClient(app_module.create_app(backend, "served-model")), backend


def test_a_whole_answer_is_a_chat_completion():
    c, backend = client([Delta("Ma"), Delta("drid"), Done("stop", 12, 3)])
    r = c.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 200
    out = ChatCompletion.model_validate_json(r.content)
    assert out.choices[0].message.content == "Madrid" and out.choices[0].finish_reason == "stop"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (12, 3, 15)
    assert out.model == "served-model" and backend.closed == 1


def test_a_stream_is_sse_chunks_ending_with_done():
    c, _ = client([Delta("Ma"), Delta(""), Delta("drid"), Done("length", 12, 2)])
    r = c.post("/v1/chat/completions", json={"messages": USER, "stream": True, "model": "mine"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    raw = r.text
    assert raw.endswith("data: [DONE]\n\n") and all(block.startswith("data: ") for block in raw.strip().split("\n\n"))
    events = sse_events(raw.splitlines())
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(json.dumps(e)) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Madrid"  # the empty Delta sends nothing
    assert len(chunks) == 4 and chunks[-1].choices[0].finish_reason == "length"
    assert {ch.model for ch in chunks} == {"mine"} and len({ch.id for ch in chunks}) == 1
    assert all(ch.usage is None for ch in chunks)  # not asked for: OpenAI sends none


def test_a_stream_asked_for_usage_ends_with_a_usage_chunk_without_choices():
    c, _ = client([Delta("Madrid"), Done("stop", 12, 2)])
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(c.post("/v1/chat/completions", json=body).text.splitlines())
    chunks = [ChatCompletionChunk.model_validate_json(json.dumps(e)) for e in events[:-1]]
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 14 and events[-1] == "[DONE]"
    assert len({ch.id for ch in chunks}) == 1


@pytest.mark.parametrize(
    "body,param",
    [({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"), ({"messages": USER, "n": 5}, "n"),
     ({"messages": USER, "max_tokens": 0}, "max_tokens"), ({"messages": USER, "tools": []}, "tools"),
     ([1, 2], None)],
)  # fmt: skip
def test_a_bad_request_is_a_400_whose_param_is_the_field(body, param):
    c, backend = client([Done("stop", 1, 1)])
    r = c.post("/v1/chat/completions", json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert backend.closed == 0  # refused before any generation


def test_a_body_that_is_not_json_is_a_400():
    c, _ = client([Done("stop", 1, 1)])
    r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body: not JSON")


def test_a_full_loop_is_a_503_with_retry_after_streaming_or_not():
    c, _ = client(Overloaded("64 requests are in progress; try again shortly"))
    for stream in (False, True):
        r = c.post("/v1/chat/completions", json={"messages": USER, "stream": stream})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "overloaded"


def test_a_failed_generation_is_a_500_or_an_error_event():
    c, _ = client([Delta("Ma"), Failed("generation failed: boom")])
    r = c.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 500 and r.json()["error"]["message"] == "generation failed: boom"
    r = c.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    events = sse_events(r.text.splitlines())
    assert events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"


def test_models_lists_the_served_model():
    c, _ = client([])
    data = c.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["served-model"]


# --- the non-streaming path's disconnect polling (app._complete) -------------------------------


def _complete(http, first, events):
    """app._complete for a one-message request, the way the chat route calls it."""
    return app_module._complete(app_module._Watch(http, app_module.merge([events])), (0, first), "m")


class _StillThere:
    async def is_disconnected(self) -> bool:
        return False


class _GoneAfter:
    def __init__(self, polls: int):
        self.polls = polls

    async def is_disconnected(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def test_a_decode_step_slower_than_the_disconnect_poll_is_waited_for(monkeypatch):
    monkeypatch.setattr(app_module, "DISCONNECT_POLL_S", 0.05)
    closed = []

    async def slow_stream():
        try:
            yield Delta(" Madrid")
            await asyncio.sleep(0.3)  # six polls long: polling must not cancel the step
            yield Delta(".")
            yield Done("stop", 5, 2)
        finally:
            closed.append(True)

    async def complete():
        events = slow_stream()
        return await _complete(_StillThere(), await anext(events), events)

    response = asyncio.run(complete())
    body = json.loads(response.body)
    assert response.status_code == 200 and body["choices"][0]["message"]["content"] == " Madrid."
    assert body["usage"]["completion_tokens"] == 2 and closed == [True]


def test_a_client_that_leaves_while_tokens_flow_quickly_cancels_its_answer(monkeypatch):
    """Steps faster than the poll must not hide a disconnect until the answer is complete."""
    monkeypatch.setattr(app_module, "DISCONNECT_POLL_S", 0.05)
    closed, sent = [], []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.005)
                sent.append(1)
                yield Delta("x")
        finally:
            closed.append(True)

    async def complete():
        events = endless()
        return await asyncio.wait_for(_complete(_GoneAfter(2), await anext(events), events), 10)

    response = asyncio.run(complete())
    assert response.status_code == 499 and closed == [True]
    assert len(sent) < 200  # about 3 polls of 10 tokens each, not the 10 s the wait allows


def test_a_request_cancelled_during_a_step_still_cancels_its_generation():
    """A server shutting down cancels the request's task while a step is pending (uvicorn after
    its graceful timeout): the generation must still be closed, which cancels its ticket."""
    closed = []

    async def slow():
        try:
            while True:
                await asyncio.sleep(3600)
                yield Delta("x")
        finally:
            closed.append(True)

    async def cancel_mid_step():
        task = asyncio.create_task(_complete(_StillThere(), Delta("a"), slow()))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_mid_step())
    assert closed == [True]


# --- n choices -------------------------------------------------------------------------------------


class Choices(ScriptedBackend):
    """Choice i answers "answer i" in i + 1 tokens (Overloaded for the choice in ``refuse``)."""

    def __init__(self, refuse: int | None = None):
        super().__init__([])
        self.refuse = refuse

    async def events(self, prepared: Prepared, choice: int = 0):
        try:
            if choice == self.refuse:
                raise Overloaded("full")
            for k in range(choice + 1):
                await asyncio.sleep(0.001)
                yield Delta("answer" if k == 0 else f" {choice}")
            yield Done("stop", 10, choice + 1)
        finally:
            self.closed += 1


def test_n_choices_come_back_indexed_with_the_prompt_counted_once():
    backend = Choices()
    c = TestClient(app_module.create_app(backend, "m"))
    out = ChatCompletion.model_validate_json(c.post("/v1/chat/completions", json={"messages": USER, "n": 3}).content)
    assert [ch.index for ch in out.choices] == [0, 1, 2]
    assert [ch.message.content for ch in out.choices] == ["answer", "answer 1", "answer 2 2"]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (10, 1 + 2 + 3) and backend.closed == 3
    body = {"messages": USER, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(c.post("/v1/chat/completions", json=body).text.splitlines())
    chunks = [ChatCompletionChunk.model_validate_json(json.dumps(e)) for e in events[:-1]]
    texts = {i: "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
             for i in (0, 1)}  # fmt: skip
    assert texts == {0: "answer", 1: "answer 1"}
    finished = {ch.choices[0].index: ch.choices[0].finish_reason for ch in chunks
                if ch.choices and ch.choices[0].finish_reason}  # fmt: skip
    assert finished == {0: "stop", 1: "stop"} and chunks[-1].usage.completion_tokens == 3


def test_one_choice_refused_refuses_the_request_and_ends_the_others():
    backend = Choices(refuse=1)
    c = TestClient(app_module.create_app(backend, "m"))
    r = c.post("/v1/chat/completions", json={"messages": USER, "n": 3})
    assert r.status_code == 503 and backend.closed == 3


def test_logprobs_ride_with_their_text_whole_and_streamed():
    entry = {"token": "Ma", "logprob": -0.1, "bytes": [77, 97], "top_logprobs": [{"token": "Ma", "logprob": -0.1,
                                                                                   "bytes": [77, 97]}]}  # fmt: skip
    c, _ = client([Delta("Ma", [entry]), Delta("drid", [{**entry, "token": "drid", "bytes": list(b"drid")}]),
                   Done("stop", 3, 2)])  # fmt: skip
    out = ChatCompletion.model_validate_json(c.post("/v1/chat/completions", json={"messages": USER}).content)
    assert [e.token for e in out.choices[0].logprobs.content] == ["Ma", "drid"]
    events = sse_events(c.post("/v1/chat/completions", json={"messages": USER, "stream": True}).text.splitlines())
    chunks = [ChatCompletionChunk.model_validate_json(json.dumps(e)) for e in events[:-1]]
    streamed = [e.token for ch in chunks if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert streamed == ["Ma", "drid"]
    plain, _ = client([Delta("Madrid"), Done("stop", 3, 2)])
    assert plain.post("/v1/chat/completions", json={"messages": USER}).json()["choices"][0].get("logprobs") is None
