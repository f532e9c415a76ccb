"""serve: an OpenAI-compatible HTTP server for a logged model (phi3mlflow/serve/).

Inputs (flags, spelled like the MLproject parameters):
  --model_uri  the model to serve: models:/<name>@<alias> (default models:/phi3-chat@champion),
               models:/<name>/<version> or a wrapper run's model_uri tag (models:/m-...)
  --host       the address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)
  --port       the port (default 8080)
  --trace      true/false (default false): an MLflow trace per chat completion, linked to the model
Serves, until stopped: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health and
MLflow's POST /invocations. The same command line as ``python -m phi3mlflow.serve <model_uri>``.
Under ``mlflow run -e serve`` its run ends when the server stops: FINISHED on a clean stop, KILLED
(tag phi3.error ``cancelled by SIGTERM``) when stopped by a signal.
"""

from __future__ import annotations

from phi3mlflow.cli import launched_run_id, run_main
from phi3mlflow.serve import cli


def parse_args(argv=None):
    return cli.parse_args(argv, prog="serve", description=__doc__.split("\n", 1)[0])


def main(args) -> None:
    import mlflow

    run_id = launched_run_id()
    if run_id is None:  # run directly, not by mlflow run: no run of its own
        cli.serve_args(args)
        return
    # The run mlflow run made for this entry point ends when the server stops: FINISHED on a clean
    # stop; a SIGTERM/SIGINT (uvicorn shuts down, then raises it again) ends it KILLED in run_main,
    # since the launcher that would end it may be gone (a scheduler signals it first).
    with mlflow.start_run(run_id=run_id):
        cli.serve_args(args)


if __name__ == "__main__":
    run_main(main, parse_args)
