"""The OpenAI-compatible server where it is easy to get wrong: a decode step slower than the
disconnect poll, stop strings on the transformers model, error fields, a model that will not load."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from phi3mlflow.engine import Delta, Done

from phi3mlflow import serve
from tests.support import ROOT, openai_server


def _complete(http, first, events):
    """serve._complete for a one-message request, the way the chat route calls it."""
    request = serve.openai_chat.parse({"messages": [{"role": "user", "content": "Hi"}]}, None)
    return serve._complete(http, first, events, serve.Prepared(request, None), "m")


class _StillThere:
    async def is_disconnected(self) -> bool:
        return False


def test_a_decode_step_slower_than_the_disconnect_poll_is_waited_for(monkeypatch):
    monkeypatch.setattr(serve, "DISCONNECT_POLL_S", 0.05)
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


class _GoneAfter:
    def __init__(self, polls: int):
        self.polls = polls

    async def is_disconnected(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def test_a_client_that_leaves_while_tokens_flow_quickly_cancels_its_answer(monkeypatch):
    """Steps faster than the poll must not hide a disconnect until the answer is complete (the
    check once ran only while a step took longer than the poll)."""
    monkeypatch.setattr(serve, "DISCONNECT_POLL_S", 0.05)
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
                await asyncio.sleep(3600)  # a long step, or text held back for a stop string
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


@pytest.mark.parametrize(
    "message,param",
    [("messages[0].role: must be one of system, user, assistant", "messages"),
     ("max_tokens: must be > 0", "max_tokens"), ("the body must be a JSON object", None),
     ("[1, 2] is not an object", None)],
)  # fmt: skip
def test_the_error_names_the_field_a_check_named_and_no_other(message, param):
    assert json.loads(serve._error(400, message).body)["error"]["param"] == param


@pytest.mark.slow
def test_stop_strings_cut_the_transformers_models_answer(chat_run, tmp_path):
    import openai

    with openai_server(chat_run.run.data.tags["model_uri"], tmp_path / "chat.log") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of Spain?"}]
        out = client.chat.completions.create(model="m", messages=question, max_tokens=16, stop=["Madrid"])
        assert out.choices[0].message.content == "The capital of Spain is "
        assert out.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_a_model_that_will_not_load_fails_in_one_line(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    proc = subprocess.run([sys.executable, "-m", "phi3mlflow.serve", "models:/nope@champion"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model_uri: cannot load 'models:/nope@champion'")
    assert "Traceback" not in proc.stderr
