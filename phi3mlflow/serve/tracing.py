"""``--trace``: an MLflow trace per chat completion, linked to the served logged model: a root span
with the request and the answer, and a ``generate`` span with prompt and completion tokens, the
finish reason and the time to the first token. Off by default: a trace costs every request a
little (``tracing_cost`` in bench/README.md)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

from phi3mlflow.batching import Delta, Done, Event


class RequestTrace:
    """One chat completion's MLflow trace. Spans are started and ended by hand: a streamed answer
    outlives the request handler that starts it."""

    def __init__(self, body: dict, wrapper: str):
        import mlflow  # heavy: only a traced server pays for it here
        from mlflow.entities import SpanType  # heavy: as above

        self.start = time.perf_counter()
        self.first: float | None = None
        self.parts: list[str] = []
        self.root = mlflow.start_span_no_context(
            "chat.completions", span_type=SpanType.CHAT_MODEL, inputs=body, attributes={"wrapper": wrapper}
        )
        self.generate = mlflow.start_span_no_context("generate", span_type=SpanType.LLM, parent_span=self.root)

    def see(self, event: Event) -> None:
        if isinstance(event, Delta) and event.text:
            if self.first is None:
                self.first = (time.perf_counter() - self.start) * 1000
            self.parts.append(event.text)

    def end(self, last: Event | None) -> None:
        from mlflow.entities import SpanStatusCode  # heavy: only a traced server pays for it here

        attributes: dict = {}
        if isinstance(last, Done):
            attributes = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                          "finish_reason": last.finish_reason}  # fmt: skip
        if self.first is not None:
            attributes["ttft_ms"] = round(self.first, 3)
        status = SpanStatusCode.OK if isinstance(last, Done) else SpanStatusCode.ERROR
        self.generate.set_attributes(attributes)
        self.generate.end(status=status)
        self.root.end(outputs={"content": "".join(self.parts)}, status=status)


async def traced(events: AsyncGenerator[Event, None], trace: RequestTrace) -> AsyncIterator[Event]:
    """``events`` passed through, each seen by ``trace``, which ends with the last one."""
    last: Event | None = None
    try:
        async for last in events:
            trace.see(last)
            yield last
    finally:
        trace.end(last)  # a disconnect or an overloaded loop ends it as an error
        await events.aclose()  # closing this generator must still cancel the generation


def link_to_model(pyfunc_model) -> None:
    """Traces started from now on are linked to the served model's LoggedModel, when it has one."""
    import mlflow  # heavy: only a traced server pays for it here

    model_id = getattr(pyfunc_model.metadata, "model_id", None)
    if model_id:
        mlflow.set_active_model(model_id=model_id)
