"""serve: an OpenAI-compatible HTTP server for a logged model (phi3mlflow/serve.py).

Inputs (flags, spelled like the MLproject parameters):
  --model_uri  the model to serve: models:/<name>@<alias> (default models:/phi3-chat@champion),
               models:/<name>/<version> or a wrapper run's model_uri tag (models:/m-...)
  --host       the address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)
  --port       the port (default 8080)
  --trace      true/false (default false): an MLflow trace per chat completion, linked to the model
Serves, until stopped: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health and
MLflow's POST /invocations. Same as ``python -m phi3mlflow.serve <model_uri> --port <port>``.
"""

from __future__ import annotations

from phi3mlflow.cli import StepParser, positive_int, run_main, true_false

DEFAULT_MODEL_URI = "models:/phi3-chat@champion"


def parse_args(argv=None):
    p = StepParser(prog="serve", description=__doc__.split("\n", 1)[0])
    p.add_argument("--model_uri", default=DEFAULT_MODEL_URI)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=positive_int, default=8080)
    p.add_argument("--trace", type=true_false, default=False)
    return p.parse_args(argv)


def main(args) -> None:
    from phi3mlflow.serve import serve

    serve(args.model_uri, args.host, args.port, trace=args.trace)


if __name__ == "__main__":
    run_main(main, parse_args)
