"""main: the whole chain as one parent run with nested children, its cache, failures and git URLs."""

import json
import shutil
import subprocess

import mlflow
import pytest
import yaml

from phi3mlflow import chain
from tests.conftest import ROOT, run_step

EXPERIMENT = "main-chain"
STEPS = ("pipeline_wrapper", "onnx_wrapper", "evaluate", "register")


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """The tiny profile on a five-question CSV, so each evaluation takes seconds."""
    folder = tmp_path_factory.mktemp("profile")
    rows = [json.loads(line) for line in (ROOT / "data/questions.jsonl").read_text().splitlines()[:5]]
    csv = folder / "five.csv"
    csv.write_text("q,a\n" + "".join(f"{r['question']},{r['answer']}\n" for r in rows))
    values = yaml.safe_load((ROOT / "params/tiny.yaml").read_text())
    values.update(dataset=str(csv), question_column="q", answer_column="a", registered_model_name="main-chat")
    path = folder / "test.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _children(parent_run_id):
    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        output_format="list",
    )
    return {r.data.tags["mlflow.project.entryPoint"]: r for r in runs}


def _cache(run):
    return {s: run.data.tags[f"child.{s}.cache"] for s in STEPS}


@pytest.fixture(scope="module")
def first(mlflow_run, profile):
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
    assert children["evaluate"].data.params["onnx_model_uri"] == children["onnx_wrapper"].data.tags["model_uri"]
    assert children["register"].data.params["eval_run_id"] == children["evaluate"].info.run_id
    assert parent.data.tags["phi3.env_manager"] == "local"  # --env-manager local, passed on to the children
    assert parent.data.params["effective.precision"] == "int4"
    assert parent.data.params["effective.model"] == "builtin:tiny-phi3"
    assert parent.data.metrics["onnx_accuracy"] == 1.0 and "chat_latency_p50_ms" in parent.data.metrics
    version = parent.data.tags["registered_version"]
    holder = mlflow.MlflowClient().get_model_version_by_alias("main-chat", "champion")
    assert holder.version == version
    answer = mlflow.pyfunc.load_model("models:/main-chat@champion").predict({"prompt": "What is the capital of Spain?"})
    assert answer == ["The capital of Spain is Madrid."]


def test_identical_rerun_reuses_every_step(first, mlflow_run, profile):
    again = mlflow_run("main", {"params_file": str(profile)}, experiment=EXPERIMENT)
    assert _cache(again.run) == dict.fromkeys(STEPS, "reused")
    assert not _children(again.run.info.run_id)
    for s in STEPS:
        assert again.run.data.tags[f"child.{s}.run_id"] == first.run.data.tags[f"child.{s}.run_id"]
    assert again.run.data.tags["registered_version"] == first.run.data.tags["registered_version"]


def test_changing_precision_reruns_all_but_pipeline_wrapper(first, mlflow_run, profile):
    result = mlflow_run("main", {"params_file": str(profile), "precision": "int8"}, experiment=EXPERIMENT)
    assert _cache(result.run) == {
        "pipeline_wrapper": "reused",
        "onnx_wrapper": "run",
        "evaluate": "run",
        "register": "run",
    }
    children = _children(result.run.info.run_id)
    assert children["onnx_wrapper"].data.params["precision"] == "int8"
    assert children["onnx_wrapper"].data.tags["precision"] == "int8"
    assert result.run.data.metrics["onnx_accuracy"] >= 0.8  # int8 of the tiny model still answers


def test_changing_an_evaluation_knob_reruns_only_evaluate_and_register(first, mlflow_run, profile):
    result = mlflow_run("main", {"params_file": str(profile), "max_new_tokens": "24"}, experiment=EXPERIMENT)
    expected = {"pipeline_wrapper": "reused", "onnx_wrapper": "reused", "evaluate": "run", "register": "run"}
    assert _cache(result.run) == expected


def test_a_failing_step_fails_the_parent_by_name_and_a_rerun_resumes(
    first, mlflow_run, profile, onnx_fp32_dir, tmp_path
):
    broken = tmp_path / "onnx"
    shutil.copytree(onnx_fp32_dir, broken)
    good_config = (broken / "genai_config.json").read_text()
    (broken / "genai_config.json").write_text("{ not json")
    params = {"params_file": str(profile), "onnx_model_dir": str(broken)}
    failed = mlflow_run("main", params, experiment=EXPERIMENT, check=False)
    assert failed.proc.returncode != 0
    parent = failed.run
    assert parent.info.status == "FAILED"
    children = _children(parent.info.run_id)
    assert set(children) == {"onnx_wrapper"}  # pipeline_wrapper reused, nothing after the failure
    child = children["onnx_wrapper"]
    assert child.info.status == "FAILED"
    assert f"step onnx_wrapper failed (run {child.info.run_id})" in failed.output
    assert "onnx_model_dir" in child.data.tags["phi3.error"]

    (broken / "genai_config.json").write_text(good_config)
    resumed = mlflow_run("main", params, experiment=EXPERIMENT)
    cache = _cache(resumed.run)
    assert cache["pipeline_wrapper"] == "reused" and cache["onnx_wrapper"] == "run"
    assert resumed.run.info.status == "FINISHED"


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"params_file": "params/nope.yaml"}, "params_file"),
        ({"precision": "int3"}, "--precision"),
        ({"min_accuracy": "2"}, "--min_accuracy"),
        ({"use_cache": "maybe"}, "use_cache"),
        ({"model": "./not/here"}, "--model"),
    ],
)
def test_bad_input_fails_before_any_step_runs(params, needle):
    proc = run_step("main", *[x for k, v in params.items() for x in (f"--{k}", v)], timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "main: pipeline_wrapper" not in proc.stdout


def test_source_version_follows_the_files(tmp_path):
    copy = tmp_path / "proj"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.db", "mlruns"))
    before = chain.source_version(copy)
    assert before.startswith("sha256:")
    assert chain.source_version(copy) == before
    (copy / "steps" / "register.py").write_text((copy / "steps" / "register.py").read_text() + "\n# changed\n")
    assert chain.source_version(copy) != before
    assert chain.cache_key("evaluate", {"a": "1"}, before) != chain.cache_key("evaluate", {"a": "1"}, "sha256:x")


def test_runs_from_a_git_url_at_a_commit_and_another_source_version_reruns_every_step(first, mlflow_run, profile,
                                                                                     tmp_path):  # fmt: skip
    # A repository holding the project's files as they are now, committed: run from its file:// URL
    # with the same parameters as `first`. Only the source version differs, so nothing is reused.
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
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
    assert run.data.tags["phi3.source_version"] == f"git:{commit}"
    assert _cache(run) == dict.fromkeys(STEPS, "run")
    children = _children(run.info.run_id)
    assert all(c.data.tags["mlflow.source.git.commit"] == commit for c in children.values())
