"""Shared fixtures: a real ``mlflow server`` on a free loopback port, the built-in model cache,
and a helper that runs entry points through the real ``mlflow run`` CLI; and shared helpers:
``run_step``, ``one_line_error``, ``serving`` (``mlflow models serve``), ``wait_for`` and ``post``.

Every test that uses a server, a model or ``mlflow run`` (or runs a step as a process) is marked
``slow``: ``pytest -m "not slow"`` is the fast layer."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
# Entry point commands call plain `python`: make it this interpreter, whatever the caller's PATH.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    """Until ``url`` answers; fails with the end of the server's log if ``proc`` exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    raise AssertionError(f"server did not come up:\n{log_path.read_text()[-3000:]}")


def post(url: str, payload) -> tuple[int, str]:
    """POST ``payload`` as JSON; the status and body, also for 4xx/5xx answers."""
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the server's process group; SIGKILL if it is still there after ``timeout`` s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def serving(model_uri: str, log_path: Path, env: dict | None = None):
    """``mlflow models serve`` of ``model_uri`` on a free loopback port; yields its base URL and
    stops it (by process group) afterwards."""
    args = ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "--workers", "1"]
    with _server(args, "/ping", log_path, env) as base:
        yield base


@contextlib.contextmanager
def openai_server(model_uri: str, log_path: Path, *flags: str, env: dict | None = None):
    """``python -m phi3mlflow.serve`` of ``model_uri`` (with ``flags``) on a free loopback port."""
    with _server(["phi3mlflow.serve", model_uri, *flags], "/health", log_path, env) as base:
        yield base


@contextlib.contextmanager
def _server(module_args: list[str], ready_path: str, log_path: Path, env: dict | None):
    """``python -m <module_args> --host 127.0.0.1 --port <free>`` from the project, logging to
    ``log_path``; yields its base URL once ``ready_path`` answers, stops its process group after."""
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", *module_args, "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ), start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}{ready_path}", proc, log_path)
        yield base
    finally:
        stop(proc, timeout=30)
        log.close()


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a command that refused its input (exit status 2)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, f"exit status {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    return lines[0]


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


class MlflowRun:
    """``mlflow run`` of this project against the test server; ``.run_id`` and ``.run`` after."""

    def __init__(self, proc: subprocess.CompletedProcess):
        self.proc = proc
        self.output = proc.stdout + proc.stderr
        ids = re.findall(r"Run \(ID '([0-9a-f]+)'\)", self.output)
        self.run_id = ids[-1] if ids else None

    @property
    def run(self):
        import mlflow

        return mlflow.get_run(self.run_id)


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


def run_step(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m steps.<module>`` directly, as an entry point's command does."""
    return subprocess.run(
        [sys.executable, "-m", f"steps.{module}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )  # fmt: skip


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
