"""The server as operators run it (issue #28), in-process over scripted backends: the swap to
another version with requests in flight, the follower's decisions, what answered
(system_fingerprint, /v1/models, /health), the API key, /metrics and CORS. The same against a real
registry and model: tests/integration/test_serve_operations.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from phi3mlflow.batching import Delta, Done
from phi3mlflow.errors import InputError
from phi3mlflow.serve import app as app_module
from phi3mlflow.serve import auth
from phi3mlflow.serve.cli import parse_model_uri
from phi3mlflow.serve.options import Options
from phi3mlflow.serve.slot import Follower, ModelInfo, ModelSlot, Served
from tests.unit.test_http_app import USER, ScriptedBackend

V1 = ModelInfo("champion", "models:/chat@champion", "chat", "1", "champion", "m-one", "run-1")
V2 = ModelInfo("champion", "models:/chat@champion", "chat", "2", "champion", "m-two", "run-2")
ANSWER = [Delta("Madrid"), Done("stop", 5, 1)]


class Gated(ScriptedBackend):
    """Answers after ``gate`` is set, so a test can hold requests in flight."""

    def __init__(self, script, gate: threading.Event):
        super().__init__(script)
        self.gate = gate

    async def events(self, prepared):
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        async for event in super().events(prepared):
            yield event


def slot_of(*served: Served) -> tuple[ModelSlot, list[str], list[Served]]:
    lines: list[str] = []
    released: list[Served] = []
    return ModelSlot(served[0], on_release=released.append, log=lines.append), lines, released


def wait(condition, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


# --- what answered -------------------------------------------------------------------------------


def test_answers_models_and_health_say_which_version_answered():
    slot, _, _ = slot_of(Served(V1, ScriptedBackend(ANSWER)))
    c = TestClient(app_module.create_app(slot))
    out = c.post("/v1/chat/completions", json={"messages": USER}).json()
    assert out["system_fingerprint"] == "chat/1"
    stream = c.post("/v1/chat/completions", json={"messages": USER, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert {ch["system_fingerprint"] for ch in chunks} == {"chat/1"}
    [model] = c.get("/v1/models").json()["data"]
    assert model["id"] == "champion" and model["object"] == "model"
    assert (model["name"], model["version"], model["alias"], model["model_id"], model["eval_run_id"]) == (
        "chat", "1", "champion", "m-one", "run-1")  # fmt: skip
    health = c.get("/health").json()
    assert health["status"] == "ok" and health["version"] == "1" and health["swap_pending"] is None


# --- the swap -----------------------------------------------------------------------------------


def test_a_swap_sends_new_requests_to_the_new_version_and_releases_the_old_after_its_last_request():
    gate = threading.Event()
    old = Served(V1, Gated(ANSWER, gate))
    slot, lines, released = slot_of(old)
    c = TestClient(app_module.create_app(slot))
    results: list[dict] = []
    in_flight = [threading.Thread(target=lambda: results.append(c.post("/v1/chat/completions",
                                                                       json={"messages": USER}).json()))
                 for _ in range(3)]  # fmt: skip
    for t in in_flight:
        t.start()
    assert wait(lambda: old.in_use == 3)
    slot.swap(Served(V2, ScriptedBackend(ANSWER)))
    # New requests go to version 2 at once, while version 1 still has three in flight.
    assert c.post("/v1/chat/completions", json={"messages": USER}).json()["system_fingerprint"] == "chat/2"
    assert released == []
    gate.set()
    for t in in_flight:
        t.join(10)
    # The three finished on the version they started on, and only then was it released.
    assert [r["system_fingerprint"] for r in results] == ["chat/1"] * 3
    assert wait(lambda: released == [old]) and any("released chat/1" in line for line in lines)
    assert c.get("/health").json()["version"] == "2"


def test_a_stream_in_flight_keeps_its_version_until_its_last_chunk():
    gate = threading.Event()
    old = Served(V1, Gated(ANSWER, gate))
    slot, _, released = slot_of(old)
    c = TestClient(app_module.create_app(slot))
    chunks: list[str] = []

    def stream():
        with c.stream("POST", "/v1/chat/completions", json={"messages": USER, "stream": True}) as r:
            chunks.extend(r.iter_lines())

    t = threading.Thread(target=stream)
    t.start()
    assert wait(lambda: old.in_use == 1)
    slot.swap(Served(V2, ScriptedBackend(ANSWER)))
    time.sleep(0.1)
    assert released == []
    gate.set()
    t.join(10)
    assert chunks[-2:] == ["", "data: [DONE]"] or "data: [DONE]" in chunks
    assert wait(lambda: released == [old])


class Registry:
    """The follower's view of the registry: which version holds the alias, scripted."""

    def __init__(self, version: str):
        self.version = version
        self.fail: Exception | None = None

    def resolve(self, name: str, alias: str) -> ModelInfo:
        if self.fail:
            raise self.fail
        return V1 if self.version == "1" else ModelInfo(**{**V2.__dict__, "version": self.version})


def test_the_follower_swaps_when_the_alias_moves_and_keeps_serving_through_failures():
    slot, lines, released = slot_of(Served(V1, ScriptedBackend(ANSWER)))
    registry = Registry("1")
    loads: list[str] = []

    def load(info: ModelInfo) -> Served:
        loads.append(info.version)
        if info.version == "3":
            raise RuntimeError("artifacts of version 3 are gone\nTraceback ...")
        return Served(info, ScriptedBackend(ANSWER))

    follower = Follower(slot, 30, registry.resolve, load)
    follower.check()
    assert loads == [] and slot.current.info.version == "1"  # the alias has not moved
    registry.fail = ConnectionError("registry down")
    follower.check()
    follower.check()
    assert slot.current.info.version == "1" and sum("cannot read" in line for line in lines) == 1  # said once
    registry.fail = None
    registry.version = "3"  # a broken version: the old one goes on serving, /health says why
    follower.check()
    follower.check()  # not loaded again while the alias stays there
    assert loads == ["3"] and slot.current.info.version == "1"
    assert slot.health()["swap_error"] == "version 3 failed to load: artifacts of version 3 are gone"
    registry.version = "2"
    follower.check()
    assert slot.current.info.version == "2" and "swap_error" not in slot.health()
    assert wait(lambda: [s.info.version for s in released] == ["1"])


def test_registry_uris_name_their_version_or_alias():
    assert parse_model_uri("models:/chat@champion") == ("chat", "", "champion")
    assert parse_model_uri("models:/chat/7") == ("chat", "7", "")
    assert parse_model_uri("models:/m-0123") == ("", "", "")
    assert parse_model_uri("runs:/abc/model") == ("", "", "")


# --- the key ------------------------------------------------------------------------------------


def test_a_key_guards_the_model_routes_and_leaves_probes_open():
    fallback_calls = []

    async def fallback(scope, receive, send):
        fallback_calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"pong"})

    c = TestClient(app_module.create_app(ScriptedBackend(ANSWER), "m", fallback, options=Options(api_key="s3cret")))
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/invocations")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.request(method, path, json={"messages": USER}, headers=headers)
            assert r.status_code == 401, (path, headers)
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and "s3cret" not in r.text
    ok = c.post("/v1/chat/completions", json={"messages": USER}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    assert c.get("/ping").status_code == 200 and fallback_calls == ["/ping"]
    metrics = c.get("/metrics").text
    assert "s3cret" not in metrics
    assert 'phi3mlflow:http_requests_total{route="/v1/chat/completions",status="401"} 3.0' in metrics


def test_the_key_comes_from_the_flags_or_the_environment_never_empty(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert auth.api_key("flag", None, {}) == "flag"
    assert auth.api_key(None, str(key_file), {}) == "from-file"
    assert auth.api_key(None, None, {auth.ENV_KEY: "env"}) == "env"
    assert auth.api_key(None, None, {auth.ENV_KEY_FILE: str(key_file)}) == "from-file"
    assert auth.api_key(None, None, {}) == ""
    bad = [("a", str(key_file), {}, "api_key"), (None, str(tmp_path / "nope"), {}, "api_key_file"),
           (None, None, {auth.ENV_KEY: "has space"}, auth.ENV_KEY)]  # fmt: skip
    for flag, path, env, parameter in bad:
        with pytest.raises(InputError) as e:
            auth.api_key(flag, path, env)
        assert e.value.parameter == parameter
    key_file.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        auth.api_key(None, str(key_file), {})


# --- metrics and CORS -----------------------------------------------------------------------------


def test_metrics_parse_and_count_what_was_sent():
    slot, _, _ = slot_of(Served(V1, ScriptedBackend([Delta("Ma"), Delta("drid"), Done("stop", 7, 3)])))
    c = TestClient(app_module.create_app(slot))
    for _ in range(3):
        assert c.post("/v1/chat/completions", json={"messages": USER}).status_code == 200
    assert c.post("/v1/chat/completions", json={"messages": USER, "stream": True}).status_code == 200
    assert c.post("/v1/chat/completions", json={"messages": USER, "n": 9}).status_code == 400
    families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}

    def value(family: str, sample: str, **labels) -> float:
        return sum(s.value for s in families[family].samples
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip

    assert value("phi3mlflow:http_requests", "phi3mlflow:http_requests_total", route="/v1/chat/completions",
                 status="200") == 4  # fmt: skip
    assert value("phi3mlflow:http_requests", "phi3mlflow:http_requests_total", status="400") == 1
    assert value("phi3mlflow:prompt_tokens", "phi3mlflow:prompt_tokens_total", model_version="chat/1") == 28
    assert value("phi3mlflow:generation_tokens", "phi3mlflow:generation_tokens_total", model_version="chat/1") == 12
    assert value("phi3mlflow:time_to_first_token_seconds", "phi3mlflow:time_to_first_token_seconds_count") == 4
    assert value("phi3mlflow:e2e_request_latency_seconds", "phi3mlflow:e2e_request_latency_seconds_count") == 4
    assert value("phi3mlflow:request_success", "phi3mlflow:request_success_total", finished_reason="stop") == 4
    assert value("phi3mlflow:num_requests_running", "phi3mlflow:num_requests_running") == 0
    assert value("phi3mlflow:num_requests_waiting", "phi3mlflow:num_requests_waiting") == 0
    assert value("phi3mlflow:model_info", "phi3mlflow:model_info", model_version="1", model_id="m-one") == 1


def test_overloaded_requests_are_counted_and_metrics_can_be_off():
    from phi3mlflow.errors import Overloaded

    c = TestClient(app_module.create_app(ScriptedBackend(Overloaded("full")), "m"))
    assert c.post("/v1/chat/completions", json={"messages": USER}).status_code == 503
    text = c.get("/metrics").text
    assert 'phi3mlflow:num_requests_rejected_total{model_version="m"} 1.0' in text
    off = TestClient(app_module.create_app(ScriptedBackend(ANSWER), "m", options=Options(metrics=False)))
    assert off.get("/metrics").status_code == 404


def test_cors_is_off_by_default_and_allows_only_the_origins_given():
    plain = TestClient(app_module.create_app(ScriptedBackend(ANSWER), "m"))
    r = plain.post("/v1/chat/completions", json={"messages": USER}, headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers
    options = Options(cors_origins=("https://app.example",), api_key="k")
    c = TestClient(app_module.create_app(ScriptedBackend(ANSWER), "m", options=options))
    asked = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization"}  # fmt: skip
    preflight = c.options("/v1/chat/completions", headers=asked)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = c.options("/v1/chat/completions", headers={"Origin": "https://evil.example",
                                                       "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_release_lets_the_model_behind_a_fallback_app_go():
    """MLflow's scoring app closes its endpoints over the model, and FastAPI keeps every endpoint it
    classified in module-level caches: release drops those, so the released model is freed."""
    import gc
    import weakref

    from fastapi import FastAPI

    from phi3mlflow.serve.slot import release

    class Model:
        def predict(self, rows):
            return rows

    def scoring_app(model: Model) -> FastAPI:  # the shape of mlflow.pyfunc.scoring_server.init
        fallback = FastAPI()

        @fallback.get("/ping")
        def ping():
            return {"model": type(model).__name__}

        return fallback

    model = Model()
    gone = weakref.ref(model)
    fallback = scoring_app(model)
    assert TestClient(fallback).get("/ping").json() == {"model": "Model"}
    served = Served(V1, ScriptedBackend(ANSWER), fallback)
    del model, fallback
    gc.collect()
    assert gone() is not None  # held: by the Served, and by FastAPI's caches
    release(served)
    assert gone() is None and served.backend is None and served.fallback is None


def test_prompt_cache_hits_reach_usage_and_metrics():
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from tests.unit.test_batching_worker import make
    from tests.unit.test_prompt_cache import SYSTEM, ask

    backend = ScriptedBackend([Delta("Madrid"), Done("stop", 9, 1, cached_tokens=6)])
    backend.batcher, _ = make(prompt_cache=True)  # the loop /metrics observes
    slot, _, _ = slot_of(Served(V1, backend))
    c = TestClient(app_module.create_app(slot))
    out = ChatCompletion.model_validate_json(c.post("/v1/chat/completions", json={"messages": USER}).content)
    assert out.usage and out.usage.prompt_tokens_details and out.usage.prompt_tokens_details.cached_tokens == 6
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    lines = [line[6:] for line in c.post("/v1/chat/completions", json=body).text.splitlines()
             if line.startswith("data: {")]  # fmt: skip
    last = ChatCompletionChunk.model_validate_json(lines[-1])
    assert last.usage and last.usage.prompt_tokens_details and last.usage.prompt_tokens_details.cached_tokens == 6
    ask(backend.batcher, SYSTEM + [50, 51])
    ask(backend.batcher, SYSTEM + [52, 53, 54])
    text = c.get("/metrics").text
    assert 'phi3mlflow:prefix_cache_queries_total{model_version="chat/1"} 17.0' in text
    assert 'phi3mlflow:prefix_cache_hits_total{model_version="chat/1"} 6.0' in text


def test_the_prompt_cache_flag_reaches_the_onnx_models_loop():
    from types import SimpleNamespace

    from phi3mlflow.serve.backends import OnnxBackend
    from phi3mlflow.serve.cli import parse_args
    from tests.unit.test_batching_worker import make

    assert parse_args(["models:/m@a"]).prompt_cache is True
    assert parse_args(["models:/m@a", "--prompt-cache", "false"]).prompt_cache is False
    for on in (True, False):
        loop, _ = make()
        OnnxBackend(SimpleNamespace(chat=SimpleNamespace(context_length=256, batcher=loop)), on)
        assert loop.prompt_cache is on
