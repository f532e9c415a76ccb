"""How each wrapper answers a checked chat request, as a stream of the batching loop's events.

``OnnxBackend`` hands the request to the ONNX pyfunc's batching loop (concurrent requests batched,
each cancellable); ``PipelineBackend`` generates with the transformers llm/v1/chat model's own
model and tokenizer one request at a time (``SerialWorker``: the same admission limit, a request
whose client left is skipped or stopped) and yields its answer as one Delta."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

from phi3mlflow.batching import MAX_WAITING, SEED_RANGE, Delta, Done, Event, Failed, GenerationRequest, truncate_at_stop
from phi3mlflow.chat_text import ConversationText, check_fits, longest_token
from phi3mlflow.errors import InputError, InvalidRequest, Overloaded
from phi3mlflow.serve import protocol

T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    """A checked request and the generation it asks for."""

    request: protocol.ChatRequest
    generation: GenerationRequest

    def choice(self, i: int) -> GenerationRequest:
        """The generation of choice ``i`` of ``n``: the same request, a seed of its own when seeded."""
        g = self.generation
        return g if i == 0 or g.seed is None else replace(g, seed=g.seed + i)


class OnnxBackend:
    """The ONNX pyfunc's batching loop: concurrent requests batched, each cancellable."""

    wrapper = "onnx"

    def __init__(self, python_model, prompt_cache: bool = True):
        self.model = python_model
        self.context_length = python_model.chat.context_length
        self.batcher = python_model.chat.batcher  # started now, not on the first request
        self.batcher.prompt_cache = prompt_cache  # before any request (phi3mlflow/batching.py)

    def prepare(self, body) -> Prepared:
        request = protocol.parse(body, self.context_length)
        return Prepared(request, self.model.generation_request(request))

    def events(self, prepared: Prepared, choice: int = 0) -> AsyncIterator[Event]:
        return self.batcher.aevents(prepared.choice(choice))

    def close(self) -> None:
        """End the batching loop (once idle) and drop the model: a swapped-out version's release."""
        self.batcher.close()
        self.batcher.join(timeout=30)
        self.model = None


class SerialWorker:
    """One generation at a time on a thread of its own, for a model that is not safe to call from
    several threads: at most ``max_waiting`` requests queue (more get Overloaded, a 503), and a
    request whose client went away before its turn is skipped (its ``cancelled`` is set)."""

    def __init__(self, max_waiting: int = MAX_WAITING):
        self.max_waiting = max_waiting
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phi3mlflow-generate")
        self.pending = 0  # queued or running; changed under `counting`
        self.counting = threading.Lock()
        self.skipped = 0  # requests whose client left before their turn

    async def run(self, work: Callable[[], T], cancelled: threading.Event) -> T | None:
        """``work()``'s result, or None when ``cancelled`` was set before its turn."""
        with self.counting:
            if self.pending >= self.max_waiting:
                raise Overloaded(f"{self.pending} requests are in progress or waiting; try again shortly")
            self.pending += 1

        def turn() -> T | None:
            try:
                if cancelled.is_set():
                    self.skipped += 1
                    return None
                return work()
            finally:
                with self.counting:
                    self.pending -= 1

        return await asyncio.get_running_loop().run_in_executor(self.executor, turn)


class PipelineBackend:
    """The transformers llm/v1/chat model: its pipeline's model and tokenizer generate here, one
    request at a time behind the same admission limit as the ONNX model's loop (a 503 beyond it);
    a client that goes away stops its generation at the next token. What the messages say is
    encoded as text (phi3mlflow/chat_text.py); greedy answers are the pyfunc's (the same templated
    ids, the same decoding), and ``temperature`` > 0 samples with ``top_p``."""

    wrapper = "chat"

    def __init__(self, pyfunc_model, max_waiting: int = MAX_WAITING):
        pipe = pyfunc_model.get_raw_model()
        self.model, self.tokenizer = pipe.model, pipe.tokenizer
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        config = dict(pyfunc_model.model_config or {})
        self.default_max_tokens = int(config.get("max_new_tokens", 64))
        self.default_temperature = float(config.get("temperature", 1.0)) if config.get("do_sample") else 0.0
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos, default=0)
        specials = set(self.tokenizer.all_special_tokens)
        specials |= {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        self.conversation = ConversationText(self._render, self._encode, sorted(specials))
        self.longest_token = longest_token(self.tokenizer.get_vocab())
        self.worker = SerialWorker(max_waiting)

    def close(self) -> None:
        """Drop the model once the generation in progress (if any) ends: a swapped-out version's release."""
        self.worker.executor.shutdown(wait=True)
        self.model = None

    def _render(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template error is the request's
            raise InvalidRequest("messages", f"the model's chat template refused them: {e}") from None

    def _encode(self, text: str) -> list[int]:
        # As the llm/v1/chat pipeline tokenizes the templated text: no special tokens added.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prepare(self, body) -> Prepared:
        request = protocol.parse(body, self.context_length)
        if request.guidance is not None:
            raise InvalidRequest("response_format", "the transformers model cannot constrain its output; serve an "
                                 "ONNX model (onnx_wrapper) for structured output")  # fmt: skip
        max_tokens = request.max_tokens or self.default_max_tokens
        check_fits([m["content"] for m in request.messages], self.context_length, self.longest_token)
        ids = self.conversation.encode_conversation(request.messages)
        if self.context_length:
            protocol.check_length(len(ids), max_tokens, self.context_length)
        temperature = self.default_temperature if request.temperature is None else request.temperature
        generation = GenerationRequest(ids, max_tokens, temperature, request.top_p or 1.0, request.stop, request.seed,
                                       None, request.logprobs)  # fmt: skip
        return Prepared(request, generation)

    def _generate(self, g: GenerationRequest, cancelled: threading.Event) -> tuple[str, str, int, list[dict] | None]:
        """(text, finish reason, completion tokens, logprobs entries when asked) of one generation,
        stopped early when ``cancelled`` is set or a stop string appears."""
        import torch  # heavy: loaded with the model
        from transformers import StoppingCriteria, StoppingCriteriaList  # heavy: as above

        prompt = len(g.ids)
        decode = self.tokenizer.decode

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = cancelled.is_set()
                if not done and g.stop:
                    # The window of tokens the longest stop string can span (a token is one character or more).
                    tail = decode(input_ids[0, max(prompt, input_ids.shape[1] - protocol.MAX_STOP_CHARS - 8) :])
                    done = any(s in tail for s in g.stop)
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        search = {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p} if g.temperature > 0 else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}  # fmt: skip
        if g.logprobs is not None:
            search.update(output_logits=True, return_dict_in_generate=True)
        input_ids = torch.tensor([g.ids], dtype=torch.long)
        if g.temperature > 0 and g.seed is not None:
            torch.manual_seed(g.seed % SEED_RANGE)  # one generation at a time: the draws are this request's
        with torch.inference_mode():
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=g.max_tokens,
                                      stopping_criteria=StoppingCriteriaList([Stop()]), pad_token_id=self.pad_token_id,
                                      **search)  # fmt: skip
        sequences = out.sequences if g.logprobs is not None else out
        new = sequences[0, prompt:].tolist()
        entries = None
        if g.logprobs is not None:
            entries = [self._logprob_entry(step[0], t, g.logprobs) for step, t in zip(out.logits, new, strict=False)
                       if t not in self.eos]  # fmt: skip
        text = decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=True).lstrip()
        text, stopped = truncate_at_stop(text, g.stop)
        ended = stopped or bool(new and new[-1] in self.eos)
        return text, "stop" if ended or len(new) < g.max_tokens else "length", len(new), entries

    def _logprob_entry(self, logits, token: int, top: int) -> dict:
        """OpenAI's logprobs item for ``token`` drawn from the raw ``logits``, with the ``top`` most likely."""
        import torch  # heavy: loaded with the model

        lp = torch.log_softmax(logits.double(), dim=-1)

        def item(t: int) -> dict:
            text = self.tokenizer.decode([t])
            return {"token": text, "logprob": float(lp[t]), "bytes": list(text.encode("utf-8", "replace"))}

        best = torch.topk(lp, top).indices.tolist() if top else []
        return {**item(token), "top_logprobs": [item(t) for t in best]}

    async def events(self, prepared: Prepared, choice: int = 0) -> AsyncIterator[Event]:
        cancelled = threading.Event()
        g = prepared.choice(choice)
        try:
            try:
                out = await self.worker.run(lambda: self._generate(g, cancelled), cancelled)
            except Overloaded:
                raise
            except Exception as e:  # noqa: BLE001 - a failed generation is the server's, said as a 500
                said = str(e).strip()
                yield Failed(f"generation failed: {said.splitlines()[0][:300] if said else type(e).__name__}")
                return
            if out is None:
                return
            text, reason, completion_tokens, entries = out
            yield Delta(text, entries)
            yield Done(reason, len(g.ids), completion_tokens)
        finally:
            cancelled.set()  # a client that left stops its generation at the next token, or before it starts


Backend = OnnxBackend | PipelineBackend


def backend_for(pyfunc_model, prompt_cache: bool = True) -> Backend:
    """The backend for a loaded model; ``prompt_cache``: the ONNX model's (the transformers one has none)."""
    if "transformers" in pyfunc_model.metadata.flavors:
        return PipelineBackend(pyfunc_model)
    python_model = pyfunc_model.unwrap_python_model()
    if hasattr(python_model, "generation_request"):
        return OnnxBackend(python_model, prompt_cache)
    raise InputError("model_uri", "not a model this project logs (neither the chat nor the ONNX wrapper)")
