"""main: the whole chain as one parent run with nested children, its cache, failures and git URLs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from phi3mlflow import chain
from tests.support import ROOT, one_line_error, run_step

pytestmark = pytest.mark.slow

EXPERIMENT = "main-chain"
# Each child as the parent labels it: one onnx_wrapper per precision of the profile.
STEPS = ("pipeline_wrapper", "onnx_wrapper.int4", "onnx_wrapper.int8", "evaluate", "register")


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """The tiny profile with two ONNX precisions on a five-question CSV, so each evaluation takes seconds."""
    folder = tmp_path_factory.mktemp("profile")
    rows = [json.loads(line) for line in (ROOT / "data/questions.jsonl").read_text().splitlines()[:5]]
    csv = folder / "five.csv"
    csv.write_text("q,a\n" + "".join(f"{r['question']},{r['answer']}\n" for r in rows))
    values = yaml.safe_load((ROOT / "params/tiny.yaml").read_text())
    values.update(dataset=str(csv), question_column="q", answer_column="a", registered_model_name="main-chat",
                  precisions="int4,int8")  # fmt: skip
    path = folder / "test.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _children(parent_run_id):
    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        output_format="list",
    )
    return {_label(r): r for r in runs}


def _label(run) -> str:
    """A child as the parent names it: the entry point, and for onnx_wrapper its precision."""
    name, params = run.data.tags["mlflow.project.entryPoint"], run.data.params
    if name == "onnx_wrapper":
        prebuilt = params.get("onnx_model_dir", "") not in ("", "''")  # MLflow logs an empty value as ''
        return f"{name}.{'prebuilt' if prebuilt else params['precision']}"
    return name


def _cache(run):
    return {k[len("child.") : -len(".cache")]: v for k, v in run.data.tags.items()
            if k.startswith("child.") and k.endswith(".cache")}  # fmt: skip


def _checkout_entries() -> set[str]:
    out = subprocess.run(["git", "status", "--ignored", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return set(out.stdout.splitlines())


@pytest.fixture(scope="module")
def checkout_before():
    return _checkout_entries()


@pytest.fixture(scope="module")
def first(mlflow_run, profile, checkout_before):
    return mlflow_run("main", {"params_file": str(profile)}, experiment=EXPERIMENT)


def test_chain_nests_four_children_and_registers_the_winner(first):
    parent = first.run
    assert parent.info.status == "FINISHED"
    children = _children(parent.info.run_id)
    assert set(children) == set(STEPS)
    assert all(c.info.status == "FINISHED" for c in children.values())
    assert _cache(parent) == dict.fromkeys(STEPS, "run")
    for s in STEPS:
        assert parent.data.tags[f"child.{s}.run_id"] == children[s].info.run_id
    # Model URIs and the evaluation run pass between steps as parameters.
    onnx_uris = [children[f"onnx_wrapper.{p}"].data.tags["model_uri"] for p in ("int4", "int8")]
    assert children["evaluate"].data.params["onnx_model_uris"] == ",".join(onnx_uris)
    assert children["register"].data.params["eval_run_id"] == children["evaluate"].info.run_id
    assert parent.data.tags["phi3.env_manager"] == "local"  # --env-manager local, passed on to the children
    assert parent.data.params["effective.precisions"] == "int4,int8"
    assert parent.data.params["effective.model"] == "builtin:tiny-phi3"
    assert parent.data.metrics["onnx_int4_accuracy"] == parent.data.metrics["onnx_int8_accuracy"] == 1.0
    assert "chat_latency_p50_ms" in parent.data.metrics
    # The winner is the best candidate of the ranked summary that meets the goals, and it is registered.
    evaluated = children["evaluate"]
    summary = mlflow.artifacts.load_dict(f"{evaluated.info.artifact_uri}/summary.json")
    assert len(summary["candidates"]) == 3 and parent.data.tags["winner"] == summary["winner"]
    winner = next(c for c in summary["candidates"] if c["key"] == summary["winner"])
    registered = mlflow.MlflowClient().get_model_version("main-chat", parent.data.tags["registered_version"])
    assert registered.source == winner["model_uri"] and registered.tags["candidate"] == winner["key"]
    version = parent.data.tags["registered_version"]
    holder = mlflow.MlflowClient().get_model_version_by_alias("main-chat", "champion")
    assert holder.version == version == parent.data.tags["champion_version"]
    done = [line for line in first.output.splitlines() if line.startswith("main: done")][-1]
    assert f"@champion is version {version}" in done
    # What a user sees last: who won and why, how to call it, where to look.
    assert "main: evaluation: " in first.output and "main: look: http://127.0.0.1:" in first.output
    assert 'main: call @champion: mlflow models serve -m "models:/main-chat@champion"' in first.output
    # The UI tells the story: runs named after what they are, each with a one-sentence description.
    assert parent.data.tags["mlflow.runName"] == "main test"
    note = parent.data.tags["mlflow.note.content"]
    assert "pipeline_wrapper ran, onnx_wrapper.int4 ran, onnx_wrapper.int8 ran, evaluate ran, register ran" in note
    names = {s: c.data.tags["mlflow.runName"] for s, c in children.items()}
    assert names == {"pipeline_wrapper": "pipeline_wrapper", "onnx_wrapper.int4": "onnx_wrapper int4",
                     "onnx_wrapper.int8": "onnx_wrapper int8", "evaluate": "evaluate",
                     "register": "register"}  # fmt: skip
    assert "accuracy" in children["evaluate"].data.tags["mlflow.note.content"]
    description = mlflow.MlflowClient().get_model_version("main-chat", version).description
    assert description.startswith(("ONNX Runtime GenAI pyfunc", "Transformers chat pipeline"))
    assert "Call: mlflow.pyfunc.load_model" in description and "/tmp" not in description
    # Every candidate answers every bundled question; which one is faster (and so the winner) is the
    # machine's call. Whichever it is, it takes the one chat request main printed.
    champion = mlflow.pyfunc.load_model("models:/main-chat@champion")
    [out] = champion.predict({"messages": [{"role": "user", "content": "What is the capital of Spain?"}]})
    assert out["choices"][0]["message"]["content"] == "The capital of Spain is Madrid."
    assert '"messages"' in next(line for line in first.output.splitlines() if "main: call @champion: curl" in line)


def test_identical_rerun_challenges_the_new_champion_once_then_reuses_every_step_but_register(
    first, mlflow_run, profile
):
    # The first run moved the alias: the champion evaluate challenges changed, so evaluate runs again
    # (asking that version, one of its own candidates, the same questions) and keeps it.
    challenged = mlflow_run("main", {"params_file": str(profile)}, experiment=EXPERIMENT)
    assert _cache(challenged.run) == {**dict.fromkeys(STEPS[:3], "reused"), "evaluate": "run", "register": "run"}
    summary = mlflow.artifacts.load_dict(
        f"{mlflow.get_run(challenged.run.data.tags['child.evaluate.run_id']).info.artifact_uri}/summary.json"
    )
    assert summary["champion_version"] == first.run.data.tags["registered_version"]
    assert challenged.run.data.tags["alias_moved"] == "false"
    again = mlflow_run("main", {"params_file": str(profile)}, experiment=EXPERIMENT)
    assert _cache(again.run) == {**dict.fromkeys(STEPS[:4], "reused"), "register": "run"}
    assert set(_children(again.run.info.run_id)) == {"register"}
    for s in STEPS[:3]:
        assert again.run.data.tags[f"child.{s}.run_id"] == first.run.data.tags[f"child.{s}.run_id"]
    assert again.run.data.tags["child.evaluate.run_id"] == challenged.run.data.tags["child.evaluate.run_id"]
    assert again.run.data.tags["registered_version"] == first.run.data.tags["registered_version"]
    assert again.run.data.tags["alias_moved"] == "false"  # it already points there


def test_register_is_never_replayed_and_main_reports_the_registry_as_it_is(first, mlflow_run, profile):
    client = mlflow.MlflowClient()
    # Someone moves the alias by hand to the transformers model (a version that records no metrics).
    chat_uri = _children(first.run.info.run_id)["pipeline_wrapper"].data.tags["model_uri"]
    by_hand = mlflow.register_model(chat_uri, "main-chat").version
    client.set_registered_model_alias("main-chat", "champion", by_hand)
    again = mlflow_run("main", {"params_file": str(profile)}, experiment=EXPERIMENT)
    # evaluate ran again and asked that version the same questions: the ONNX winner ties with it on
    # accuracy and answers far faster in the same run, so it takes the alias back (its own version).
    assert again.run.data.tags["child.evaluate.cache"] == "run"
    holder = client.get_model_version_by_alias("main-chat", "champion")
    assert again.run.data.tags["champion_version"] == holder.version == again.run.data.tags["registered_version"]
    assert holder.tags["wrapper"] == "onnx" and again.run.data.tags["alias_moved"] == "true"
    assert f"ties with version {by_hand}" in again.run.data.tags["alias_reason"]
    # One logged model, one version: an ONNX winner already registered is found, not registered again.
    sources = [v.source for v in client.search_model_versions("name = 'main-chat'")]
    assert len(sources) == len(set(sources))

    # Someone deletes the registered model: the next run registers again and says so truthfully.
    client.delete_registered_model("main-chat")
    again = mlflow_run("main", {"params_file": str(profile)}, experiment=EXPERIMENT)
    assert again.run.data.tags["child.register.cache"] == "run"
    [v] = client.search_model_versions("name = 'main-chat'")
    assert again.run.data.tags["registered_version"] == v.version == again.run.data.tags["champion_version"]
    assert client.get_model_version_by_alias("main-chat", "champion").version == v.version
    done = [line for line in again.output.splitlines() if line.startswith("main: done")][-1]
    assert f"@champion is version {v.version}" in done


def test_a_new_precision_runs_only_its_export_and_reuses_the_others(first, mlflow_run, profile):
    result = mlflow_run("main", {"params_file": str(profile), "precisions": "int4,fp32"}, experiment=EXPERIMENT)
    assert _cache(result.run) == {"pipeline_wrapper": "reused", "onnx_wrapper.int4": "reused",
                                  "onnx_wrapper.fp32": "run", "evaluate": "run", "register": "run"}  # fmt: skip
    # The override given is a parameter of the parent; no override left empty is.
    params = result.run.data.params
    assert params["precisions"] == "int4,fp32" and "model" not in params and "''" not in params.values()
    children = _children(result.run.info.run_id)
    assert set(children) == {"onnx_wrapper.fp32", "evaluate", "register"}
    assert children["onnx_wrapper.fp32"].data.tags["precision"] == "fp32"
    assert (
        result.run.data.tags["child.onnx_wrapper.int4.run_id"] == first.run.data.tags["child.onnx_wrapper.int4.run_id"]
    )
    assert result.run.data.metrics["onnx_fp32_accuracy"] == 1.0 and "onnx_int8_accuracy" not in result.run.data.metrics
    # The alias moves only on evidence from this run against the champion it asked, and main reports
    # where it is now.
    tags = result.run.data.tags
    holder = mlflow.MlflowClient().get_model_version_by_alias("main-chat", "champion").version
    assert tags["champion_version"] == holder
    reason = tags["alias_reason"]
    # The outcome is the one the evaluation's own evidence gave (who is fastest is the machine's call).
    evaluated = mlflow.get_run(tags["child.evaluate.run_id"])
    verdict = mlflow.artifacts.load_dict(f"{evaluated.info.artifact_uri}/summary.json")
    assert tags["alias_moved"] == str(verdict["alias_should_move"]).lower()
    if verdict["winner"] == verdict["champion"]:  # the champion won again: nothing new to point at
        assert "already points to version" in reason, reason
    else:
        assert reason == verdict["alias_reason"]
        assert ("faster by more than 25%" if tags["alias_moved"] == "true" else "tied with version") in reason


def test_changing_an_evaluation_knob_reruns_only_evaluate_and_register(first, mlflow_run, profile):
    result = mlflow_run("main", {"params_file": str(profile), "max_new_tokens": "24"}, experiment=EXPERIMENT)
    assert _cache(result.run) == {**dict.fromkeys(STEPS[:4], "reused"), "evaluate": "run", "register": "run"}


def test_changed_dataset_content_reruns_evaluate_and_the_gate_sees_it(first, mlflow_run, profile, tmp_path):
    # A scheduled job's data file changes between runs; its path does not.
    data = tmp_path / "weekly.csv"
    shutil.copy(Path(yaml.safe_load(profile.read_text())["dataset"]), data)
    values = {**yaml.safe_load(profile.read_text()), "dataset": str(data), "registered_model_name": "weekly-chat"}
    weekly = tmp_path / "weekly.yaml"
    weekly.write_text(yaml.safe_dump(values))
    before = mlflow_run("main", {"params_file": str(weekly)}, experiment=EXPERIMENT)
    assert before.run.data.metrics["onnx_int4_accuracy"] == 1.0
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0]] + [",".join([row.rsplit(",", 1)[0], "Atlantis"]) for row in lines[1:]]))
    after = mlflow_run("main", {"params_file": str(weekly)}, experiment=EXPERIMENT)
    assert _cache(after.run) == {**dict.fromkeys(STEPS[:4], "reused"), "evaluate": "run", "register": "run"}
    assert after.run.data.metrics["onnx_int4_accuracy"] == 0.0
    assert after.run.data.tags["alias_moved"] == "false" and "min_accuracy" in after.run.data.tags["alias_reason"]
    holder = mlflow.MlflowClient().get_model_version_by_alias("weekly-chat", "champion").version
    assert holder == before.run.data.tags["registered_version"] == after.run.data.tags["champion_version"]


def test_a_failing_step_fails_the_parent_by_name_and_a_rerun_resumes(
    first, mlflow_run, profile, onnx_fp32_dir, tmp_path
):
    broken = tmp_path / "onnx"
    shutil.copytree(onnx_fp32_dir, broken)
    good_config = (broken / "genai_config.json").read_text()
    (broken / "genai_config.json").write_text("{ not json")
    params = {"params_file": str(profile), "onnx_model_dir": str(broken), "precisions": "int4"}
    failed = mlflow_run("main", params, experiment=EXPERIMENT, check=False)
    assert failed.proc.returncode != 0
    parent = failed.run
    assert parent.info.status == "FAILED"
    children = _children(parent.info.run_id)
    assert set(children) == {"onnx_wrapper.prebuilt"}  # pipeline_wrapper reused, nothing after the failure
    child = children["onnx_wrapper.prebuilt"]
    assert child.info.status == "FAILED"
    assert f"step onnx_wrapper.prebuilt failed (run {child.info.run_id})" in failed.output
    assert "onnx_model_dir" in child.data.tags["phi3.error"]
    # The cause is on the parent too, naming the step and its run, and it is what main prints last.
    assert parent.data.tags["phi3.error"].startswith(f"step onnx_wrapper.prebuilt failed (run {child.info.run_id}): ")
    assert child.data.tags["phi3.error"] in parent.data.tags["phi3.error"]
    assert child.data.tags["mlflow.note.content"] == f"Failed: {child.data.tags['phi3.error']}"
    assert parent.data.tags["mlflow.note.content"].startswith("Failed: step onnx_wrapper.prebuilt failed")
    last = failed.output.strip().splitlines()
    assert any(child.data.tags["phi3.error"] in line and line.startswith("error: main:") for line in last)

    (broken / "genai_config.json").write_text(good_config)
    resumed = mlflow_run("main", params, experiment=EXPERIMENT)
    cache = _cache(resumed.run)
    assert cache["pipeline_wrapper"] == "reused" and cache["onnx_wrapper.prebuilt"] == "run"
    assert resumed.run.info.status == "FINISHED"


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"params_file": "params/nope.yaml"}, "params_file"),
        ({"precisions": "int3"}, "precisions: unknown precision 'int3'"),
        ({"precisions": "int4,int4"}, "precisions: int4 is listed more than once"),
        ({"precision": "int8"}, "precision: renamed to precisions"),
        ({"precisions": "int4,int8", "onnx_model_dir": "/tmp"}, "precisions: a prebuilt onnx_model_dir"),
        ({"min_accuracy": "2"}, "--min_accuracy"),
        ({"use_cache": "maybe"}, "use_cache"),
        ({"model": "./not/here"}, "--model"),
        ({"registered_model_name": "team/chat"}, "registered_model_name"),
        ({"registered_model_name": "chat:v2"}, "registered_model_name"),
        ({"max_accuracy_drop": "-1"}, "--max_accuracy_drop"),
    ],
)
def test_bad_input_fails_before_any_step_runs(params, needle):
    proc = run_step("main", *[x for k, v in params.items() for x in (f"--{k}", v)], timeout=60)
    line = one_line_error(proc)
    assert needle in line, line
    assert "main: pipeline_wrapper" not in proc.stdout


@pytest.mark.parametrize("changed,rekeys", [("steps/register.py", True), ("phi3mlflow/chain.py", True),
                                            ("requirements.txt", True), ("README.md", False),
                                            ("params/tiny.yaml", False)])  # fmt: skip
def test_code_version_follows_the_code_not_the_docs(tmp_path, changed, rekeys):
    copy = tmp_path / "proj"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.db", "mlruns"))
    before = chain.code_version(copy)
    assert before.startswith("sha256:") and chain.code_version(copy) == before
    (copy / changed).write_text((copy / changed).read_text() + "\n# changed\n")
    assert (chain.code_version(copy) != before) is rekeys


def test_a_local_model_folder_is_keyed_by_its_content(builtin_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(builtin_dir, folder)
    params = {"model": str(folder), "precision": "int4"}
    key = lambda: chain.cache_key("onnx_wrapper", params, "sha256:code", chain.Chain.inputs(_NoClient(), params))  # noqa: E731
    before = key()
    assert key() == before
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # new weights, same path, same size
    weights.write_bytes(bytes(data))
    assert key() != before


class _NoClient:
    """Just enough of Chain for Chain.inputs: a fresh digest memo, no server."""

    def __init__(self):
        self._digests = {}


def test_runs_from_a_git_url_at_a_commit_and_a_docs_only_change_reuses_every_step(first, mlflow_run, profile,
                                                                                   tmp_path):  # fmt: skip
    # A repository holding the project's files as they are now, with a README of its own, committed:
    # run from its file:// URL with the same parameters as `first`. Only docs differ, so the code
    # version is the same and every step but register is reused.
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    (repo / "README.md").write_text("# a fork whose README says something else\n")
    ident = ["-c", "user.email=ci@localhost", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *ident, "commit", "-qm", "snapshot"], cwd=repo, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    (repo / "README.md").write_text("a later commit that must not be the one run\n")
    subprocess.run(["git", *ident, "commit", "-qam", "later"], cwd=repo, check=True)

    result = mlflow_run("main", {"params_file": str(profile)}, experiment=EXPERIMENT, uri=f"file://{repo}",
                        extra=["--version", commit])  # fmt: skip
    run = result.run
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags["phi3.code_version"] == first.run.data.tags["phi3.code_version"]
    cache = _cache(run)
    assert {k: cache[k] for k in (*STEPS[:3], "register")} == {**dict.fromkeys(STEPS[:3], "reused"), "register": "run"}
    # evaluate is reused too unless the alias moved since an evaluation with these parameters: then
    # the champion it challenges is another (the earlier tests of this module move it).
    if cache["evaluate"] == "run":
        challenged = mlflow.get_run(run.data.tags["child.evaluate.run_id"]).data.tags["phi3.input_digest.champion"]
        before = mlflow.get_run(first.run.data.tags["child.evaluate.run_id"]).data.tags["phi3.input_digest.champion"]
        assert challenged != before
    children = _children(run.info.run_id)
    assert set(children) == {k for k, v in cache.items() if v == "run"}
    assert children["register"].data.tags["mlflow.source.git.commit"] == commit


def _artifact_dir(artifact_root: Path, model_uri: str) -> Path:
    [found] = [p for p in artifact_root.rglob(model_uri.split("/")[1]) if p.is_dir()]
    return found


def test_a_reused_run_whose_model_is_gone_runs_again(first, mlflow_run, profile, artifact_root, tmp_path):
    # Kept last in this module: it takes away the model the earlier tests reuse.
    onnx_uri = _children(first.run.info.run_id)["onnx_wrapper.int4"].data.tags["model_uri"]
    gone = _artifact_dir(artifact_root, onnx_uri)
    shutil.move(str(gone), str(tmp_path / "moved-away"))
    # And one file taken from the int8 model: its completion marker still names it.
    int8_uri = _children(first.run.info.run_id)["onnx_wrapper.int8"].data.tags["model_uri"]
    [config] = _artifact_dir(artifact_root, int8_uri).rglob("genai_config.json")
    config.unlink()
    result = mlflow_run("main", {"params_file": str(profile), "max_new_tokens": "20"}, experiment=EXPERIMENT)
    cache = _cache(result.run)
    assert cache["pipeline_wrapper"] == "reused" and cache["onnx_wrapper.int4"] == "run"
    assert cache["onnx_wrapper.int8"] == "run" and cache["evaluate"] == "run"
    int4_run_id = first.run.data.tags["child.onnx_wrapper.int4.run_id"]
    assert f"onnx_wrapper.int4: not reusing run {int4_run_id}" in result.output
    assert "is damaged: genai_config.json is missing" in result.output
    assert result.run.info.status == "FINISHED"


def _pids(needle: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def test_sigterm_to_the_launcher_cancels_the_chain_and_registers_nothing(first, profile, tracking_uri, tmp_path):
    # A long evaluation (every bundled question, four times) on the models `first` logged.
    rows = (ROOT / "data/questions.jsonl").read_text() * 4
    (tmp_path / "long.jsonl").write_text(rows)
    values = {**yaml.safe_load(profile.read_text()), "dataset": str(tmp_path / "long.jsonl"),
              "question_column": "question", "answer_column": "answer",
              "registered_model_name": "cancelled-chat"}  # fmt: skip
    prof = tmp_path / "cancel.yaml"
    prof.write_text(yaml.safe_dump(values))
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "main", "--env-manager", "local",
           "--experiment-name", EXPERIMENT, "-P", f"params_file={prof}"]  # fmt: skip
    log = open(tmp_path / "launcher.log", "w")
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    deadline, evaluating = time.time() + 180, None
    while evaluating is None and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.5)
        runs = client.search_runs([exp], f"params.dataset = '{tmp_path / 'long.jsonl'}'", max_results=1)
        if runs and runs[0].info.status == "RUNNING":
            evaluating = runs[0]
    assert evaluating is not None, (tmp_path / "launcher.log").read_text()[-3000:]
    time.sleep(2)  # well into answering
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=30)
    deadline = time.time() + 60
    while (_pids(str(prof)) or _pids(str(tmp_path / "long.jsonl"))) and time.time() < deadline:
        time.sleep(0.5)
    log.close()
    assert not _pids(str(prof)) and not _pids(str(tmp_path / "long.jsonl")), (
        "steps.main or evaluate outlived the cancel"
    )
    child = client.get_run(evaluating.info.run_id)
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert child.info.status in ("FAILED", "KILLED") and parent.info.status in ("FAILED", "KILLED")
    assert "SIGTERM" in parent.data.tags["phi3.error"] and "evaluate" in parent.data.tags["phi3.error"]
    assert "SIGTERM" in child.data.tags["phi3.error"]
    assert "child.register.run_id" not in parent.data.tags
    assert not client.search_registered_models("name = 'cancelled-chat'")


def test_the_chain_leaves_nothing_in_the_checkout(first, checkout_before):
    # Kept last: every chain run of this module has happened. Tool caches are pytest's and ruff's own.
    new = {e for e in _checkout_entries() - checkout_before if not e.endswith(("_cache/", "__pycache__/"))}
    assert not new, new
