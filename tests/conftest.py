"""Fixtures shared by both layers: a real ``mlflow server`` on a free loopback port, the built-in
model cache, and ``mlflow run`` of this project against that server. The helpers they use, and that
the tests and benchmarks import, are in tests/support.py. tests/unit runs no process; everything in
tests/integration is marked slow by its own conftest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, MlflowRun, free_port, stop, wait_for


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_stay_in_pytests_temp(tmp_path_factory):
    """Every temporary file of the session (MLflow's model downloads among them) under pytest's
    own temporary folder, which pytest prunes, in this process and in every process it starts."""
    import tempfile

    folder = str(tmp_path_factory.mktemp("tmp"))
    os.environ["TMPDIR"] = folder
    tempfile.tempdir = folder
    yield


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One built-in model cache for the session, so the model is built once and reused."""
    if os.environ.get("PHI3MLFLOW_TEST_CACHE"):
        path = Path(os.environ["PHI3MLFLOW_TEST_CACHE"])
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        # Workers share one cache (its builds are locked), so the model is built once per session.
        path = tmp_path_factory.getbasetemp().parent / "model-cache"
    else:
        path = tmp_path_factory.mktemp("model-cache")
    os.environ["PHI3MLFLOW_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def builtin_dir(model_cache) -> Path:
    from phi3mlflow.tiny import builtin_model_dir

    return builtin_model_dir()


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory, model_cache):
    """A real tracking server (SQLite backend, local artifacts), stopped by PID at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port),
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    wait_for(f"{uri}/health", proc, root / "server.log")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["PHI3_TEST_ARTIFACT_ROOT"] = str(root / "artifacts")
    yield uri
    stop(proc, timeout=20)
    log.close()


@pytest.fixture(scope="session")
def artifact_root(tracking_uri) -> Path:
    """Where the test server keeps artifacts (to take a logged model away, as a user might)."""
    return Path(os.environ["PHI3_TEST_ARTIFACT_ROOT"])


@pytest.fixture(scope="session")
def mlflow_run(tracking_uri):
    def run(entry_point: str, params: dict | None = None, experiment: str = "tests", uri: str = str(ROOT),
            extra: list[str] | None = None, check: bool = True, timeout: int = 900) -> MlflowRun:  # fmt: skip
        cmd = [sys.executable, "-m", "mlflow", "run", uri, "-e", entry_point, "--env-manager", "local",
               "--experiment-name", experiment]  # fmt: skip
        for k, v in (params or {}).items():
            cmd += ["-P", f"{k}={v}"]
        proc = subprocess.run(
            cmd + (extra or []), capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
        )
        result = MlflowRun(proc)
        if check and proc.returncode != 0:
            raise AssertionError(f"mlflow run -e {entry_point} failed:\n{result.output[-6000:]}")
        return result

    return run


@pytest.fixture(scope="session")
def onnx_fp32_dir(builtin_dir) -> Path:
    from phi3mlflow.onnx_export import export

    return export(str(builtin_dir), "fp32")


@pytest.fixture(scope="session")
def chat_run(mlflow_run):
    """pipeline_wrapper on the built-in model, once per session."""
    return mlflow_run("pipeline_wrapper", {"serve_max_new_tokens": 32}, experiment="pipeline-wrapper")


@pytest.fixture(scope="session")
def int4_run(mlflow_run):
    """onnx_wrapper (int4) on the built-in model, once per session."""
    return mlflow_run("onnx_wrapper", {"precision": "int4", "serve_max_new_tokens": 32}, experiment="onnx-wrapper")
