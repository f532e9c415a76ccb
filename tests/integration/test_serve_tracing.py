"""python -m phi3mlflow.serve --trace: one MLflow trace per chat completion, linked to the served
model; without the switch, none."""

from __future__ import annotations

import os
import time

import mlflow
import pytest

from tests.support import openai_server

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of Spain?"}]


def _serve_and_ask(model_uri: str, experiment_id: str, log_path, *flags: str) -> list:
    """Start the server, send one plain and one streamed completion, stop it; the usages it reported."""
    import openai

    env = {**os.environ, "MLFLOW_EXPERIMENT_ID": experiment_id}
    with openai_server(model_uri, log_path, *flags, env=env) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        plain = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=16)
        stream = client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
        streamed = [c.usage for c in stream if c.usage is not None]
        # Traces are exported on a background thread, seconds later on a busy machine.
        deadline = time.time() + (60 if "--trace" in flags else 5)
        while len(_traces(experiment_id)) < 2 and time.time() < deadline:
            time.sleep(0.5)
    return [plain.usage, *streamed]


def _traces(experiment_id: str) -> list:
    return mlflow.search_traces(locations=[experiment_id], return_type="list", max_results=50)


def test_trace_switch_leaves_one_linked_trace_per_completion_with_token_counts(int4_run, tracking_uri, tmp_path):
    model_uri = int4_run.run.data.tags["model_uri"]
    off = mlflow.create_experiment("serve-untraced")
    _serve_and_ask(model_uri, off, tmp_path / "off.log")
    assert _traces(off) == []  # off by default

    on = mlflow.create_experiment("serve-traced")
    usages = _serve_and_ask(model_uri, on, tmp_path / "on.log", "--trace")
    traces = _traces(on)
    assert len(traces) == 2 == len(usages)
    for trace in traces:
        assert trace.info.trace_metadata["mlflow.modelId"] == model_uri.split("/")[1]
        spans = {s.name: s for s in trace.data.spans}
        assert set(spans) == {"chat.completions", "generate"}
        assert spans["chat.completions"].inputs["messages"] == QUESTION
        assert "Madrid" in spans["chat.completions"].outputs["content"]
        gen = spans["generate"].attributes
        assert gen["finish_reason"] == "stop" and gen["ttft_ms"] > 0
        assert (gen["prompt_tokens"], gen["completion_tokens"]) in {
            (u.prompt_tokens, u.completion_tokens) for u in usages
        }


def test_trace_with_an_unreachable_tracking_server_serves_untraced_and_says_so(int4_run, tracking_uri, tmp_path):
    import openai

    from tests.support import free_port

    local = mlflow.artifacts.download_artifacts(int4_run.run.data.tags["model_uri"], dst_path=str(tmp_path / "m"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    with openai_server(local, tmp_path / "serve.log", "--trace", env=env) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=16)
        assert out.choices[0].message.content
    said = [line for line in (tmp_path / "serve.log").read_text().splitlines() if "tracing off" in line]
    assert len(said) == 1 and "does not answer" in said[0], (tmp_path / "serve.log").read_text()[-2000:]
