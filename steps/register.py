"""register: the evaluated winner into the Model Registry, behind an alias.

Inputs (flags, spelled like the MLproject parameters):
  --eval_run_id            the evaluate run whose summary.json names the winner
  --registered_model_name  the registered model (three-part catalog.schema.model on Unity Catalog)
  --alias                  the alias to move (default champion)
  --force                  true/false: move the alias regardless of the goals and the current holder
Outputs:
  a model version of summary.json's winner - the best challenger that meets evaluate's goals, else
  the best (then the alias stays) - with tags source_eval_run, candidate, wrapper, precision,
  source_model, git_commit, metric.* and a description; one logged model is registered once (an
  evaluation that chooses it again finds its version), and not at all when the winner is the
  alias's current version itself.
  The alias moves as the evaluation decided from its own answers (summary.json's verdict): when the
  winner is significantly better than the champion it asked, or tied with it and faster by more
  than the tie margin in that run. If the alias has moved since the evaluation, nothing moves (the
  evidence is about another version). No metric stored by another run is read.
Logged: run tags registered_model, registered_version, winner, alias_moved (true/false),
alias_reason, champion_version (the alias's holder when the step ended).
This step has side effects on the registry: main never reuses an earlier run of it.
"""

from __future__ import annotations

from mlflow.entities import Run

from phi3mlflow.cli import StepParser, fail, run_main, true_false
from phi3mlflow.summary import Summary


def parse_args(argv=None):
    p = StepParser(prog="register", description=__doc__.split("\n", 1)[0])
    p.add_argument("--eval_run_id", required=True)
    p.add_argument("--registered_model_name", default="phi3-chat")
    p.add_argument("--alias", default="champion")
    p.add_argument("--force", type=true_false, default=False)
    return p.parse_args(argv)


def _load_summary(client, eval_run_id: str) -> tuple[Summary, Run]:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(eval_run_id)
    except MlflowException:
        fail("eval_run_id", f"no run {eval_run_id!r} on {mlflow.get_tracking_uri()}")
    if run.info.status != "FINISHED":
        fail("eval_run_id", f"run {eval_run_id} is {run.info.status}, not FINISHED")
    try:
        found = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/summary.json")
    except (MlflowException, OSError, ValueError):
        fail("eval_run_id", f"run {eval_run_id} has no summary.json: is it an evaluate run?")
    try:
        return Summary.from_dict(found), run
    except (KeyError, TypeError):
        fail("eval_run_id", f"run {eval_run_id}'s summary.json is not a ranked list of candidates: run evaluate again")


def main(args) -> dict:
    import mlflow

    from phi3mlflow import registry, report, tags
    from phi3mlflow.tracking import log_params_once

    registry.check_names(args.registered_model_name, args.alias, mlflow.get_registry_uri())
    if not args.eval_run_id.strip():
        fail("eval_run_id", "must not be empty")
    client = mlflow.MlflowClient()
    summary, eval_run = _load_summary(client, args.eval_run_id)
    choice = registry.choose(summary)
    name, winner = args.registered_model_name, summary.models[choice.key]
    print(f"register: candidate {choice.key}: {choice.reason}", flush=True)

    with mlflow.start_run():
        log_params_once(vars(args))
        existing = registry.find_version(client, name, args.eval_run_id, choice.key) or registry.find_version_of(
            client, name, winner.model_uri
        )
        if summary.champion == choice.key and summary.champion_version:
            version = summary.champion_version
            print(f"register: {choice.key} is version {version} of {name} already (the alias's holder)", flush=True)
        elif existing is not None:
            version = existing.version
            print(f"register: {winner.model_uri} is already version {version} of {name}", flush=True)
        else:
            version_tags = registry.version_tags(
                summary,
                choice.key,
                args.eval_run_id,
                registry.source_run_tags(client, winner.model_uri),
                eval_run.data.tags.get("mlflow.source.git.commit"),
            )
            mv = mlflow.register_model(winner.model_uri, name, tags=version_tags)
            version = mv.version
            client.update_model_version(
                name, version, registry.describe(summary, choice.key, version_tags, args.eval_run_id, name, version)
            )
            print(f"register: registered {winner.model_uri} as {name} version {version}", flush=True)

        holder, _ = registry.alias_tags(client, name, args.alias)
        if holder == version:
            # Said when the holder itself now misses the goals: an operator must hear of it.
            missed = "" if choice.passes else f", which now misses the goals: {choice.reason}"
            decision = registry.Decision(False, f"@{args.alias} already points to version {version}{missed}")
        else:
            decision = registry.gate(summary, choice, args.force, holder)
        champion = holder or ""
        if decision.move:
            champion = registry.settle_alias(client, name, args.alias, version, holder)
            if champion != version:
                decision = registry.Decision(False, f"a concurrent registration moved @{args.alias} to version "
                                                    f"{champion} first ({decision.reason})")  # fmt: skip
        outcome = f"moved to version {version}" if decision.move else f"not moved (holder: {holder or 'none'})"
        print(f"register: @{args.alias} {outcome}: {decision.reason}", flush=True)
        mlflow.set_tags(
            {
                tags.REGISTERED_MODEL: name,
                tags.REGISTERED_VERSION: version,
                tags.WINNER: choice.key,
                tags.ALIAS_MOVED: str(decision.move).lower(),
                tags.ALIAS_REASON: decision.reason[:5000],
                tags.CHAMPION_VERSION: champion,
            }
        )
        report.name_and_note("register", f"{choice.key} is version {version} of {name}; @{args.alias} {outcome}: "
                                         f"{decision.reason}.")  # fmt: skip
    return {"version": version, "alias_moved": decision.move, "reason": decision.reason}


if __name__ == "__main__":
    run_main(main, parse_args)
