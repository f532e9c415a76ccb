"""What the server's generation features cost (issue #27), on the int4 ONNX model behind
`python -m phi3mlflow.serve`, one server per figure.

- ``serve_late_arrival_ttft``: p50 time to first token of a request sent while another request's
  long answer streams (A) over the same request's p50 alone (B). Target ≤ 3: a late request starts
  at the next round of the loop rather than after the long answer.
- ``structured_output_cost``: generated tokens/s of one request constrained by a JSON schema (ORT
  GenAI guidance) over the same request unconstrained. Reported.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time

from bench.figures import Setup, interleaved
from bench.operations import _server

LONG_TOKENS = 300
TTFT_SAMPLES = 3  # late requests per side of a pair
SCHEMA = {
    "type": "object",
    "properties": {"population_millions": {"type": "integer"}, "river": {"type": "string", "enum": ["Seine", "Loire"]}},
    "required": ["population_millions", "river"],
}


def _stream(port: int, body: dict, first: list[float] | None = None) -> int:
    """Stream one chat completion; its completion tokens. ``first`` gets the time to its first token."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    tokens = 0
    for line in conn.getresponse():
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is not None and not first and any((c["delta"].get("content") or "") for c in chunk["choices"]):
            first.append(time.perf_counter() - start)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return tokens


def serve_late_arrival_ttft(s: Setup, pairs: int) -> dict:
    """Per pair: p50 TTFT of requests sent while a long answer streams (A) over alone (B)."""
    short = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
             "temperature": 0}  # fmt: skip
    long = {"messages": [{"role": "user", "content": s.prompt}], "max_tokens": LONG_TOKENS if not s.quick else 64,
            "temperature": 0}  # fmt: skip
    medians: dict[str, list[float]] = {"a": [], "b": []}
    with _server(s.uris["int4"]) as port:

        def ttft() -> float:
            first: list[float] = []
            _stream(port, short, first)
            return first[0] if first else float("nan")

        def behind_a_long_answer() -> float:
            started: list[float] = []
            streaming = threading.Thread(target=_stream, args=(port, long, started))
            streaming.start()
            while not started and streaming.is_alive():
                time.sleep(0.005)
            samples = [ttft() for _ in range(TTFT_SAMPLES)]
            streaming.join()
            medians["a"].append(statistics.median(samples))
            return medians["a"][-1]

        def alone() -> float:
            medians["b"].append(statistics.median(ttft() for _ in range(TTFT_SAMPLES)))
            return medians["b"][-1]

        out = interleaved(behind_a_long_answer, alone, pairs, ratio=lambda ra, ta, rb, tb: ra / rb)
    # The time to first token itself (interleaved's side times are whole sides).
    out["a_median_s"], out["b_median_s"] = (statistics.median(medians[k]) for k in "ab")
    out["long_answer_tokens"] = long["max_tokens"]
    return out


def structured_output_cost(s: Setup, pairs: int) -> dict:
    """Tokens/s of a JSON-schema-constrained answer (A) over the same request unconstrained (B)."""
    ask = {"messages": [{"role": "user", "content": "Tell me about Paris as JSON."}], "max_tokens": s.new_tokens,
           "temperature": 0}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    with _server(s.uris["int4"]) as port:
        out = interleaved(lambda: _stream(port, {**ask, "response_format": fmt}), lambda: _stream(port, ask), pairs,
                          ratio=lambda ra, ta, rb, tb: (ra / ta) / (rb / tb), reps=s.reps)  # fmt: skip
    return out
