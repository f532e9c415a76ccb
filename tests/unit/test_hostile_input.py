"""Hostile input, refused in one line naming its field before any work (issue #29's findings that need
no process): NUL and lone surrogates, unbounded stop strings, absurdly nested JSON, list-valued
categories, YAML aliases and duplicate keys, numbers where a name is due, names with control
characters."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from phi3mlflow import registry
from phi3mlflow.batching import truncate_at_stop
from phi3mlflow.chain import load_profile
from phi3mlflow.errors import InputError, InvalidRequest
from phi3mlflow.evaluation.dataset import load_dataset
from phi3mlflow.serve import app as app_module
from phi3mlflow.serve import protocol
from tests.unit.test_http_app import ScriptedBackend
from tests.unit.test_profiles import _tiny_profile

USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "body,field,says",
    [
        ({"messages": [{"role": "system", "content": "Be\x00"}, *USER]}, "messages[0].content", "NUL"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", "lone surrogate"),
        # Past the ASCII fast path: a low surrogate after accented text.
        ({"messages": [*USER, {"role": "user", "content": "café \udfff"}]}, "messages[1].content", "lone surrogate"),
        ({"messages": USER, "stop": ["x" * 257]}, "stop", "at most 256 characters"),
        ({"messages": USER, "stop": ["a\x00"]}, "stop", "NUL"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ],
)
def test_text_a_model_cannot_take_is_refused_naming_its_field(body, field, says):
    with pytest.raises(InvalidRequest) as e:
        protocol.parse(body)
    assert e.value.param == field and says in str(e.value)


def test_text_beyond_ascii_without_lone_surrogates_is_taken():
    # Accents, a character beyond the BMP (one code point in Python, a surrogate pair in JSON) and the
    # code points around the surrogate range.
    body = {"messages": [{"role": "user", "content": "café 😀 \ud7ff\ue000"}], "stop": ["é"]}
    assert protocol.parse(body).messages[0]["content"] == "café 😀 \ud7ff\ue000"


def test_a_stop_string_of_the_longest_allowed_length_still_matches_across_the_search_window():
    stop = "y" * protocol.MAX_STOP_CHARS
    text = "x" * 1000 + stop + "tail"
    # Searching from the window the last piece could complete gives what a whole search gives.
    start = len(text) - len("tail") - len(stop) - 10
    assert truncate_at_stop(text, [stop], start) == truncate_at_stop(text, [stop]) == ("x" * 1000, True)


def test_absurdly_nested_json_is_a_400_not_a_500():
    c = TestClient(app_module.create_app(ScriptedBackend([]), "m"))
    r = c.post("/v1/chat/completions", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body:")


def test_a_list_valued_category_fails_the_dataset_check_naming_its_row(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "Q1?", "answer": "a", "category": "x"}\n'
                    '{"question": "Q2?", "answer": "b", "category": ["x", "y"]}\n')  # fmt: skip
    with pytest.raises(InputError) as e:
        load_dataset(str(path), "question", "answer")
    assert e.value.parameter == "dataset" and "q.jsonl row 2: category" in e.value.message


@pytest.mark.parametrize(
    "extra,says",
    [
        ("a: &a [1, 1]\nb: &b [*a, *a]\n", "aliases are not allowed"),
        ("alias: champion\n", "duplicate key 'alias'"),
    ],
)
def test_profiles_refuse_yaml_aliases_and_duplicate_keys(tmp_path, extra, says):
    path = tmp_path / "p.yaml"
    path.write_text(_tiny_profile_text() + extra)
    with pytest.raises(InputError) as e:
        load_profile(str(path))
    assert e.value.parameter == "params_file" and says in e.value.message


def _tiny_profile_text() -> str:
    import yaml

    return yaml.safe_dump(_tiny_profile())


def test_a_number_where_a_model_name_is_due_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(_tiny_profile_text().replace("model: builtin:tiny-phi3", "model: 0x1F"))
    with pytest.raises(InputError, match="model must be text, got 31"):
        load_profile(str(path))


@pytest.mark.parametrize("name", ["chat\nmodel", "chat\tmodel", " chat", "chat "])
def test_registered_model_names_with_control_characters_or_blanks_are_refused(name):
    with pytest.raises(InputError) as e:
        registry.check_names(name, "champion", "")
    assert e.value.parameter == "registered_model_name"
