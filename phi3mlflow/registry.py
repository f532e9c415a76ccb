"""Model Registry logic for the register step: name checks, idempotent registration and the
alias gate."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from phi3mlflow.metrics import METRICS, better

EVAL_RUN_TAG = "source_eval_run"
_ALIAS = re.compile(r"^[A-Za-z_][\w-]*$")


class RegisterInputError(ValueError):
    """Bad register input; the message starts with the parameter's name."""


def check_names(name: str, alias: str, registry_uri: str) -> None:
    if not name.strip():
        raise RegisterInputError("registered_model_name: must not be empty")
    if registry_uri.startswith("databricks-uc") and len([p for p in name.split(".") if p]) != 3:
        raise RegisterInputError(
            f"registered_model_name: Unity Catalog needs a three-part name catalog.schema.model, got {name!r}"
        )
    if not _ALIAS.match(alias) or alias.lower() == "latest" or re.match(r"^v\d+$", alias, re.I):
        raise RegisterInputError(f"alias: {alias!r} is not a valid alias (letters, digits, _ and -; not latest or vN)")


@dataclass
class Decision:
    move: bool
    reason: str


def gate(
    summary: dict,
    min_accuracy: float,
    force: bool,
    current: dict | None,
) -> Decision:
    """Whether the alias moves to the evaluated winner.

    ``current`` holds the tags of the version the alias points to now (None when unset).
    """
    best = summary["models"][summary["best"]]
    metric = summary["metric"]
    if force:
        return Decision(True, "force=true")
    if best["accuracy"] < min_accuracy:
        return Decision(False, f"accuracy {best['accuracy']:.4g} is below min_accuracy {min_accuracy:.4g}")
    if current is None:
        return Decision(True, f"accuracy {best['accuracy']:.4g} >= min_accuracy and no version holds the alias")
    theirs = current.get(f"metric.{metric}")
    if theirs is None:
        return Decision(True, f"the current version records no {metric}; the gated winner replaces it")
    theirs = float(theirs)
    if better(metric, theirs, best[metric]):
        return Decision(False, f"{metric} {best[metric]:.4g} is worse than the current version's {theirs:.4g}")
    return Decision(True, f"{metric} {best[metric]:.4g} is at least as good as the current version's {theirs:.4g}")


def version_tags(summary: dict, eval_run_id: str, source_tags: dict, git_commit: str | None) -> dict:
    key = summary["best"]
    best = summary["models"][key]
    tags = {
        EVAL_RUN_TAG: eval_run_id,
        "wrapper": key,
        "precision": source_tags.get("precision", "fp32" if key == "chat" else "unknown"),
        "source_model": source_tags.get("source_model", ""),
        "selected_metric": summary["metric"],
        **{f"metric.{m}": f"{best[m]:.6g}" for m in METRICS if m in best},
    }
    if git_commit:
        tags["git_commit"] = git_commit
    return tags


def describe(summary: dict, tags: dict, eval_run_id: str) -> str:
    best = summary["models"][summary["best"]]
    what = {
        "chat": "transformers text-generation pipeline, OpenAI chat schema ({'messages': [...]} in)",
        "onnx": f"ONNX Runtime GenAI pyfunc, {tags['precision']} ({{'prompt': ...}} in, text out)",
    }[summary["best"]]
    return (
        f"{tags['source_model']} as a {what}. Won evaluation run {eval_run_id} on {summary['metric']}: "
        f"accuracy {best['accuracy']:.3f}, exact match {best['exact_match']:.3f}, "
        f"p50 latency {best['latency_p50_ms']:.1f} ms, {best['tokens_per_s']:.0f} tokens/s."
    )


def source_run_tags(client, model_uri: str) -> dict:
    """Tags of the run that logged ``model_uri`` (``models:/m-...`` or ``runs:/<id>/...``)."""
    from mlflow.exceptions import MlflowException

    try:
        if model_uri.startswith("models:/m-"):
            import mlflow

            run_id = mlflow.get_logged_model(model_uri.split("/")[1]).source_run_id
        elif model_uri.startswith("runs:/"):
            run_id = model_uri.split("/")[1]
        else:
            return {}
        return dict(client.get_run(run_id).data.tags)
    except MlflowException:
        return {}


def find_version(client, name: str, eval_run_id: str):
    """The version already registered from this evaluation run, if any (the newest)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tag.{EVAL_RUN_TAG} = '{eval_run_id}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def alias_tags(client, name: str, alias: str) -> tuple[str | None, dict | None]:
    from mlflow.exceptions import MlflowException

    try:
        v = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, None
    return v.version, dict(v.tags)


def settle_alias(client, name: str, alias: str, version: str, metric: str, tags: dict, rounds: int = 5) -> None:
    """Point ``alias`` at ``version`` and keep it consistent with a concurrent registration.

    Two registrations racing each read the alias, then write it; the later write could hide a
    better version. After writing, re-read: if another version now holds the alias and ours is
    strictly better on ``metric``, take it back; otherwise leave theirs.
    """
    client.set_registered_model_alias(name, alias, version)
    for _ in range(rounds):
        time.sleep(0.5)
        holder, holder_tags = alias_tags(client, name, alias)
        if holder in (None, version):
            return
        theirs = (holder_tags or {}).get(f"metric.{metric}")
        if theirs is None or not better(metric, float(tags[f"metric.{metric}"]), float(theirs)):
            return
        client.set_registered_model_alias(name, alias, version)
