"""pipeline_wrapper: log a transformers text-generation pipeline as an MLflow chat model.

Inputs (flags, spelled like the MLproject parameters):
  --model              builtin:tiny-phi3 (default, built offline), builtin:smollm2-135m-instruct,
                       gguf:<file>, a hub id, or a local HF folder
  --serve_max_new_tokens  default answer length logged into the model (requests may override it)
  --temperature        0 means greedy decoding
  --trust_remote_code  true/false, default false: run model code shipped with hub weights
Outputs:
  a logged model named ``chat_model`` (task ``llm/v1/chat``: OpenAI chat requests in,
  ``chat.completion`` objects out) and the run tag ``model_uri`` (``models:/<id>``) naming it.
Logged: the parameters, the model with its signature, input example and pinned requirements.
"""

from __future__ import annotations

from pathlib import Path

from phi3mlflow.cli import (
    StepParser,
    model_source,
    non_negative_float,
    positive_int,
    resolve_model_dir,
    run_main,
    true_false,
)
from phi3mlflow.tiny import BUILTIN_MODEL

INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]}


def parse_args(argv=None):
    p = StepParser(prog="pipeline_wrapper", description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", type=model_source, default=BUILTIN_MODEL)
    p.add_argument("--serve_max_new_tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0)
    p.add_argument("--trust_remote_code", type=true_false, default=False)
    return p.parse_args(argv)


def generation_config(max_new_tokens: int, temperature: float) -> dict:
    """The model_config the chat model generates with; temperature 0 means greedy."""
    if temperature == 0:
        return {"max_new_tokens": max_new_tokens, "do_sample": False}
    return {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature}


def main(args) -> str:
    import mlflow
    import transformers

    from phi3mlflow import report, tags
    from phi3mlflow.tracking import log_params_once, pinned

    source = resolve_model_dir(args.model)
    print(f"pipeline_wrapper: loading {args.model} ({source})", flush=True)
    pipe = transformers.pipeline(
        task="text-generation",
        model=source,
        trust_remote_code=args.trust_remote_code,
    )
    # The chat.completion "model" field and the model card report the model's name, never a local
    # path (a cache, a hub snapshot or the user's folder).
    local = args.model.startswith(("gguf:", "/", "~", ".")) or Path(args.model).is_dir()
    pipe.model.name_or_path = args.model.rstrip("/").rsplit("/", 1)[-1] if local else args.model
    with mlflow.start_run():
        log_params_once(vars(args))
        info = mlflow.transformers.log_model(
            transformers_model=pipe,
            name="chat_transformers",
            task="llm/v1/chat",
            model_config=generation_config(args.serve_max_new_tokens, args.temperature),
            input_example=INPUT_EXAMPLE,
            # Inferred requirements pull in torchvision, which fails beside the CPU torch.
            pip_requirements=pinned("mlflow", "torch", "transformers", "tokenizers"),
        )
        mlflow.set_tags({tags.MODEL_URI: info.model_uri, tags.WRAPPER: "chat", tags.SOURCE_MODEL: args.model})
        report.name_and_note(
            "pipeline_wrapper", f"Logged {args.model} as a transformers chat model (llm/v1/chat): {info.model_uri}."
        )
    print(f"pipeline_wrapper: logged {info.model_uri}", flush=True)
    return info.model_uri


if __name__ == "__main__":
    run_main(main, parse_args)
