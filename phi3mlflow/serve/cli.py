"""The server's one command line: ``python -m phi3mlflow.serve <model URI>`` and the MLproject's
``serve`` entry point (steps/serve.py, whose flags are spelled like its parameters) both parse
here. It loads the model with MLflow, builds the app around it and runs it under uvicorn."""

from __future__ import annotations

import argparse
import sys
import urllib.request

from phi3mlflow import tags
from phi3mlflow.cli import StepParser, positive_int, true_false
from phi3mlflow.errors import InputError
from phi3mlflow.serve import auth
from phi3mlflow.serve.backends import backend_for
from phi3mlflow.serve.limits import HEADER_TIMEOUT_S, MAX_BODY_BYTES, header_timeout_protocol
from phi3mlflow.serve.options import Options
from phi3mlflow.serve.slot import Follower, ModelInfo, ModelSlot, Served, map_large_allocations
from phi3mlflow.serve.tracing import RequestTrace, link_to_model, traced

DEFAULT_MODEL_URI = "models:/phi3-chat@champion"
LOOPBACK = "127.0.0.1"  # where the server listens unless --host says otherwise
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
    p.add_argument("--host", default=LOOPBACK, help=f"the address to listen on (default {LOOPBACK}, this machine "
                   "only; 0.0.0.0: every interface)")  # fmt: skip
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
    p.add_argument("--api-key", "--api_key", dest="api_key", default=None,
                   help=f"require Authorization: Bearer <key> on /v1 and /invocations (or ${auth.ENV_KEY}); "
                   "a key on the command line shows in the process list: prefer --api-key-file")  # fmt: skip
    p.add_argument("--api-key-file", "--api_key_file", dest="api_key_file", default=None,
                   help=f"the same, the key read from this file (or ${auth.ENV_KEY_FILE})")  # fmt: skip
    p.add_argument("--follow-interval", "--follow_interval", dest="follow_interval", type=non_negative_float,
                   default=FOLLOW_INTERVAL_S, help="for models:/<name>@<alias>: seconds between checks of which "
                   f"version holds the alias, swapping to it without failing a request (default {FOLLOW_INTERVAL_S:g}; "
                   "0: never)")  # fmt: skip
    p.add_argument("--cors-origin", "--cors_origin", dest="cors_origin", action="append", default=[],
                   help="an origin browsers may call from (repeatable; none by default)")  # fmt: skip
    p.add_argument("--metrics", type=true_false, nargs="?", const=True, default=True,
                   help="true/false: GET /metrics in Prometheus text format (default true)")  # fmt: skip
    p.add_argument("--prompt-cache", "--prompt_cache", dest="prompt_cache", type=true_false, nargs="?", const=True,
                   default=True, help="true/false: the ONNX model keeps the KV cache of recent prompts, so that a "
                   "request repeating a prompt's start (a system prompt, a chat's earlier turns) computes only the "
                   "rest; answers are unchanged (default true)")  # fmt: skip
    return p


def parse_args(argv=None, prog: str = "python -m phi3mlflow.serve", description: str | None = None):
    args = parser(prog, description).parse_args(argv)
    args.model_uri = args.model_uri_flag or args.model_uri or DEFAULT_MODEL_URI
    return args


def _finite(value: str, zero_ok: bool) -> float:
    """A finite number > 0 (>= 0 with ``zero_ok``), as an argparse type."""
    bound = ">= 0" if zero_ok else "> 0"
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {bound}, got {value!r}") from None
    if not (0 <= x if zero_ok else 0 < x) or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return x


def positive_float(value: str) -> float:
    return _finite(value, zero_ok=False)


def non_negative_float(value: str) -> float:
    return _finite(value, zero_ok=True)


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


# How often the server asks the registry which version holds the alias it serves (--follow-interval).
FOLLOW_INTERVAL_S = 30.0


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """(registered name, version, alias) of a ``models:/`` URI; empty where it names none."""
    if not uri.startswith("models:/"):
        return "", "", ""
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, "", alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version, ""
    return "", "", ""  # models:/m-...: a logged model, no registry name


def resolve(model_uri: str, model_name: str = "") -> ModelInfo:
    """What ``model_uri`` names now: for a registry URI, the version (the alias's holder), its
    logged model and the evaluation run that promoted it."""
    import mlflow  # heavy: MLflow, imported with the model

    shown = model_name or model_uri
    name, version, alias = parse_model_uri(model_uri)
    if not name:
        model_id = model_uri[len("models:/") :].strip("/") if model_uri.startswith("models:/m-") else ""
        return ModelInfo(shown, model_uri, model_id=model_id)
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as e:  # noqa: BLE001 - any failure to resolve is the URI's
        raise InputError("model_uri", f"cannot load {model_uri!r}: {_first_line(e)}") from None
    return ModelInfo(shown, model_uri, name, str(mv.version), alias, getattr(mv, "model_id", None) or "",
                     (mv.tags or {}).get(tags.SOURCE_EVAL_RUN, ""))  # fmt: skip


def load(info: ModelInfo, trace: bool = False, prompt_cache: bool = True) -> Served:
    """The model ``info`` names, loaded (a registry URI by its version, so what is served is what
    ``info`` says), its backend and MLflow's scoring app for it."""
    import mlflow  # heavy: MLflow, imported with the model
    from mlflow.pyfunc import scoring_server  # heavy: as above

    uri = f"models:/{info.name}/{info.version}" if info.version else info.uri
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as e:  # noqa: BLE001 - any failure to load is the URI's
        raise InputError("model_uri", f"cannot load {uri!r}: {_first_line(e)}") from None
    if trace:
        link_to_model(model)
    return Served(info, backend_for(model, prompt_cache), scoring_server.init(model))


def build_app(served: Served, trace: bool = False, options: Options | None = None, follow_interval: float = 0.0,
              prompt_cache: bool = True):  # fmt: skip
    """The app around a loaded model: the OpenAI routes, MLflow's scoring app behind them, ``trace``
    (an MLflow trace per chat completion, linked to the model), and, for ``models:/<name>@<alias>``
    with ``follow_interval`` > 0, the follower that swaps to the alias's next holder."""
    from phi3mlflow.serve.app import create_app  # heavy: FastAPI

    slot = ModelSlot(served, log=lambda line: print(line, flush=True))
    wrap = None
    if trace:

        def wrap(body, events):
            return traced(events, RequestTrace(body, slot.current.backend.wrapper))

    follower = None
    if follow_interval > 0 and served.info.alias:
        shown = served.info.id
        follower = Follower(slot, follow_interval, lambda name, alias: resolve(f"models:/{name}@{alias}", shown),
                            lambda info: load(info, trace, prompt_cache))  # fmt: skip
    return create_app(slot, served.info.id, trace=wrap, options=options or Options(), follower=follower)


def serve(model_uri: str, host: str | None, port: int, model_name: str = "", trace: bool = False,
          header_timeout: float = HEADER_TIMEOUT_S, options: Options | None = None,
          follow_interval: float = FOLLOW_INTERVAL_S, prompt_cache: bool = True) -> None:  # fmt: skip
    import uvicorn  # heavy: the web server

    options = options or Options()
    # Before the model loads: linking it to a tracking server that does not answer would retry for minutes.
    if trace and (unreachable := tracking_unreachable()):
        print(f"serve: tracing off: {unreachable}", flush=True)
        trace = False
    if follow_interval > 0:
        map_large_allocations()  # so that a swapped-out version's memory goes back
    served = load(resolve(model_uri, model_name), trace, prompt_cache)
    app = build_app(served, trace, options, follow_interval, prompt_cache)
    following = f", following @{served.info.alias} every {follow_interval:g} s" if app.state.follower else ""
    listen = host or LOOPBACK
    print(f"serving {model_uri} ({served.info.fingerprint}, {served.backend.wrapper} wrapper{following}) on "
          f"http://{listen}:{port}/v1", flush=True)  # fmt: skip
    if not options.api_key:
        reach = "this machine only" if listen in (LOOPBACK, "localhost", "::1") else f"anyone who can reach {listen}"
        print(f"serve: no API key (--api-key, --api-key-file or ${auth.ENV_KEY}): unauthenticated, open to {reach}",
              flush=True)  # fmt: skip
    uvicorn.run(app, host=listen, port=port, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                http=header_timeout_protocol(header_timeout))  # fmt: skip


def serve_args(args) -> None:
    """``serve`` with parsed arguments (this module's parser)."""
    options = Options(args.max_body_bytes, auth.api_key(args.api_key, args.api_key_file), tuple(args.cors_origin),
                      args.metrics)  # fmt: skip
    serve(args.model_uri, args.host, args.port, args.model_name, args.trace, args.header_timeout, options,
          args.follow_interval, args.prompt_cache)  # fmt: skip


def main(argv=None, prog: str = "python -m phi3mlflow.serve", description: str | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv, prog, description)
    try:
        serve_args(args)
    except InputError as e:
        sys.exit(f"error: {e}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
