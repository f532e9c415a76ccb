"""The ONNX pyfunc's request handling before any model work: search options, input shapes, caps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from phi3mlflow.errors import InvalidRequest
from phi3mlflow.genai import SearchOptions

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


@pytest.mark.parametrize("extra,field", [({"n": 2}, "n"), ({"logprobs": True}, "logprobs")])
def test_the_pyfunc_refuses_what_only_the_server_answers(onnx_model, extra, field):
    class NoChat:
        context_length = 256

    onnx_model.chat = NoChat()
    with pytest.raises(MlflowException) as e:
        onnx_model.predict(None, {"messages": [{"role": "user", "content": "Hi"}], **extra})
    assert e.value.message.startswith(f"{field}: ") and "phi3mlflow.serve" in e.value.message
