"""Model Registry logic for the register step: name checks, idempotent registration and the alias
gate, which acts on the evaluation's own verdict (phi3mlflow/summary.py) and nothing stored elsewhere."""

from __future__ import annotations

import posixpath
import re
import time
from dataclasses import dataclass

from phi3mlflow import tags
from phi3mlflow.errors import InputError
from phi3mlflow.metrics import METRICS
from phi3mlflow.summary import Summary

EVAL_RUN_TAG = tags.SOURCE_EVAL_RUN
_ALIAS = re.compile(r"^[A-Za-z_][\w-]*$")
# Unity Catalog: each of catalog.schema.model non-empty, without spaces, dots, slashes or control characters.
_UC_PART = re.compile(r"^[^\s./\\:\x00-\x1f\x7f`]+$")


def stored(value: float) -> float:
    """A metric as a version tag keeps it: 6 significant digits."""
    return float(f"{value:.6g}")


def check_names(name: str, alias: str, registry_uri: str) -> None:
    """MLflow's and Unity Catalog's rules for registered model names, and the alias rules."""
    if not name.strip():
        raise InputError("registered_model_name", "must not be empty")
    if name != name.strip() or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InputError("registered_model_name", f"{name!r} has surrounding blanks or control characters")
    if registry_uri.startswith("databricks-uc"):
        parts = name.split(".")
        if len(parts) != 3 or not all(_UC_PART.match(p) for p in parts):
            raise InputError(
                "registered_model_name",
                f"Unity Catalog needs a three-part name catalog.schema.model without spaces or slashes, got {name!r}",
            )
    bad = [c for c in ("/", ":") if c in name]
    if bad:
        raise InputError("registered_model_name", f"{name!r} contains {' and '.join(map(repr, bad))}")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        raise InputError("registered_model_name", f"{name!r} is not a valid name (it would read as {norm!r})")
    if not _ALIAS.match(alias) or alias.lower() == "latest" or re.match(r"^v\d+$", alias, re.I):
        raise InputError("alias", f"{alias!r} is not a valid alias (letters, digits, _ and -; not latest or vN)")


def quoted(value: str) -> str | None:
    """``value`` as a string literal of MLflow's search filters, or None if it cannot be written as one.

    MLflow's filter parser does not unescape: a value with a single quote must be double-quoted,
    and one with both kinds of quote has no literal at all.
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


@dataclass
class Decision:
    move: bool
    reason: str


@dataclass
class Choice:
    """The candidate register promotes: evaluate's winner, and whether it meets the goals."""

    key: str
    passes: bool
    reason: str


def choose(summary: Summary) -> Choice:
    """The candidate evaluate chose (the best challenger that meets the goals), with the reason."""
    winner = summary[summary.winner]
    if not winner.meets_goals:
        return Choice(winner.key, False, "; ".join(c.missed for c in summary.candidates if c.missed))
    refused = [c.missed for c in summary.candidates if c.rank < winner.rank and c.missed]
    lead = f"{winner.key} is the best by {summary.metric} that meets the goals"
    return Choice(winner.key, True, lead + (f" ({'; '.join(refused)})" if refused else ""))


def gate(summary: Summary, choice: Choice, force: bool, holder: str | None) -> Decision:
    """Whether the alias moves to the chosen candidate, from the evaluation's own evidence.

    ``holder`` is the version the alias points to now. The evaluation asked the holder of its time
    (``summary.champion_version``) the same questions and decided (``summary.alias_should_move``);
    if the alias has moved since, that evidence is about another version and nothing moves. No
    metric stored by another run is read."""
    if force:
        return Decision(True, f"force=true (the evaluation's verdict: {summary.alias_reason or choice.reason})")
    if not choice.passes:
        return Decision(False, choice.reason)
    asked = summary.champion_version
    if holder != asked and not (holder is None and summary.champion_error):
        then = f"version {asked}" if asked else "no version"
        now = f"version {holder}" if holder else "no version"
        return Decision(False, f"the evaluation challenged {then}, but the alias now points to {now}: evaluate "
                               "again against it")  # fmt: skip
    return Decision(summary.alias_should_move, summary.alias_reason)


def version_tags(summary: Summary, key: str, eval_run_id: str, source_tags: dict, git_commit: str | None) -> dict:
    best = summary[key]
    out = {
        EVAL_RUN_TAG: eval_run_id,
        tags.CANDIDATE: key,
        tags.WRAPPER: best.wrapper,
        tags.PRECISION: best.precision,
        tags.SOURCE_MODEL: source_tags.get(tags.SOURCE_MODEL, ""),
        "selected_metric": summary.metric,
        **{f"metric.{m}": f"{stored(best[m]):.6g}" for m in METRICS},
    }
    if git_commit:
        out["git_commit"] = git_commit
    return out


def describe(summary: Summary, key: str, version_tags: dict, eval_run_id: str, name: str, version: str) -> str:
    """The version's description: what it is, how to call it, then where it came from and how it scored."""
    best = summary[key]
    uri = f"models:/{name}/{version}"
    kind = (
        "Transformers chat pipeline (llm/v1/chat)"
        if best.wrapper == "chat"
        else (f"ONNX Runtime GenAI pyfunc, {version_tags[tags.PRECISION]}")
    )
    lead = (
        f"{kind}: OpenAI chat requests in, chat.completion out. "
        f"""Call: mlflow.pyfunc.load_model("{uri}")"""
        """.predict({"messages": [{"role": "user", "content": "Hi"}]})."""
    )
    source = version_tags[tags.SOURCE_MODEL]
    if source.startswith(("/", "~", ".")) or source.startswith("gguf:"):
        source = source.rstrip("/").rsplit("/", 1)[-1]  # a local path says nothing to others
    return (
        f"{lead} Model: {source}. Won evaluation run {eval_run_id} on {summary.metric}: "
        f"accuracy {best.accuracy:.3f}, exact match {best.exact_match:.3f}, "
        f"{best.ms_per_question:.1f} ms per question, {best.tokens_per_s:.0f} tokens/s."
    )


def source_run_tags(client, model_uri: str) -> dict:
    """Tags of the run that logged ``model_uri`` (``models:/m-...`` or ``runs:/<id>/...``)."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow, off the fast path

    try:
        if model_uri.startswith("models:/m-"):
            import mlflow  # heavy: MLflow, off the fast path

            run_id = mlflow.get_logged_model(model_uri.split("/")[1]).source_run_id
        elif model_uri.startswith("runs:/"):
            run_id = model_uri.split("/")[1]
        else:
            return {}
        return dict(client.get_run(run_id).data.tags)
    except MlflowException:
        return {}


def find_version(client, name: str, eval_run_id: str, candidate: str | None = None):
    """The version already registered from this evaluation run for ``candidate``, if any (the newest)."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow, off the fast path

    literal = quoted(name)
    by_tag = f"tag.{EVAL_RUN_TAG} = {quoted(eval_run_id)}"
    try:
        found = client.search_model_versions(f"name = {literal} and {by_tag}" if literal else by_tag)
    except MlflowException:
        return None
    found = [v for v in found if v.name == name and (candidate is None or v.tags.get(tags.CANDIDATE) == candidate)]
    return max(found, key=lambda v: int(v.version)) if found else None


def find_version_of(client, name: str, model_uri: str):
    """The newest version of ``name`` whose source is ``model_uri``: one logged model is registered
    once, whichever evaluation chose it again."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow, off the fast path

    literal = quoted(name)
    if literal is None:
        return None
    try:
        found = client.search_model_versions(f"name = {literal}")
    except MlflowException:
        return None
    found = [v for v in found if v.name == name and v.source == model_uri]
    return max(found, key=lambda v: int(v.version)) if found else None


def alias_holder(client, name: str, alias: str) -> str | None:
    """``<version>:<its model URI>`` that ``name@alias`` points to, or None: what an evaluation that
    challenges the alias depends on (a version number alone can name another model once the
    registered model is deleted and made again)."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow, off the fast path

    try:
        v = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return f"{v.version}:{v.source}"


def alias_tags(client, name: str, alias: str) -> tuple[str | None, dict | None]:
    from mlflow.exceptions import MlflowException  # heavy: MLflow, off the fast path

    try:
        v = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, None
    return v.version, dict(v.tags)


def settle_alias(client, name: str, alias: str, version: str, expected: str | None) -> str:
    """Point ``alias`` at ``version`` unless a concurrent registration moved it first, and return
    what holds it afterwards.

    ``expected`` is the holder the decision was made against. Re-read just before writing: if
    another registration moved the alias meanwhile, the decision is about a version that no longer
    holds it, so ours is not written (that registration decided against the same champion from its
    own evaluation). Two writers that both read ``expected`` race; the SQL store makes one of them
    wait (set_alias), and the later write stands."""
    holder, _ = alias_tags(client, name, alias)
    if holder not in (expected, version):
        return holder or ""
    set_alias(client, name, alias, version)
    holder, _ = alias_tags(client, name, alias)
    return holder or ""


def set_alias(client, name: str, alias: str, version: str, tries: int = 5) -> None:
    """``set_registered_model_alias``, again when a concurrent write of the same alias made it fail.
    The SQL store writes an alias as select-then-insert, so of two registrations writing a new alias
    at once one hits the unique key and gets a 400 (BAD_REQUEST; a locked SQLite database is
    TEMPORARILY_UNAVAILABLE). Any other error, or the same one ``tries`` times, is raised."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow, off the fast path

    for attempt in range(tries):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as e:
            if attempt == tries - 1 or e.error_code not in ("BAD_REQUEST", "TEMPORARILY_UNAVAILABLE"):
                raise
            time.sleep(0.2 * (attempt + 1))
