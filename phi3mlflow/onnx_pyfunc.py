"""The ONNX chat model as an MLflow pyfunc, logged as code (models-from-code): nothing is pickled.

``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"onnx_model": <ORT GenAI folder>},
code_paths=[<the phi3mlflow package>], model_config={...})``. Loading runs this file, which
hands MLflow an ``OnnxChatModel`` through ``mlflow.models.set_model``.

Input: a ``prompt`` column (one answer per row); params ``max_new_tokens``, ``temperature``,
``top_p``, ``do_sample``. A plain prompt gets the model's chat template; a prompt that already
carries the template's markers is passed through. Output: one string per prompt.
model_config: ``intra_op_num_threads`` (0, the default, means all available cores), the
default search options, and the caps on one request's work: ``max_prompts_per_request`` and
``max_total_new_tokens`` (prompts x max_new_tokens); a request beyond them is refused (400).
"""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from phi3mlflow.genai import MAX_PROMPTS_PER_REQUEST, MAX_TOTAL_NEW_TOKENS, GenAIChat, InvalidRequest, SearchOptions

ARTIFACT_KEY = "onnx_model"


def _invalid(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes `mlflow models serve` answer 400 rather than 500.
    return MlflowException.invalid_parameter_value(message)


class OnnxChatModel(PythonModel):
    def load_context(self, context):
        config = dict(context.model_config or {})
        self.chat = GenAIChat(context.artifacts[ARTIFACT_KEY], int(config.get("intra_op_num_threads", 0)))
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
        prompts = [p for cell in cells for p in (list(cell) if isinstance(cell, list | tuple) else [cell])]
        if not prompts:
            raise _invalid("prompt: no prompts given")
        return prompts

    def _options(self, params) -> SearchOptions:
        try:
            return SearchOptions.from_params(params, self.defaults)
        except InvalidRequest as e:
            raise _invalid(str(e)) from None

    def predict(self, context, model_input, params=None) -> list[str]:
        opts = self._options(params)
        prompts = self._prompts(model_input)
        self._check_caps(prompts, opts)
        try:
            # Validate every prompt before generating any answer.
            ids = [self.chat.encode(p) for p in prompts]
        except InvalidRequest as e:
            raise _invalid(str(e)) from None
        return [self.chat.tokenizer.decode(self.chat.generate_ids(x, opts)) for x in ids]

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


mlflow.models.set_model(OnnxChatModel())
