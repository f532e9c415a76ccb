"""How each wrapper answers a checked chat request, as a stream of the batching loop's events.

``OnnxBackend`` hands the request to the ONNX pyfunc's batching loop (concurrent requests batched,
each cancellable); ``PipelineBackend`` calls the transformers llm/v1/chat pyfunc one request at a
time (its pipeline is not safe to call from several threads) and yields its answer as one Delta
(the flavor has no token stream)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from phi3mlflow.batching import Delta, Done, Event, GenerationRequest, truncate_at_stop
from phi3mlflow.errors import InputError, InvalidRequest
from phi3mlflow.serve import protocol


@dataclass(frozen=True)
class Prepared:
    """A checked request and the generation it asks for."""

    request: protocol.ChatRequest
    generation: GenerationRequest


class OnnxBackend:
    """The ONNX pyfunc's batching loop: concurrent requests batched, each cancellable."""

    wrapper = "onnx"

    def __init__(self, python_model):
        self.model = python_model
        self.context_length = python_model.chat.context_length
        self.batcher = python_model.chat.batcher  # started now, not on the first request

    def prepare(self, body) -> Prepared:
        request = protocol.parse(body, self.context_length)
        return Prepared(request, self.model.generation_request(request))

    def events(self, prepared: Prepared) -> AsyncIterator[Event]:
        return self.batcher.aevents(prepared.generation)


class PipelineBackend:
    """The transformers llm/v1/chat model through its pyfunc, one request at a time."""

    wrapper = "chat"

    def __init__(self, pyfunc_model):
        self.model = pyfunc_model
        pipe = pyfunc_model.get_raw_model()
        self.tokenizer = pipe.tokenizer
        self.context_length = int(getattr(pipe.model.config, "max_position_embeddings", 0) or 0) or None
        self.default_max_tokens = int((pyfunc_model.model_config or {}).get("max_new_tokens", 64))
        self.lock = threading.Lock()

    def prepare(self, body) -> Prepared:
        request = protocol.parse(body, self.context_length)
        max_tokens = request.max_tokens or self.default_max_tokens
        try:
            text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template error is the request's
            raise InvalidRequest("messages", f"the model's chat template refused them: {e}") from None
        prompt_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.context_length:
            protocol.check_length(prompt_tokens, max_tokens, self.context_length)
        generation = GenerationRequest([], max_tokens, request.temperature or 0.0, request.top_p or 1.0, request.stop)
        return Prepared(request, generation)

    def _predict(self, prepared: Prepared) -> dict:
        body: dict = {"messages": prepared.request.messages, "max_tokens": prepared.generation.max_tokens}
        for name in ("temperature", "top_p"):
            if getattr(prepared.request, name) is not None:
                body[name] = getattr(prepared.request, name)
        # No "stop" for the flavor: MLflow's llm/v1/chat pipeline would reload the tokenizer by the
        # model's name to honour it (a hub download); events() cuts the answer at the stop strings.
        with self.lock:
            [out] = self.model.predict(body)
        return out

    async def events(self, prepared: Prepared) -> AsyncIterator[Event]:
        out = await asyncio.to_thread(self._predict, prepared)
        choice = out["choices"][0]
        text, stopped = truncate_at_stop(choice["message"]["content"] or "", prepared.generation.stop)
        yield Delta(text)
        reason = "stop" if stopped else choice.get("finish_reason") or "stop"
        yield Done(reason, int(out["usage"]["prompt_tokens"]), int(out["usage"]["completion_tokens"]))


Backend = OnnxBackend | PipelineBackend


def backend_for(pyfunc_model) -> Backend:
    if "transformers" in pyfunc_model.metadata.flavors:
        return PipelineBackend(pyfunc_model)
    python_model = pyfunc_model.unwrap_python_model()
    if hasattr(python_model, "generation_request"):
        return OnnxBackend(python_model)
    raise InputError("model_uri", "not a model this project logs (neither the chat nor the ONNX wrapper)")
