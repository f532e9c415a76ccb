"""``GET /metrics``: the server's figures in Prometheus text format (the ``prometheus_client``
package), named as vLLM names its own with this project's prefix (``vllm:time_to_first_token_seconds``
→ ``phi3mlflow:time_to_first_token_seconds``), so dashboards made for vLLM adapt with a rename.
Every series about generation carries the served version (``model_version``, the
``system_fingerprint``), so a swap shows as a new series. Each app has its own registry.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from phi3mlflow.batching import Delta, Done, Event, Failed

# Buckets as vLLM's (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
ROUTES = ("/v1/chat/completions", "/v1/models", "/invocations", "/health", "/metrics")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, v = self.registry, ["model_version"]
        self.requests = Counter("phi3mlflow:http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)  # fmt: skip
        self.rejected = Counter("phi3mlflow:num_requests_rejected", "Requests refused as overloaded (503)", v,
                                registry=r)  # fmt: skip
        self.ttft = Histogram("phi3mlflow:time_to_first_token_seconds", "Time to first token", v,
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("phi3mlflow:time_per_output_token_seconds", "Time per output token after the first",
                              v, buckets=TPOT_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("phi3mlflow:e2e_request_latency_seconds", "End-to-end generation latency", v,
                             buckets=E2E_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("phi3mlflow:prompt_tokens", "Prompt tokens processed", v, registry=r)
        self.generation_tokens = Counter("phi3mlflow:generation_tokens", "Tokens generated", v, registry=r)
        self.success = Counter("phi3mlflow:request_success", "Generations finished, by finish reason",
                               ["model_version", "finished_reason"], registry=r)  # fmt: skip
        self.running = Gauge("phi3mlflow:num_requests_running", "Generations that have produced a first event", v,
                             registry=r)  # fmt: skip
        self.waiting = Gauge("phi3mlflow:num_requests_waiting", "Generations waiting for their first event", v,
                             registry=r)  # fmt: skip
        self.prefix_queries = Counter("phi3mlflow:prefix_cache_queries", "Prompt tokens looked up in the prompt "
                                      "cache (the ONNX model's lone greedy requests)", v, registry=r)  # fmt: skip
        self.prefix_hits = Counter("phi3mlflow:prefix_cache_hits", "Prompt tokens found in the prompt cache, not "
                                   "computed again", v, registry=r)  # fmt: skip
        self.batch_size = Histogram("phi3mlflow:batch_size", "Requests decoded together in one batch", v,
                                    buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.info = Gauge("phi3mlflow:model_info", "The served model (1 for the current one)",
                          ["model", "registered_model", "model_version", "alias", "model_id"], registry=r)  # fmt: skip

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serving(self, info, previous=None) -> None:
        """``info`` (a ModelInfo) is now served; ``previous`` no longer."""
        if previous is not None:
            self.info.labels(*_info_labels(previous)).set(0)
        self.info.labels(*_info_labels(info)).set(1)

    def observe_batches(self, backend, version: str) -> None:
        """Batch sizes and prompt-cache lookups of the backend's batching loop, where it has one."""
        batcher = getattr(backend, "batcher", None)
        if batcher is not None:
            batcher.on_batch = self.batch_size.labels(version).observe
            queries, hits = self.prefix_queries.labels(version), self.prefix_hits.labels(version)

            def counted(looked_up: int, found: int) -> None:
                queries.inc(looked_up)
                hits.inc(found)

            batcher.on_prompt_cache = counted

    async def observed(self, events: AsyncIterator[Event], version: str) -> AsyncIterator[Event]:
        """``events`` as they come, timed and counted."""
        start = time.perf_counter()
        first: float | None = None
        waiting, running = self.waiting.labels(version), self.running.labels(version)
        waiting.inc()
        try:
            async for event in events:
                if first is None:
                    first = time.perf_counter()
                    waiting.dec()
                    running.inc()
                    if isinstance(event, Delta | Done):
                        self.ttft.labels(version).observe(first - start)
                if isinstance(event, Done):
                    end = time.perf_counter()
                    self.e2e.labels(version).observe(end - start)
                    self.prompt_tokens.labels(version).inc(event.prompt_tokens)
                    self.generation_tokens.labels(version).inc(event.completion_tokens)
                    self.success.labels(version, event.finish_reason).inc()
                    if event.completion_tokens > 1:
                        self.tpot.labels(version).observe((end - first) / (event.completion_tokens - 1))
                elif isinstance(event, Failed):
                    self.success.labels(version, "error").inc()
                yield event
        finally:
            if first is None:
                waiting.dec()
            else:
                running.dec()
            await events.aclose()  # type: ignore[attr-defined]


def _info_labels(info) -> list[str]:
    return [info.id, info.name, info.version, info.alias, info.model_id]


class CountRequests:
    """ASGI middleware: every HTTP answer counted by route (one of ROUTES, else "other") and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        route = route if route in ROUTES else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counted)
