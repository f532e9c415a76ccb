"""The OpenAI chat contract both wrappers answer (phi3mlflow/serve/protocol.py): every bad request is
refused naming its field in ``param``, before any model work; and the stop-string rules."""

from __future__ import annotations

import json

import pytest

from phi3mlflow.batching import held_back, truncate_at_stop
from phi3mlflow.errors import InvalidRequest
from phi3mlflow.serve import protocol

USER = [{"role": "user", "content": "What is the capital of Spain?"}]
BAD = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": -3}, "max_tokens"),
    ({"messages": USER, "max_tokens": 100_000}, "max_tokens"),
    ({"messages": USER, "temperature": -0.5}, "temperature"),
    ({"messages": USER, "temperature": float("inf")}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "n": 5}, "n"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "tools": []}, "tools"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "model": 3}, "model"),
    ({"messages": USER, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": USER, "presence_penalty": -1}, "presence_penalty"),
    ({"messages": USER, "logprobs": "yes"}, "logprobs"),
    ({"messages": USER, "top_logprobs": 5}, "top_logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": USER, "seed": "7"}, "seed"),
    ({"messages": USER, "seed": 1.5}, "seed"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": USER, "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"messages": USER, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"messages": USER, "response_format": "json"}, "response_format"),
]


def test_response_format_becomes_a_json_schema_constraint():
    assert protocol.parse({"messages": USER}).guidance is None
    assert protocol.parse({"messages": USER, "response_format": {"type": "text"}}).guidance is None
    assert protocol.parse({"messages": USER, "response_format": {"type": "json_object"}}).guidance == (
        "json_schema", '{"type": "object"}')  # fmt: skip
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {
        "messages": USER,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    }
    kind, text = protocol.parse(body).guidance
    assert kind == "json_schema" and json.loads(text) == schema


def test_fields_at_the_value_that_asks_for_nothing_are_taken():
    body = {"messages": USER, "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "seed": 42,
            "stream": True, "stream_options": {"include_usage": True}, "user": "u"}  # fmt: skip
    request = protocol.parse(body)
    assert request.seed == 42 and request.include_usage is True and request.logprobs is None
    assert protocol.parse({"messages": USER, "logprobs": True}).logprobs == 0
    assert protocol.parse({"messages": USER, "logprobs": True, "top_logprobs": 20}).logprobs == 20


@pytest.mark.parametrize("body,field", BAD)
def test_bad_requests_are_refused_naming_the_field(body, field):
    with pytest.raises(InvalidRequest) as e:
        protocol.parse(body, context_length=256)
    assert e.value.param == field and str(e.value).startswith(f"{field}: "), str(e.value)


def test_a_body_that_is_no_object_names_no_field():
    with pytest.raises(InvalidRequest) as e:
        protocol.parse([1, 2])
    assert e.value.param is None and "JSON object" in str(e.value)


def test_a_good_request_keeps_what_the_client_set_and_leaves_the_rest_to_the_model():
    req = protocol.parse({"model": "any", "messages": USER, "stop": "\n", "max_tokens": 8, "stream": True})
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.stream) == (8, None, None, ["\n"], True)
    with pytest.raises(InvalidRequest, match="^max_tokens: 250 is beyond the model's context") as e:
        protocol.check_length(10, 250, 256)
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequest) as e:
        protocol.check_length(300, 1, 256)
    assert e.value.param == "messages"


def test_stop_strings_are_cut_and_their_possible_starts_held_back():
    assert truncate_at_stop("Madrid. Next", [". N", "xx"]) == ("Madrid", True)
    assert truncate_at_stop("Madrid", ["."]) == ("Madrid", False)
    # The stop string that ends first wins, as it does in a stream, not the one that starts first.
    assert truncate_at_stop("The sky is blue, a", [" blue,", "blue"]) == ("The sky is ", True)
    assert held_back("Madrid.", [". N"]) == 1
    assert held_back("Madrid. ", [". N"]) == 2
    assert held_back("Madrid", [". N"]) == 0
