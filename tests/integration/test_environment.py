"""The project's declarations agree with each other: pins, MLproject and the step CLIs."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT


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
    assert py_env["python"].startswith("3.11.")  # a full version: see test_the_isolated_environment_...
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


def _pyenv_has(version: str) -> bool:
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    return (root / "versions" / version / "bin" / "python").exists()


PYTHON = yaml.safe_load((ROOT / "python_env.yaml").read_text())["python"]


@pytest.mark.slow
@pytest.mark.skipif(not _pyenv_has(PYTHON), reason=f"pyenv has no Python {PYTHON}: building it needs a download")
def test_the_isolated_environment_builds_offline_and_runs_the_chain(mlflow_run, tmp_path, monkeypatch):
    """How most users run a project from a git URL: MLflow's virtualenv manager builds the pinned
    environment from python_env.yaml (pip, with this machine's package sources) and every step runs
    in it. A Python version pyenv already has needs no download."""
    pyenv_bin = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "bin"
    monkeypatch.setenv("PATH", f"{pyenv_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MLFLOW_ENV_ROOT", str(tmp_path / "envs"))  # the 2 GB environment goes with tmp_path
    assert shutil.which("virtualenv"), "requirements-dev.txt installs virtualenv"
    data = tmp_path / "three.jsonl"
    data.write_text("".join((ROOT / "data/questions.jsonl").read_text().splitlines(keepends=True)[:3]))
    profile = yaml.safe_load((ROOT / "params/tiny.yaml").read_text())
    profile.update(dataset=str(data), registered_model_name="isolated-chat")
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(profile))
    result = mlflow_run("main", {"params_file": str(tmp_path / "profile.yaml")}, experiment="isolated",
                        extra=["--env-manager", "virtualenv"], timeout=1200)  # fmt: skip
    assert "Creating a new environment" in result.output and f"python {PYTHON}" in result.output
    parent = result.run
    assert parent.data.tags["mlflow.project.env"] == "virtualenv" == parent.data.tags["phi3.env_manager"]
    import mlflow

    children = mlflow.search_runs(experiment_names=["isolated"], output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")  # fmt: skip
    assert len(children) == 4 and {c.data.tags["mlflow.project.env"] for c in children} == {"virtualenv"}
    # One environment for the parent and every child.
    assert len(list((tmp_path / "envs").iterdir())) == 1
    assert parent.data.tags["champion_version"] == "1"
