"""The champion's server as operators run it (issue #28), against a real ``mlflow server`` registry
and the session's logged models: it follows ``@champion`` while 8 streaming clients talk to it and a
``register`` run moves the alias (no request fails, later answers name the new version, the old one
is released; its memory going back is measured on SmolLM2 in tests/integration/test_real.py), keeps serving
when the alias moves to a version that will not load, needs its key, and its /metrics parse with
prometheus_client's own parser and count what was sent. The in-process cases are in
tests/unit/test_serving_operations.py."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.support import openai_server, sse_events

NAME = "ops-chat"
KEY = "ops-key-5d2c9e"
USER = [{"role": "user", "content": "What is the capital of Spain?"}]
ANSWER = "The capital of Spain is Madrid."


@pytest.fixture(scope="module")
def versions(tracking_uri, int4_run, chat_run, tmp_path_factory):
    """Version 1: the int4 ONNX model; 2: the transformers model; 3: a model whose artifacts are gone."""
    import mlflow

    client = mlflow.MlflowClient()
    v1 = mlflow.register_model(int4_run.run.data.tags["model_uri"], NAME).version
    v2 = mlflow.register_model(chat_run.run.data.tags["model_uri"], NAME).version
    client.set_registered_model_alias(NAME, "champion", v1)
    return client, str(v1), str(v2)


@pytest.fixture(scope="module")
def chat_evaluation(mlflow_run, chat_run, tmp_path_factory):
    """An evaluate run whose winner is the transformers model (version 2), for register to act on."""
    data = tmp_path_factory.mktemp("ops-data") / "spain.csv"
    data.write_text("question,answer\nWhat is the capital of Spain?,Madrid\n")
    params = {"chat_model_uri": chat_run.run.data.tags["model_uri"], "dataset": str(data), "fidelity": "false"}
    return mlflow_run("evaluate", params, experiment="ops").run_id


@pytest.fixture(scope="module")
def server(versions, tmp_path_factory):
    logs = tmp_path_factory.mktemp("ops")
    key_file = logs / "key"
    key_file.write_text(KEY + "\n")
    log = logs / "server.log"
    with openai_server(f"models:/{NAME}@champion", log, "--follow-interval", "1", "--api-key-file",
                       str(key_file)) as base:  # fmt: skip
        yield base, log


def stream(base: str, key: str = KEY) -> tuple[int, str, set[str]]:
    """One streamed answer: status, text, the system_fingerprints its chunks carried."""
    from openai.types.chat import ChatCompletionChunk

    req = urllib.request.Request(
        f"{base}/v1/chat/completions", json.dumps({"messages": USER, "max_tokens": 32, "stream": True}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as r:
        events = sse_events(r.read().decode().splitlines())
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [ChatCompletionChunk.model_validate_json(json.dumps(e)) for e in events[:-1]]
    return (
        r.status,
        "".join(c.choices[0].delta.content or "" for c in chunks),
        {c.system_fingerprint or "" for c in chunks},
    )


def health(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        return json.loads(r.read())


def wait_for(condition, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_eight_streaming_clients_see_no_failure_while_register_moves_the_alias(server, versions, chat_evaluation,
                                                                                mlflow_run):  # fmt: skip
    base, log = server
    client, v1, v2 = versions
    assert health(base)["version"] == v1
    stop = threading.Event()
    seen: list[list[tuple[int, str, str]]] = [[] for _ in range(8)]
    errors: list[BaseException] = []

    def talk(i: int) -> None:
        try:
            while not stop.is_set():
                status, text, fingerprints = stream(base)
                assert len(fingerprints) == 1
                seen[i].append((status, text, fingerprints.pop()))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    # The step an operator's chain runs: ``mlflow run -e register`` (forced: the evaluation did not
    # ask the current champion, so without force it would leave the alias where it is).
    moved = mlflow_run("register", {"eval_run_id": chat_evaluation, "registered_model_name": NAME, "force": "true"},
                       experiment="ops").run.data.tags  # fmt: skip
    assert (moved["alias_moved"], moved["registered_version"]) == ("true", v2)
    # The server swaps within its follow interval plus a load; every client then hears version 2.
    assert wait_for(lambda: all(s and s[-1][2] == f"{NAME}/{v2}" for s in seen) or bool(errors))
    stop.set()
    for t in threads:
        t.join(120)
    assert errors == []
    for answers in seen:
        assert all(status == 200 and text == ANSWER for status, text, _ in answers)
        order = [fp for _, _, fp in answers]
        # Version 1 first, then version 2, never back.
        assert order[0] == f"{NAME}/{v1}" and order[-1] == f"{NAME}/{v2}"
        assert order == sorted(order, key=lambda fp: fp == f"{NAME}/{v2}")
    assert health(base)["version"] == v2
    assert wait_for(lambda: f"serve: released {NAME}/{v1}" in log.read_text(), 60)


@pytest.mark.slow
def test_a_version_that_will_not_load_leaves_the_current_one_serving(server, versions, artifact_root, tmp_path):
    import mlflow

    base, log = server
    client, _, v2 = versions
    assert wait_for(lambda: health(base)["version"] == v2)
    # A model that loads nowhere: its artifacts removed after it was registered.
    code = tmp_path / "model.py"
    code.write_text("import mlflow\nfrom mlflow.pyfunc import PythonModel\n\n\nclass M(PythonModel):\n"
                    "    def predict(self, context, model_input, params=None):\n        return model_input\n\n\n"
                    "mlflow.models.set_model(M())\n")  # fmt: skip
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="broken", python_model=str(code))
    v3 = str(mlflow.register_model(info.model_uri, NAME).version)
    [folder] = [p for p in artifact_root.rglob(info.model_id) if p.is_dir()]
    for mlmodel in folder.rglob("MLmodel"):
        mlmodel.unlink()
    client.set_registered_model_alias(NAME, "champion", v3)
    assert wait_for(lambda: "swap_error" in health(base))
    state = health(base)
    assert state["version"] == v2 and f"version {v3} failed to load" in state["swap_error"]
    assert stream(base)[1:] == (ANSWER, {f"{NAME}/{v2}"})
    assert f"still serving {NAME}/{v2}" in log.read_text()
    client.set_registered_model_alias(NAME, "champion", v2)  # back, for the tests after


@pytest.mark.slow
def test_the_key_is_required_and_never_shown_and_metrics_count_what_was_sent(server):
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    base, log = server
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="m", messages=USER, max_tokens=4)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    bare = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps({"messages": USER}).encode(),
                                  {"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(bare, timeout=60)
    assert missing.value.code == 401 and missing.value.headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(missing.value.read())["error"]["type"] == "invalid_request_error"

    def metric_text() -> str:
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            return r.read().decode()

    def count(text: str, status: str) -> float:
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "phi3mlflow:http_requests_total" and s.labels["route"] == "/v1/chat/completions"
                   and s.labels["status"] == status)  # fmt: skip

    before = metric_text()
    good = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
    for _ in range(3):
        assert (
            good.chat.completions.create(model="m", messages=USER, max_tokens=32).choices[0].message.content == ANSWER
        )
    after = metric_text()
    assert count(after, "200") - count(before, "200") == 3
    assert count(after, "401") >= 2
    families = {f.name for f in text_string_to_metric_families(after)}
    assert {"phi3mlflow:time_to_first_token_seconds", "phi3mlflow:e2e_request_latency_seconds",
            "phi3mlflow:prompt_tokens", "phi3mlflow:generation_tokens", "phi3mlflow:num_requests_running",
            "phi3mlflow:num_requests_waiting", "phi3mlflow:model_info"} <= families  # fmt: skip
    assert KEY not in after and KEY not in log.read_text()


@pytest.mark.slow
def test_without_a_key_it_says_it_is_unauthenticated(int4_run, tmp_path):
    log = tmp_path / "open.log"
    with openai_server(int4_run.run.data.tags["model_uri"], log) as base:
        assert stream(base, key="anything")[1] == ANSWER
    assert "unauthenticated" in log.read_text()
