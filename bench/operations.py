"""What operating the server costs (issue #28), on the int4 ONNX model behind `python -m phi3mlflow.serve`.

- ``metrics_cost``: generated tokens/s of 8 concurrent streaming clients on a server with
  ``/metrics`` (A) over the same on a server started with ``--metrics false`` (B). Target ≥ 0.98.
- ``alias_swap_cost``: p95 latency of 4 clients' requests in a window during which ``@champion``
  moves to another version (A: the server loads it beside the running one and swaps) over the p95
  of the same window with no move (B). Reported, target ≤ 2.0. Both versions are the int4 model,
  registered twice, so the swap loads a whole model while the clients are served.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from bench.figures import CONCURRENT_CLIENTS, PROJECT_ROOT, Setup, _stream_chat, _wait_until_up, interleaved
from tests.support import free_port

SWAP_CLIENTS = 4
SWAP_REQUESTS = 6  # per client and window
REGISTERED = "bench-ops"


@contextlib.contextmanager
def _server(uri: str, *flags: str):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi3mlflow.serve", uri, "--port", str(port), *flags], cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ), start_new_session=True,
    )  # fmt: skip
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/health", proc, "python -m phi3mlflow.serve")
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def metrics_cost(s: Setup, pairs: int) -> dict:
    """Tokens/s with /metrics (A) over without (B), 8 concurrent streaming clients each side."""
    prompts = [f"{s.prompt} ({i + 1})" for i in range(CONCURRENT_CLIENTS)]
    with _server(s.uris["int4"]) as on, _server(s.uris["int4"], "--metrics", "false") as off:
        with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:

            def clients(port: int):
                return lambda: sum(pool.map(lambda p: _stream_chat(port, p, s.new_tokens), prompts))

            out = interleaved(clients(on), clients(off), pairs, ratio=lambda ra, ta, rb, tb: (ra / ta) / (rb / tb),
                              reps=s.reps)  # fmt: skip
    out["clients"] = CONCURRENT_CLIENTS
    return out


def _health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
        return json.loads(r.read())


def alias_swap_cost(s: Setup, pairs: int) -> dict:
    """p95 request latency in a window with a swap (A) over a window without (B)."""
    import mlflow

    client = mlflow.MlflowClient()
    versions = [str(mlflow.register_model(s.uris["int4"], REGISTERED).version) for _ in range(2)]
    client.set_registered_model_alias(REGISTERED, "champion", versions[0])
    body = json.dumps({"messages": [{"role": "user", "content": s.prompt}], "max_tokens": s.new_tokens}).encode()
    with _server(f"models:/{REGISTERED}@champion", "--follow-interval", "0.2") as port:

        def request() -> float:
            start = time.perf_counter()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(req, timeout=300) as r:
                r.read()
            return time.perf_counter() - start

        def window(swap: bool) -> float:
            """The p95 of the window's latencies; with ``swap``, the alias moves as it starts."""
            if swap:
                serving = _health(port)["version"]
                target = versions[1] if serving == versions[0] else versions[0]
                client.set_registered_model_alias(REGISTERED, "champion", target)
            with ThreadPoolExecutor(SWAP_CLIENTS) as pool:
                latencies = list(pool.map(lambda _: request(), range(SWAP_CLIENTS * SWAP_REQUESTS)))
            if swap:  # the window must have held the swap: wait for it to land before the next one
                deadline = time.monotonic() + 120
                while _health(port)["version"] != target and time.monotonic() < deadline:
                    time.sleep(0.1)
            return statistics.quantiles(latencies, n=20)[-1]

        out = interleaved(lambda: window(True), lambda: window(False), pairs,
                          ratio=lambda ra, ta, rb, tb: ra / rb, warm=False)  # fmt: skip
    out["clients"], out["requests_per_window"] = SWAP_CLIENTS, SWAP_CLIENTS * SWAP_REQUESTS
    return out
