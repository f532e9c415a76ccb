"""The project's declarations agree with each other: pins, MLproject and the step CLIs."""

import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT


def _pins(lines):
    pins = {}
    for line in lines:
        line = str(line).split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_python_env_and_conda_install_exactly_requirements_txt():
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    req = _pins(lines)
    assert {"mlflow", "torch", "transformers", "onnxruntime-genai", "onnx-ir"} <= set(req)
    assert len(req) == len([line for line in lines if line]), "every requirement is an exact pin"
    # requirements.txt is the one place a pin is edited: both environment files include it.
    py_env = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    assert py_env["python"] == "3.11"
    assert py_env["dependencies"] == ["-r requirements.txt"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip_deps == ["-r requirements.txt"]
    assert "python=3.11" in conda["dependencies"]


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    for name, pinned in _pins((ROOT / "requirements.txt").read_text().splitlines()).items():
        assert version(name).split("+")[0] == pinned, name


def _entry_points():
    return yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


@pytest.mark.parametrize("name", sorted(_entry_points()))
def test_entry_point_flags_are_spelled_like_its_parameters(name):
    ep = _entry_points()[name]
    command = ep["command"]
    module = re.search(r"python -m (steps\.\w+)", command).group(1)
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    for param in ep.get("parameters", {}):
        assert f"--{param} {{{param}}}" in command, param
    # Every flag the command passes is one the step accepts.
    help_text = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for flag in re.findall(r"--(\w+)", command):
        assert f"--{flag}" in help_text, flag


@pytest.mark.parametrize("name", sorted(_entry_points()))
def test_mlproject_defaults_are_the_steps_own_defaults(name):
    """One owner per default: the step's parser. MLproject repeats it; this keeps them in step."""
    import importlib

    step = importlib.import_module(f"steps.{name}")
    required = ["--eval_run_id", "x"] if name == "register" else []
    parsed = vars(step.parse_args(required))
    for param, spec in _entry_points()[name]["parameters"].items():
        if "default" not in spec:
            continue
        ours = parsed[param]
        as_logged = str(ours).lower() if isinstance(ours, bool) else str(ours)
        assert as_logged == spec["default"], (name, param)
