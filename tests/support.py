"""Helpers shared by the tests and the benchmarks: free loopback ports, starting a server and
waiting for it (``serving``: ``mlflow models serve``; ``openai_server``: ``python -m
phi3mlflow.serve``), ``post``, ``sse_events`` (an SSE client that reads the raw lines), running a
step as its entry point's command does (``run_step``), ``one_line_error`` and ``MlflowRun``."""

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

ROOT = Path(__file__).resolve().parent.parent
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
# Entry point commands call plain `python`: make it this interpreter, whatever the caller's PATH.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Until ``url`` answers (True); False if ``proc`` exits or ``timeout`` s pass first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            if proc.poll() is not None:
                return False
            time.sleep(0.5)
    return False


def wait_for(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    """Until ``url`` answers; fails with the end of the server's log if ``proc`` exits or time runs out."""
    if not wait_until_up(url, proc, timeout):
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
    with _server(args, "/ping", log_path, env) as (base, _):
        yield base


@contextlib.contextmanager
def openai_server(model_uri: str, log_path: Path, *flags: str, env: dict | None = None):
    """``python -m phi3mlflow.serve`` of ``model_uri`` (with ``flags``) on a free loopback port."""
    with _server(["phi3mlflow.serve", model_uri, *flags], "/health", log_path, env) as (base, _):
        yield base


@contextlib.contextmanager
def openai_server_process(model_uri: str, log_path: Path, *flags: str):
    """As ``openai_server``, yielding the base URL and the server's process (to read its memory)."""
    with _server(["phi3mlflow.serve", model_uri, *flags], "/health", log_path, None) as served:
        yield served


def rss_mb(pid: int) -> float:
    """The process's resident memory (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@contextlib.contextmanager
def _server(module_args: list[str], ready_path: str, log_path: Path, env: dict | None):
    """``python -m <module_args> --host 127.0.0.1 --port <free>`` from the project, logging to
    ``log_path``; yields its base URL and process once ``ready_path`` answers, stops its process group after."""
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", *module_args, "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ), start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}{ready_path}", proc, log_path)
        yield base, proc
    finally:
        stop(proc, timeout=30)
        log.close()


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a command that refused its input (exit status 2)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, f"exit status {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    return lines[0]


def run_step(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m steps.<module>`` directly, as an entry point's command does."""
    return subprocess.run(
        [sys.executable, "-m", f"steps.{module}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )  # fmt: skip


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


def sse_events(response_lines) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent event stream, each parsed as JSON, ``"[DONE]"`` as is."""
    out: list[dict | str] = []
    for line in response_lines:
        line = line.decode() if isinstance(line, bytes) else line
        if line.startswith("data: "):
            payload = line[len("data: ") :].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
