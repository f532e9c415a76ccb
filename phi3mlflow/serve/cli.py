"""The server's one command line: ``python -m phi3mlflow.serve <model URI>`` and the MLproject's
``serve`` entry point (steps/serve.py, whose flags are spelled like its parameters) both parse
here. It loads the model with MLflow, builds the app around it and runs it under uvicorn."""

from __future__ import annotations

import argparse
import sys
import urllib.request

from phi3mlflow.cli import StepParser, positive_int, true_false
from phi3mlflow.errors import InputError
from phi3mlflow.serve.backends import backend_for
from phi3mlflow.serve.limits import HEADER_TIMEOUT_S, MAX_BODY_BYTES, header_timeout_protocol
from phi3mlflow.serve.tracing import RequestTrace, link_to_model, traced

DEFAULT_MODEL_URI = "models:/phi3-chat@champion"
# On SIGTERM, how long requests in progress may go on before they are cancelled: a stream may
# have thousands of tokens to go, and an orchestrator kills the process after its own grace period.
GRACEFUL_SHUTDOWN_S = 5


def parser(prog: str = "python -m phi3mlflow.serve", description: str | None = None) -> argparse.ArgumentParser:
    p = StepParser(prog=prog, description=description or "An OpenAI-compatible server for a logged model.")
    p.add_argument("model_uri", nargs="?", default=None,
                   help=f"models:/<name>@<alias> (default {DEFAULT_MODEL_URI}), models:/<name>/<version>, "
                        "models:/m-..., runs:/...")  # fmt: skip
    p.add_argument("--model_uri", "--model-uri", dest="model_uri_flag", default=None,
                   help="the same as the positional model_uri (the MLproject's spelling)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive_int, default=8080)
    p.add_argument("--model_name", "--model-name", default="", help="the id /v1/models reports (default: the URI)")
    p.add_argument("--trace", type=true_false, nargs="?", const=True, default=False,
                   help="true/false: an MLflow trace per chat completion (off by default)")  # fmt: skip
    p.add_argument("--max-body-bytes", "--max_body_bytes", dest="max_body_bytes", type=positive_int,
                   default=MAX_BODY_BYTES, help=f"the largest request body, in bytes (default {MAX_BODY_BYTES}): "
                   "a larger one is a 413")  # fmt: skip
    p.add_argument("--header-timeout", "--header_timeout", dest="header_timeout", type=positive_float,
                   default=HEADER_TIMEOUT_S, help="seconds a connection may take to send its request headers "
                   f"(default {HEADER_TIMEOUT_S:g}); a slower one is closed")  # fmt: skip
    return p


def parse_args(argv=None, prog: str = "python -m phi3mlflow.serve", description: str | None = None):
    args = parser(prog, description).parse_args(argv)
    args.model_uri = args.model_uri_flag or args.model_uri or DEFAULT_MODEL_URI
    return args


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return x


def tracking_unreachable(timeout_s: float = 3.0) -> str:
    """Why traces could not be stored now (a tracking server that does not answer), or "". MLflow
    would retry for minutes before the server listens; the server serves untraced instead."""
    import mlflow  # heavy: MLflow, imported with the model

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return ""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return ""
    except OSError as e:
        return f"the tracking server {uri} does not answer ({' '.join(str(e).split())[:120]})"


def build_app(pyfunc_model, model_name: str, trace: bool = False, max_body_bytes: int = MAX_BODY_BYTES):
    """The app for a loaded pyfunc: the OpenAI routes, MLflow's scoring app behind them, and
    ``trace``: an MLflow trace per chat completion, linked to the model."""
    from mlflow.pyfunc import scoring_server  # heavy: MLflow, imported with the model

    from phi3mlflow.serve.app import create_app  # heavy: FastAPI

    backend = backend_for(pyfunc_model)
    wrap = None
    if trace and (unreachable := tracking_unreachable()):
        print(f"serve: tracing off: {unreachable}", flush=True)
        trace = False
    if trace:
        link_to_model(pyfunc_model)

        def wrap(body, events):
            return traced(events, RequestTrace(body, backend.wrapper))

    return create_app(backend, model_name, scoring_server.init(pyfunc_model), wrap, max_body_bytes)


def serve(model_uri: str, host: str, port: int, model_name: str = "", trace: bool = False,
          max_body_bytes: int = MAX_BODY_BYTES, header_timeout: float = HEADER_TIMEOUT_S) -> None:  # fmt: skip
    import mlflow  # heavy: every import below loads a model or a web server
    import uvicorn  # heavy: as above

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # noqa: BLE001 - any failure to load is the URI's
        raise InputError("model_uri", f"cannot load {model_uri!r}: {str(e).strip().splitlines()[0][:300]}") from None
    app = build_app(model, model_name or model_uri, trace, max_body_bytes)
    print(f"serving {model_uri} ({app.state.backend.wrapper} wrapper) on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                http=header_timeout_protocol(header_timeout))  # fmt: skip


def main(argv=None, prog: str = "python -m phi3mlflow.serve", description: str | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv, prog, description)
    try:
        serve(args.model_uri, args.host, args.port, args.model_name, args.trace, args.max_body_bytes,
              args.header_timeout)  # fmt: skip
    except InputError as e:
        sys.exit(f"error: {e}")
