"""serve: an OpenAI-compatible HTTP server for a logged model (phi3mlflow/serve/).

Inputs (flags, spelled like the MLproject parameters):
  --model_uri  the model to serve: models:/<name>@<alias> (default models:/phi3-chat@champion),
               models:/<name>/<version> or a wrapper run's model_uri tag (models:/m-...)
  --host       the address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)
  --port       the port (default 8080)
  --trace      true/false (default false): an MLflow trace per chat completion, linked to the model
Serves, until stopped: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health and
MLflow's POST /invocations. The same command line as ``python -m phi3mlflow.serve <model_uri>``.
"""

from __future__ import annotations

from phi3mlflow.cli import run_main
from phi3mlflow.serve import cli


def parse_args(argv=None):
    return cli.parse_args(argv, prog="serve", description=__doc__.split("\n", 1)[0])


def main(args) -> None:
    cli.serve_args(args)


if __name__ == "__main__":
    run_main(main, parse_args)
