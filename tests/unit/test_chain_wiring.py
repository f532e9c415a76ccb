"""main's wiring: every child parameter comes from a profile key or an upstream output."""

from __future__ import annotations

import pytest
import yaml

from phi3mlflow import PROJECT_ROOT
from phi3mlflow.chain import PROFILE_KEYS
from steps import evaluate, main, onnx_wrapper, pipeline_wrapper, register

MLPROJECT = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]
STEPS = {"pipeline_wrapper": pipeline_wrapper, "onnx_wrapper": onnx_wrapper, "evaluate": evaluate,
         "register": register}  # fmt: skip
# Upstream outputs main passes on: the source in WIRING, and the parameter it feeds.
UPSTREAM = {"@chat": "chat_model_uri", "@onnx": "onnx_model_uris", "@eval": "eval_run_id", "@precision": "precision"}
# Child parameters main does not pass, so the step's own default applies (the pyfunc's per-request caps).
UNWIRED: dict[str, set[str]] = {}


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
