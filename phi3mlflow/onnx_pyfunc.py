"""The ONNX chat model as an MLflow pyfunc, logged as code (models-from-code): nothing is pickled.

``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"onnx_model": <ORT GenAI folder>},
code_paths=[<the phi3mlflow package>], model_config={...})``. Loading runs this file, which
hands MLflow an ``OnnxChatModel`` through ``mlflow.models.set_model``.

Two inputs, one per row:
- an OpenAI chat request (``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``,
  ``n``=1; phi3mlflow.serve.protocol checks it): one ``chat.completion`` object per row, the same as
  the transformers chat model answers, generated through the model's batching loop (phi3mlflow/batching.py);
- a ``prompt`` column with params ``max_new_tokens``, ``temperature``, ``top_p``, ``do_sample``:
  one string per prompt. Several prompts in one request decode together, as ORT GenAI generator
  batches of up to ``max_batch_size``; one prompt runs a plain ORT GenAI generator loop. A plain prompt gets
  the model's chat template; a prompt that already carries the template's markers is passed through.
model_config: ``intra_op_num_threads`` (0, the default, means all available cores), the
default search options, ``max_batch_size`` (requests, or prompts of one request, decoded as one batch), and the caps
on one request's work: ``max_prompts_per_request`` and ``max_total_new_tokens`` (prompts x
max_new_tokens); a request beyond them is refused (400).
"""

from __future__ import annotations

from contextlib import contextmanager

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel

from phi3mlflow.batching import GenerationRequest
from phi3mlflow.errors import InvalidRequest, Overloaded
from phi3mlflow.genai import MAX_BATCH_SIZE, MAX_PROMPTS_PER_REQUEST, MAX_TOTAL_NEW_TOKENS, GenAIChat, SearchOptions
from phi3mlflow.serve import protocol

ARTIFACT_KEY = "onnx_model"
MODEL_NAME = "onnx"  # the chat.completion's "model" unless the request names one (the server names its model)


def _invalid(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes `mlflow models serve` answer 400 rather than 500.
    return MlflowException.invalid_parameter_value(message)


class OnnxChatModel(PythonModel):
    def load_context(self, context):
        config = dict(context.model_config or {})
        self.chat = GenAIChat(
            context.artifacts[ARTIFACT_KEY],
            int(config.get("intra_op_num_threads", 0)),
            int(config.get("max_batch_size", MAX_BATCH_SIZE)),
        )
        self.defaults = SearchOptions(
            max_new_tokens=int(config.get("max_new_tokens", 64)),
            temperature=float(config.get("temperature", 0.0)),
            do_sample=float(config.get("temperature", 0.0)) > 0,
        )
        self.max_prompts = int(config.get("max_prompts_per_request", MAX_PROMPTS_PER_REQUEST))
        self.max_total_new_tokens = int(config.get("max_total_new_tokens", MAX_TOTAL_NEW_TOKENS))

    def _check_caps(self, prompts: list, opts: SearchOptions) -> None:
        if len(prompts) > self.max_prompts:
            raise _invalid(
                f"max_prompts_per_request: the request has {len(prompts)} prompts; this model takes at most "
                f"{self.max_prompts} per request"
            )
        total = len(prompts) * opts.max_new_tokens
        if total > self.max_total_new_tokens:
            raise _invalid(
                f"max_total_new_tokens: the request asks for up to {total} new tokens ({len(prompts)} prompts x "
                f"max_new_tokens {opts.max_new_tokens}); this model generates at most {self.max_total_new_tokens} "
                "per request"
            )

    def _prompts(self, model_input) -> list:
        columns = getattr(model_input, "columns", None)
        if columns is not None:
            if "prompt" not in columns:
                raise _invalid("the input must have a 'prompt' field")
            cells = list(model_input["prompt"])
        elif isinstance(model_input, dict) and "prompt" in model_input:
            cells = [model_input["prompt"]]
        elif isinstance(model_input, str):
            cells = [model_input]
        else:
            raise _invalid("the input must have a 'prompt' field")
        # {"prompt": ["a", "b"]} arrives as one row holding a list: one answer per element.
        # With the chat fields beside it in the signature, MLflow hands that list over as an array.
        cells = [_plain(cell) if hasattr(cell, "tolist") and not isinstance(cell, str) else cell for cell in cells]
        prompts = [p for cell in cells for p in (list(cell) if isinstance(cell, list | tuple) else [cell])]
        if not prompts:
            raise _invalid("prompt: no prompts given")
        return prompts

    def _options(self, params) -> SearchOptions:
        try:
            return SearchOptions.from_params(params, self.defaults)
        except InvalidRequest as e:
            raise _invalid(str(e)) from None

    # -- the OpenAI chat contract ---------------------------------------------------------------

    def generation_request(self, request: protocol.ChatRequest, params: dict | None = None) -> GenerationRequest:
        """The batching loop's work for a checked chat request: the conversation through the chat template,
        the model's logged defaults where the request leaves a field out. Raises InvalidRequest."""
        # Through `mlflow models serve`, temperature and top_p arrive as params (the signature declares
        # them there for prompt requests); a field of the request itself wins.
        given = SearchOptions.from_params({k: v for k, v in (params or {}).items() if k in ("temperature", "top_p")},
                                          self.defaults)  # fmt: skip
        max_tokens = request.max_tokens or self.defaults.max_new_tokens
        temperature = given.temperature if request.temperature is None else request.temperature
        top_p = given.top_p if request.top_p is None else request.top_p
        ids = self.chat.encode_messages(request.messages)
        protocol.check_length(len(ids), max_tokens, self.chat.context_length)
        if request.guidance is not None:
            self.chat.check_guidance(request.guidance)
        return GenerationRequest(ids, max_tokens, temperature, top_p, request.stop, request.seed, request.guidance,
                                 request.logprobs)  # fmt: skip

    def _chat_rows(self, model_input) -> list[dict] | None:
        """The rows of a chat request (a dict, or the DataFrame MLflow's schema check makes of it), or
        None for a prompt request."""
        if isinstance(model_input, dict):
            return [model_input] if "messages" in model_input else None
        columns = getattr(model_input, "columns", None)
        if columns is None or "messages" not in columns:
            return None
        rows = []
        for row in model_input.to_dict(orient="records"):
            # Optional columns a row did not set arrive as None or NaN: the request left them out.
            row = {k: _plain(v) for k, v in row.items() if k != "prompt" and not _missing(v)}
            for k in ("max_tokens", "n"):
                # An integer column with a missing cell in another row turns float.
                if isinstance(row.get(k), float) and row[k].is_integer():
                    row[k] = int(row[k])
            rows.append(row)
        return rows

    # A DataFrame is what MLflow passes once the logged signature has checked the request (direct
    # calls may pass a dict). MLflow infers no schema from this hint, so it neither checks the input
    # a second way nor warns at class creation that predict has no type hints.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list:
        chat_rows = self._chat_rows(model_input)
        if chat_rows is not None:
            try:
                requests = [protocol.parse(r, self.chat.context_length) for r in chat_rows]
                for r in requests:
                    # One answer per row here; the OpenAI-compatible server answers these.
                    if r.n != 1:
                        raise InvalidRequest("n", "one choice per row here: python -m phi3mlflow.serve answers n > 1")
                    if r.logprobs is not None:
                        raise InvalidRequest("logprobs", "not here: python -m phi3mlflow.serve answers logprobs")
                generations = [self.generation_request(r, params) for r in requests]
            except InvalidRequest as e:
                raise _invalid(str(e)) from None
            if len(generations) > self.max_prompts:
                raise _invalid(f"max_prompts_per_request: {len(generations)} requests; at most {self.max_prompts}")
            with _generation_errors():
                return self._complete_all(generations, [r.model or "" for r in requests])
        opts = self._options(params)
        prompts = self._prompts(model_input)
        self._check_caps(prompts, opts)
        try:
            # Validate every prompt before generating any answer.
            ids = [self.chat.encode(p) for p in prompts]
        except InvalidRequest as e:
            raise _invalid(str(e)) from None
        # Several prompts decode together in batches whose greedy answers equal one-at-a-time ones.
        with _generation_errors():
            return self.chat.generate_many(ids, opts)

    def _complete_all(self, generations: list[GenerationRequest], models: list[str]) -> list[dict]:
        """One chat.completion per turn, through the batching loop (rows submitted together decode as
        one batch, with whatever else is in flight; one failing cancels the others)."""
        answers = self.chat.batcher.complete_all(generations)
        return [
            protocol.completion(name or MODEL_NAME, text, d.finish_reason, d.prompt_tokens, d.completion_tokens)
            for (text, d), name in zip(answers, models, strict=True)
        ]

    def predict_stream(self, context, model_input, params=None):
        opts = self._options(params)
        prompts = self._prompts(model_input)
        if len(prompts) != 1:
            raise _invalid(f"prompt: streaming takes exactly one prompt, got {len(prompts)}")
        self._check_caps(prompts, opts)
        try:
            ids = self.chat.encode(prompts[0])
        except InvalidRequest as e:
            raise _invalid(str(e)) from None
        yield from self.chat.stream_ids(ids, opts)


@contextmanager
def _generation_errors():
    """The batching loop's errors as the MlflowException `mlflow models serve` answers with the
    right status: Overloaded 503 (TEMPORARILY_UNAVAILABLE), a failed generation 500; it answers 400
    to any other exception, which would blame the request."""
    try:
        yield
    except Overloaded as e:
        raise MlflowException(f"the model is busy: {e}", error_code=TEMPORARILY_UNAVAILABLE) from None
    except RuntimeError as e:
        raise MlflowException(str(e)) from None


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _plain(value):
    """numpy scalars and arrays (what a DataFrame cell holds) as the JSON types the check expects."""
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


mlflow.models.set_model(OnnxChatModel())
