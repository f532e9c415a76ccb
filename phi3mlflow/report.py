"""What the chain tells people: run names and descriptions for the MLflow UI, and main's last lines.

MLflow shows ``mlflow.runName`` in the run tree and ``mlflow.note.content`` as a run's description.
"""

from __future__ import annotations

import os

from phi3mlflow.summary import Summary

NOTE = "mlflow.note.content"
RUN_NAME = "mlflow.runName"


def name_and_note(name: str, note: str) -> None:
    """Name the active run and describe it in a sentence."""
    import mlflow

    mlflow.set_tags({RUN_NAME: name, NOTE: note})


def main_run_name(params_file: str, overrides: dict[str, str]) -> str:
    """``main <profile> k=v ...``: short enough for the UI's tree column."""
    profile = os.path.splitext(os.path.basename(params_file))[0]
    given = " ".join(f"{k}={v}" for k, v in overrides.items() if v != "")
    return f"main {profile} {given}".strip()[:120]


def verdict(summary: Summary) -> str:
    """Who won the evaluation and why, with the numbers; says so when latency broke a tie."""
    metric, models, best = summary.metric, summary.models, summary.best
    others = [k for k in models if k != best]
    if not others:
        return f"{best} alone: {metric} {models[best][metric]:.4g}"
    other = others[0]
    mine, theirs = models[best][metric], models[other][metric]
    if mine == theirs:
        return (
            f"{best} and {other} tie on {metric} ({mine:.4g}); decided by p50 latency "
            f"({models[best].latency_p50_ms:.0f} ms vs {models[other].latency_p50_ms:.0f} ms)"
        )
    return f"{best} wins on {metric}: {mine:.4g} vs {other} {theirs:.4g}"


def call_command(registered_model: str, alias: str, wrapper: str) -> list[str]:
    """How to serve and call ``models:/<name>@<alias>``, in the request format of its wrapper."""
    uri = f"models:/{registered_model}@{alias}"
    if wrapper == "chat":
        body = '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'
    else:
        body = '{"inputs": {"prompt": ["What is the capital of France?"]}, "params": {"max_new_tokens": 32}}'
    return [
        f'mlflow models serve -m "{uri}" --env-manager local --port 5001',
        f"curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d '{body}'",
    ]


def where_to_look(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page on a tracking server, or the light command that opens a local store's UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith("databricks"):
        return f"the run {run_id} in your Databricks workspace (experiment {experiment_id})"
    store = tracking_uri if "://" in tracking_uri or tracking_uri.startswith("sqlite:") else f"file:{tracking_uri}"
    return f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {store} --workers 1 (run {run_id})"
