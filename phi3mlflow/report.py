"""What the chain tells people: run names and descriptions for the MLflow UI, and main's last lines.

MLflow shows ``mlflow.runName`` in the run tree and ``mlflow.note.content`` as a run's description.
"""

from __future__ import annotations

import json
import os

NOTE = "mlflow.note.content"
RUN_NAME = "mlflow.runName"


def name_and_note(name: str, note: str) -> None:
    """Name the active run and describe it in a sentence."""
    import mlflow  # heavy: MLflow, off the fast path

    mlflow.set_tags({RUN_NAME: name, NOTE: note})


def main_run_name(params_file: str, overrides: dict[str, str]) -> str:
    """``main <profile> k=v ...``: short enough for the UI's tree column."""
    profile = os.path.splitext(os.path.basename(params_file))[0]
    given = " ".join(f"{k}={v}" for k, v in overrides.items() if v != "")
    return f"main {profile} {given}".strip()[:120]


# The question the printed call asks: one of the bundled set (the tiny model answers it) and of the real
# set, to which every SmolLM2-135M candidate of the measured chain, champion included, answered "The
# capital of Germany is Berlin." (bench/README.md).
CALL_QUESTION = "What is the capital of Germany?"


def call_command(registered_model: str, alias: str) -> list[str]:
    """How to serve and call ``models:/<name>@<alias>``: one OpenAI chat request, whichever wrapper holds it."""
    uri = f"models:/{registered_model}@{alias}"
    body = json.dumps({"messages": [{"role": "user", "content": CALL_QUESTION}], "max_tokens": 32})
    return [
        f'mlflow models serve -m "{uri}" --env-manager local --port 5001',
        f"curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d '{body}'",
        f'python -m phi3mlflow.serve "{uri}" --port 8080  # OpenAI-compatible: /v1/chat/completions, streaming',
    ]


def where_to_look(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page on a tracking server, or the light command that opens a local store's UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith("databricks"):
        return f"the run {run_id} in your Databricks workspace (experiment {experiment_id})"
    store = tracking_uri if "://" in tracking_uri or tracking_uri.startswith("sqlite:") else f"file:{tracking_uri}"
    return f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {store} --workers 1 (run {run_id})"
