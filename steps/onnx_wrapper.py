"""onnx_wrapper: log the model's ONNX Runtime GenAI export as a pickle-free MLflow pyfunc.

Inputs (flags, spelled like the MLproject parameters):
  --model           builtin:tiny-phi3 (default), builtin:smollm2-135m-instruct, gguf:<file>, a hub
                    id, or a local HF folder; exported with onnxruntime-genai's model builder
                    (cached per source content and precision)
  --precision       fp32, int8 or int4 (default): the builder's weight precision
  --onnx_model_dir  an existing ORT GenAI folder (with genai_config.json); when set, no export runs
  --serve_max_new_tokens  default answer length logged into the model (requests may override it)
  --temperature     default temperature; 0 means greedy
  --max_prompts_per_request, --max_total_new_tokens
                    caps on one request's work (prompts; prompts x max_new_tokens), so one
                    request cannot hold a server past its timeout; beyond them: a 400
Outputs:
  a logged model named ``onnx_<precision>`` (OpenAI chat requests in, ``chat.completion`` objects out,
  like the transformers chat model; and {"prompt": ...} in, text out; models-from-code, no
  pickle) and the run tag ``model_uri`` (``models:/<id>``) naming it.
Logged: the parameters, tags wrapper/precision/source_model, the model with its ONNX folder as an
artifact (of a prebuilt folder only what a model needs: the files its genai_config.json names, the
tokenizer and config files; never hidden files or anything else), its signature (with params),
input example and pinned requirements (no torch).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

from phi3mlflow import prebuilt
from phi3mlflow.cli import StepParser, fail, model_source, non_negative_float, positive_int, resolve_model_dir, run_main
from phi3mlflow.deps import stage_package
from phi3mlflow.genai import MAX_PROMPTS_PER_REQUEST, MAX_TOTAL_NEW_TOKENS
from phi3mlflow.onnx_export import PRECISIONS
from phi3mlflow.tiny import BUILTIN_MODEL

INPUT_EXAMPLE = {"prompt": "What is the capital of Spain?"}


def genai_folder(value: str) -> str:
    """Validate ``--onnx_model_dir``: empty (export) or an ORT GenAI model folder."""
    if not value.strip():
        return ""
    path = Path(value).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {value}")
    if not (path / "genai_config.json").is_file():
        raise argparse.ArgumentTypeError(f"{value} has no genai_config.json (not an ONNX Runtime GenAI model folder)")
    return str(path.resolve())


def parse_args(argv=None):
    p = StepParser(prog="onnx_wrapper", description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", type=model_source, default=BUILTIN_MODEL)
    p.add_argument("--precision", choices=PRECISIONS, default="int4")
    p.add_argument("--onnx_model_dir", type=genai_folder, default="")
    p.add_argument("--serve_max_new_tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0)
    p.add_argument("--max_prompts_per_request", type=positive_int, default=MAX_PROMPTS_PER_REQUEST)
    p.add_argument("--max_total_new_tokens", type=positive_int, default=MAX_TOTAL_NEW_TOKENS)
    return p.parse_args(argv)


def signature(max_new_tokens: int, temperature: float):
    """Either input, all optional: a prompt column (one string out per prompt), or an OpenAI chat
    request's fields (one chat.completion out); and the generation params with the logged defaults.
    temperature and top_p are params, so `mlflow models serve` passes a chat request's fields of
    those names there (the model reads them from either place)."""
    from mlflow.models import infer_signature
    from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": 1.0, "do_sample": temperature > 0}
    inferred = infer_signature(INPUT_EXAMPLE, ["The capital of Spain is Madrid."], params=params)
    message = Object([Property("role", DataType.string), Property("content", DataType.string)])
    inferred.inputs = Schema(
        [
            ColSpec(DataType.string, "prompt", required=False),
            ColSpec(Array(message), "messages", required=False),
            ColSpec(DataType.long, "max_tokens", required=False),
            ColSpec(Array(DataType.string), "stop", required=False),
            ColSpec(DataType.long, "n", required=False),
            ColSpec(DataType.boolean, "stream", required=False),
        ]
    )
    return inferred


def main(args) -> str:
    from phi3mlflow.genai import GenAIChat, SearchOptions
    from phi3mlflow.onnx_export import export

    with contextlib.ExitStack() as cleanup:
        if args.onnx_model_dir:
            precision = "prebuilt"
            # Only what a model needs leaves the user's folder: the files genai_config.json names,
            # the tokenizer and configs; never .git/, .cache/ or notes (phi3mlflow/prebuilt.py).
            files = prebuilt.model_files(Path(args.onnx_model_dir))
            staged_model = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="phi3-onnx-")))
            folder = str(prebuilt.stage(Path(args.onnx_model_dir), files, staged_model))
            print(f"onnx_wrapper: using {len(files)} files of the prebuilt ORT GenAI folder {args.onnx_model_dir}: "
                  f"{', '.join(files)}", flush=True)  # fmt: skip
        else:
            folder, precision = str(export(resolve_model_dir(args.model), args.precision)), args.precision
        try:
            # MLflow only warns when the input example fails; a folder that cannot answer must fail here.
            # A prebuilt folder is checked as staged: the selected files alone must answer.
            GenAIChat(folder).generate(INPUT_EXAMPLE["prompt"], SearchOptions(max_new_tokens=1))
        except Exception as e:  # noqa: BLE001 - ORT GenAI raises plain RuntimeErrors
            parameter, source = ("onnx_model_dir", args.onnx_model_dir) if args.onnx_model_dir else ("model", folder)
            fail(parameter, f"{source} does not run in onnxruntime-genai: {e}")
        return _log(args, folder, precision)


def _log(args, folder: str, precision: str) -> str:
    """Log ``folder`` as the ONNX pyfunc in a run of its own; the model's URI."""
    import mlflow

    from phi3mlflow import report, tags
    from phi3mlflow.onnx_export import log_path
    from phi3mlflow.tracking import log_params_once, pinned

    with mlflow.start_run(), tempfile.TemporaryDirectory(prefix="phi3-code-") as staged:
        log_params_once(vars(args))
        # Only the package files the pyfunc imports travel with the model: no stray or ignored file.
        code = stage_package(("phi3mlflow/onnx_pyfunc.py",), Path(staged))
        info = mlflow.pyfunc.log_model(
            name=f"onnx_{precision}",
            python_model=str(code / "onnx_pyfunc.py"),
            artifacts={"onnx_model": str(folder)},
            code_paths=[str(code)],
            model_config={
                "intra_op_num_threads": 0,
                "max_new_tokens": args.serve_max_new_tokens,
                "temperature": args.temperature,
                "max_prompts_per_request": args.max_prompts_per_request,
                "max_total_new_tokens": args.max_total_new_tokens,
            },
            signature=signature(args.serve_max_new_tokens, args.temperature),
            input_example=INPUT_EXAMPLE,
            # Serving needs onnxruntime-genai, not torch.
            pip_requirements=pinned("mlflow", "onnxruntime-genai"),
        )
        mlflow.set_tags(
            {
                tags.MODEL_URI: info.model_uri,
                tags.WRAPPER: "onnx",
                tags.PRECISION: precision,
                tags.SOURCE_MODEL: args.onnx_model_dir or args.model,
            }
        )
        if not args.onnx_model_dir and log_path(Path(folder)).is_file():
            mlflow.log_artifact(str(log_path(Path(folder))), "onnx_export")
        source = "a prebuilt ORT GenAI folder" if args.onnx_model_dir else f"{args.model} exported at {precision}"
        report.name_and_note(f"onnx_wrapper {precision}", f"Logged {source} as an ONNX pyfunc: {info.model_uri}.")
    print(f"onnx_wrapper: logged {info.model_uri}", flush=True)
    return info.model_uri


if __name__ == "__main__":
    run_main(main, parse_args)
