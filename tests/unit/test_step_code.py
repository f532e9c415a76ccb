"""Each step's cache key covers the code that step runs (phi3mlflow/deps.py): editing the server
re-runs no export and no evaluation; and the ONNX pyfunc is logged with only the files it imports."""

from __future__ import annotations

import shutil
from pathlib import Path

from phi3mlflow import PROJECT_ROOT, deps
from phi3mlflow.chain import code_version


def rel(paths) -> set[str]:
    return {p.relative_to(PROJECT_ROOT).as_posix() for p in paths}


def test_each_step_runs_what_it_imports_and_not_the_rest():
    onnx = rel(deps.step_files("onnx_wrapper"))
    assert {"steps/onnx_wrapper.py", "phi3mlflow/onnx_pyfunc.py", "phi3mlflow/batching.py", "phi3mlflow/genai.py",
            "phi3mlflow/serve/protocol.py", "phi3mlflow/serve/__init__.py", "requirements.txt"} <= onnx  # fmt: skip
    assert "phi3mlflow/serve/app.py" not in onnx and "phi3mlflow/evaluation/runner.py" not in onnx
    evaluate = rel(deps.step_files("evaluate"))
    assert {"phi3mlflow/evaluation/stats.py", "phi3mlflow/summary.py", "phi3mlflow/fidelity.py"} <= evaluate
    assert "phi3mlflow/serve/app.py" not in evaluate and "steps/onnx_wrapper.py" not in evaluate
    assert "phi3mlflow/serve/app.py" in rel(deps.step_files("serve"))


def _copy_project(dst: Path) -> Path:
    for name in ("phi3mlflow", "steps"):
        shutil.copytree(PROJECT_ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in deps.ENVIRONMENT:
        shutil.copy(PROJECT_ROOT / name, dst / name)
    return dst


def test_editing_the_server_keeps_every_other_steps_key(tmp_path):
    root = _copy_project(tmp_path)
    steps = ("pipeline_wrapper", "onnx_wrapper", "evaluate", "register")
    before = {s: code_version(root, s) for s in [*steps, "serve"]}
    app = root / "phi3mlflow/serve/app.py"
    app.write_text(app.read_text() + "\n# an edit\n")
    after = {s: code_version(root, s) for s in [*steps, "serve"]}
    assert {s: after[s] for s in steps} == {s: before[s] for s in steps}
    assert after["serve"] != before["serve"]
    stats = root / "phi3mlflow/evaluation/stats.py"
    stats.write_text(stats.read_text() + "\n# an edit\n")
    assert code_version(root, "evaluate") != after["evaluate"]
    assert code_version(root, "onnx_wrapper") == after["onnx_wrapper"]
    # A requirement pin is every step's.
    req = root / "requirements.txt"
    req.write_text(req.read_text() + "\n# a comment\n")
    assert all(code_version(root, s) != after[s] for s in ("pipeline_wrapper", "onnx_wrapper"))


def test_the_onnx_pyfunc_is_staged_with_only_the_files_it_imports(tmp_path):
    staged = deps.stage_package(("phi3mlflow/onnx_pyfunc.py",), tmp_path)
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    wanted = {p for p in rel(deps.project_files(("phi3mlflow/onnx_pyfunc.py",))) if p.startswith("phi3mlflow/")}
    assert files == wanted and staged == tmp_path / "phi3mlflow"
    assert all(f.endswith(".py") for f in files) and "phi3mlflow/serve/app.py" not in files
