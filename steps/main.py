"""main: one parent run that chains pipeline_wrapper, onnx_wrapper, evaluate and register.

Inputs (flags, spelled like the MLproject parameters):
  --params_file  the profile (default params/tiny.yaml); the only place params/*.yaml is read
  --precisions   comma-separated ONNX precisions to compare (fp32, int8, int4), e.g. fp32,int8,int4
  --model, --onnx_model_dir, --serve_max_new_tokens, --max_new_tokens, --temperature, --engine,
  --registered_model_name, --min_accuracy, --max_accuracy_drop, --use_cache
                 overrides of the profile's values; empty means "as in the profile". Under `mlflow run`
                 they are passed as -P name=value although MLproject declares only params_file, so
                 that the parent logs the overrides given and no empty ones
Children (nested runs, each started with mlflow.run and the parent's env manager, one at a time:
an export or an evaluation already uses every core, so running two at once only makes each slower):
  pipeline_wrapper(model, serve_max_new_tokens, temperature, trust_remote_code)
  onnx_wrapper(model, precision, onnx_model_dir, serve_max_new_tokens, temperature), once per precision
  evaluate(every model URI, dataset, max_new_tokens, temperature, select_metric, min_accuracy,
           max_accuracy_drop, max_kld, fidelity, engine, registered_model_name, alias): the
           candidates and the alias's current holder asked the same questions, ranked with
           intervals, the winner chosen and the verdict against the champion made
  register(the evaluate run, registered_model_name, alias, force)
A child is reused when a FINISHED run of it had the same parameters, the same code (content hash)
and the same content in every file or folder its parameters name (dataset, model folder or GGUF
file, ONNX folder), and its outputs still resolve; evaluate's key also holds the version the alias
points to (a moved alias re-runs it). register changes the registry, so it always runs.
Logged on the parent: every effective value as ``effective.<name>``, tags child.<step>.run_id and
child.<step>.cache (run/reused; the ONNX children as onnx_wrapper.<precision>, or
onnx_wrapper.prebuilt for an onnx_model_dir), registered_version,
winner, alias_moved, champion_version (read from the registry when the chain ends), phi3.error
when a step fails or the chain is cancelled, and the evaluation's metrics.
"""

from __future__ import annotations

import argparse

from phi3mlflow.chain import OPTIONAL_KEYS, PROFILE_KEYS
from phi3mlflow.cli import StepParser, fail, run_main, true_false

OVERRIDES = ("model", "precisions", "onnx_model_dir", "serve_max_new_tokens", "max_new_tokens", "temperature", "engine",
             "registered_model_name", "min_accuracy", "max_accuracy_drop", "max_kld", "use_cache")  # fmt: skip


def parse_args(argv=None):
    p = StepParser(prog="main", description=__doc__.split("\n", 1)[0])
    p.add_argument("--params_file", default="params/tiny.yaml")
    for name in OVERRIDES:
        p.add_argument(f"--{name}", default="")
    # The single-precision spelling of earlier versions, so that a scheduled job using it is told what changed.
    p.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precision is not None:
        fail("precision", f"renamed to precisions (a comma-separated list): -P precisions={args.precision}")
    return args


def parse_precisions(value: str, onnx_model_dir: str) -> list[str]:
    """``fp32,int8,int4`` -> the ONNX candidates' precisions, each known and named once."""
    from phi3mlflow.errors import InputError
    from phi3mlflow.onnx_export import PRECISIONS

    given = [p.strip() for p in value.split(",")]
    if not any(given):
        raise InputError("precisions", f"must name at least one of {', '.join(PRECISIONS)}")
    if "" in given:
        raise InputError("precisions", f"{value!r} has an empty entry")
    unknown = [p for p in given if p not in PRECISIONS]
    if unknown:
        raise InputError("precisions", f"unknown precision {unknown[0]!r} (known: {', '.join(PRECISIONS)})")
    twice = sorted({p for p in given if given.count(p) > 1})
    if twice:
        raise InputError("precisions", f"{twice[0]} is listed more than once")
    if onnx_model_dir.strip() and len(given) > 1:
        raise InputError("precisions", "a prebuilt onnx_model_dir is one candidate: give one precision, or no folder")
    return given


def plan(args) -> dict:
    """The effective values: the profile, overridden by non-empty flags, validated by each step's parser."""
    import mlflow

    from phi3mlflow.chain import load_profile
    from phi3mlflow.evaluation.dataset import load_dataset
    from phi3mlflow.registry import check_names
    from steps import evaluate, onnx_wrapper, pipeline_wrapper, register

    values = load_profile(args.params_file)
    for key in set(OPTIONAL_KEYS) - set(values):
        values[key] = step_default(key)
    values.update({k: getattr(args, k) for k in OVERRIDES if getattr(args, k) != ""})
    try:
        values["use_cache"] = str(true_false(values["use_cache"])).lower()
    except argparse.ArgumentTypeError as e:
        fail("use_cache", str(e))
    # Each step's own parser checks its values now, before any model is loaded.
    steps = {
        "pipeline_wrapper": pipeline_wrapper,
        "onnx_wrapper": onnx_wrapper,
        "evaluate": evaluate,
        "register": register,
    }
    precisions = parse_precisions(values["precisions"], values["onnx_model_dir"])
    values["precisions"] = ",".join(precisions)  # as effective.precisions logs it: "int4, int8" is int4,int8
    for name, step in steps.items():
        for p in precisions if name == "onnx_wrapper" else [""]:
            params = step_params(name, values, {"precision": p})
            step.parse_args([x for k, v in params.items() for x in (f"--{k}", v)])
    # The checks evaluate and register would make only after the wrappers' heavy work.
    load_dataset(values["dataset"], values["question_column"], values["answer_column"])
    check_names(values["registered_model_name"], values["alias"], mlflow.get_registry_uri())
    if values["engine"] == "spark":
        from phi3mlflow.spark_scoring import check_available

        check_available()
    return values


# Each step's parameters: a profile key, or "@x" for a value the chain supplies (chat model URI, the
# comma-separated ONNX model URIs, evaluation run ID, the precision of one onnx_wrapper run).
WIRING = {
    "pipeline_wrapper": {"model": "model", "serve_max_new_tokens": "serve_max_new_tokens",
                         "temperature": "temperature", "trust_remote_code": "trust_remote_code"},
    "onnx_wrapper": {"model": "model", "precision": "@precision", "onnx_model_dir": "onnx_model_dir",
                     "serve_max_new_tokens": "serve_max_new_tokens", "temperature": "temperature",
                     "max_prompts_per_request": "max_prompts_per_request",
                     "max_total_new_tokens": "max_total_new_tokens"},
    "evaluate": {"chat_model_uri": "@chat", "onnx_model_uris": "@onnx", "dataset": "dataset",
                 "question_column": "question_column", "answer_column": "answer_column",
                 "max_new_tokens": "max_new_tokens", "temperature": "temperature", "select_metric": "select_metric",
                 "min_accuracy": "min_accuracy", "max_accuracy_drop": "max_accuracy_drop", "max_kld": "max_kld",
                 "fidelity": "fidelity", "engine": "engine", "registered_model_name": "registered_model_name",
                 "alias": "alias"},
    "register": {"eval_run_id": "@eval", "registered_model_name": "registered_model_name", "alias": "alias",
                 "force": "force"},
}  # fmt: skip


def step_default(key: str) -> str:
    """The default of the step parameter that profile key ``key`` is wired to, as MLflow logs it."""
    import importlib

    for name, wiring in WIRING.items():
        for param, src in wiring.items():
            if src == key:
                step = importlib.import_module(f"steps.{name}")
                required = ["--eval_run_id", "x"] if name == "register" else []
                value = getattr(step.parse_args(required), param)
                return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    raise KeyError(key)


def step_params(name: str, values: dict, upstream: dict | None = None) -> dict:
    upstream = upstream or {}
    return {
        param: upstream.get(src[1:], "pending") if src.startswith("@") else values[src]
        for param, src in WIRING[name].items()
    }


def main(args) -> dict:
    import mlflow

    from phi3mlflow import registry, report, tags
    from phi3mlflow.chain import Chain, StepFailed
    from phi3mlflow.cli import Cancelled
    from phi3mlflow.summary import Summary, verdict

    values = plan(args)
    with mlflow.start_run() as parent:
        overrides = {k: getattr(args, k) for k in OVERRIDES}
        report.name_and_note(report.main_run_name(args.params_file, overrides), "The chain is running.")
        mlflow.log_params({f"effective.{k}": values[k] for k in PROFILE_KEYS})
        # mlflow run tags the run with the env manager it built (virtualenv, uv, conda); none means local.
        # Children get the same one: nested mlflow.run calls do not inherit it by themselves.
        env_manager = mlflow.get_run(parent.info.run_id).data.tags.get("mlflow.project.env", "local")
        chain = Chain(parent.info.experiment_id, parent.info.run_id, values["use_cache"] == "true", env_manager)
        mlflow.set_tags({tags.CODE_VERSION: chain.code, tags.ENV_MANAGER: env_manager})
        ended = chain.end_abandoned(parent.info.start_time)
        if ended:
            print(f"main: ended FAILED {len(ended)} runs an earlier chain left RUNNING (its process is gone): "
                  f"{', '.join(ended)}", flush=True)  # fmt: skip
        client, up, step = chain.client, {}, "pipeline_wrapper"
        try:
            chat = chain.run(step, step_params(step, values))
            up["chat"] = client.get_run(chat.run_id).data.tags[tags.MODEL_URI]
            onnx = []
            for precision in parse_precisions(values["precisions"], values["onnx_model_dir"]):
                step = f"onnx_wrapper.{'prebuilt' if values['onnx_model_dir'] else precision}"
                params = step_params("onnx_wrapper", values, {"precision": precision})
                onnx.append(chain.run("onnx_wrapper", params, label=step))
            up["onnx"] = ",".join(client.get_run(r.run_id).data.tags[tags.MODEL_URI] for r in onnx)
            step = "evaluate"
            # The champion evaluate challenges is one of its inputs: a moved alias runs it again.
            holder = registry.alias_holder(client, values["registered_model_name"], values["alias"])
            challenged = {"champion": f"{values['registered_model_name']}@{values['alias']}={holder or 'none'}"}
            evaluated = chain.run(step, step_params(step, values, up), extra_inputs=challenged)
            up["eval"] = evaluated.run_id
            step = "register"
            # The registry is shared state: registering is never replayed from an earlier run.
            reg = chain.run(step, step_params(step, values, up), cacheable=False)
        except StepFailed as e:
            mlflow.set_tags({tags.ERROR: str(e)[:1000], report.NOTE: f"Failed: {e}"})
            fail("main", str(e))
        except Cancelled as e:
            cause = f"{e} during {step}; nothing was registered after it"
            mlflow.set_tags({tags.ERROR: cause, report.NOTE: f"Cancelled: {cause}"})
            raise
        eval_run, reg_run = client.get_run(up["eval"]), client.get_run(reg.run_id)
        # The candidates' metrics (<key>_<metric>); the bare names on the evaluate run are its
        # LoggedModel metrics, one value per candidate, which say nothing on the parent.
        mlflow.log_metrics({k: v for k, v in eval_run.data.metrics.items() if "_" in k and k.split("_", 1)[0] in
                            ("chat", "onnx", "champion", "winner")})  # fmt: skip
        told = (tags.REGISTERED_MODEL, tags.REGISTERED_VERSION, tags.WINNER, tags.ALIAS_MOVED, tags.ALIAS_REASON)
        outcome = {k: reg_run.data.tags.get(k, "") for k in told}
        # What the registry says now, not what the step believed: another job may have moved it since.
        champion, _ = registry.alias_tags(client, values["registered_model_name"], values["alias"])
        outcome[tags.CHAMPION_VERSION] = champion or ""
        summary = Summary.from_dict(mlflow.artifacts.load_dict(f"{eval_run.info.artifact_uri}/summary.json"))
        ran = [f"{r.name} {'reused' if r.reused else 'ran'}" for r in (chat, *onnx, evaluated)]
        name, alias = outcome[tags.REGISTERED_MODEL], values["alias"]
        moved = "moved to it" if outcome[tags.ALIAS_MOVED] == "true" else "not moved"
        done = (
            f"{outcome['winner']} registered as {name} version {outcome['registered_version']}; "
            f"@{alias} {moved} ({outcome['alias_reason']}); @{alias} is version {champion or 'unset'}"
        )
        note = f"{', '.join(ran)}, register ran. {verdict(summary)}. "
        mlflow.set_tags({**outcome, tags.BEST: summary.best, report.NOTE: note + done})
        look = report.where_to_look(mlflow.get_tracking_uri(), parent.info.experiment_id, parent.info.run_id)
    print(f"main: evaluation: {verdict(summary)}", flush=True)
    if champion:
        for line in report.call_command(name, alias):
            print(f"main: call @{alias}: {line}", flush=True)
    print(f"main: look: {look}", flush=True)
    print(f"main: done: {done}", flush=True)
    return outcome


if __name__ == "__main__":
    run_main(main, parse_args)
