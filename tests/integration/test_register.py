"""register through ``mlflow run`` against the real test server."""

import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from tests.support import ROOT, one_line_error, post, run_step, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.csv"
    path.write_text("question,answer\nWhat is the capital of Italy?,Rome\nWhat is the capital of Kenya?,Nairobi\n")
    return path


@pytest.fixture(scope="module")
def evaluations(mlflow_run, int4_run, chat_run, small_csv):
    """``evaluate(wrapper, **params)``: an evaluate run of the int4 model (``onnx``) or of the
    transformers model (``chat``: another logged model than good_eval's, so a version of its own)."""
    given = {"onnx": ("onnx_model_uris", int4_run), "chat": ("chat_model_uri", chat_run)}

    def run(wrapper: str, **params):
        param, model_run = given[wrapper]
        params = {param: model_run.run.data.tags["model_uri"], "dataset": str(small_csv), **params}
        return mlflow_run("evaluate", params, experiment="register").run_id

    return run


@pytest.fixture(scope="module")
def good_eval(evaluations):
    return evaluations("onnx")


@pytest.fixture(scope="module")
def poor_eval(evaluations):
    # Three tokens cannot hold "Rome" after "The capital of": accuracy 0, below min_accuracy 0.5.
    return evaluations("chat", max_new_tokens=3, min_accuracy=0.5)


@pytest.fixture(scope="module")
def poor_ungated_eval(evaluations):
    # The same answers with no accuracy goal: it wins its evaluation.
    return evaluations("chat", max_new_tokens=3, min_accuracy=0.0)


@pytest.fixture(scope="module")
def weaker_eval(evaluations, small_csv):
    """The transformers model on small.csv plus a question it cannot answer: it passes a min_accuracy of 0.5."""
    path = small_csv.parent / "weaker.csv"
    path.write_text(small_csv.read_text() + "What is the capital of Atlantis?,Poseidonia\n")
    return evaluations("chat", dataset=str(path), min_accuracy=0.5)


def _register(mlflow_run, eval_run_id, name, **params):
    return mlflow_run("register", {"eval_run_id": eval_run_id, "registered_model_name": name, **params},
                      experiment="register")  # fmt: skip


def _versions(name):
    return mlflow.MlflowClient().search_model_versions(f"name = '{name}'")


def test_registers_a_tagged_version_behind_the_alias_and_it_answers(mlflow_run, good_eval, int4_run):
    result = _register(mlflow_run, good_eval, "reg-basic")
    tags = result.run.data.tags
    assert tags["registered_version"] == "1" and tags["alias_moved"] == "true"
    [v] = _versions("reg-basic")
    assert v.source == int4_run.run.data.tags["model_uri"]
    assert v.tags["source_eval_run"] == good_eval
    assert v.tags["wrapper"] == "onnx" and v.tags["precision"] == "int4" and v.tags["candidate"] == "onnx_int4"
    assert float(v.tags["metric.accuracy"]) == 1.0
    assert "git_commit" in v.tags
    assert "accuracy 1.000" in v.description
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias("reg-basic", "champion").version == "1"
    model = mlflow.pyfunc.load_model("models:/reg-basic@champion")
    assert model.predict({"prompt": "What is the capital of Spain?"}) == ["The capital of Spain is Madrid."]

    again = _register(mlflow_run, good_eval, "reg-basic")
    assert again.run.data.tags["registered_version"] == "1"
    assert len(_versions("reg-basic")) == 1


def test_a_failing_gate_registers_but_leaves_the_alias(mlflow_run, good_eval, poor_eval):
    _register(mlflow_run, good_eval, "reg-gate")
    result = _register(mlflow_run, poor_eval, "reg-gate")
    tags = result.run.data.tags
    assert tags["registered_version"] == "2" and tags["alias_moved"] == "false"
    assert "min_accuracy" in tags["alias_reason"] and "min_accuracy" in result.output
    assert mlflow.MlflowClient().get_model_version_by_alias("reg-gate", "champion").version == "1"
    # force moves it anyway
    forced = _register(mlflow_run, poor_eval, "reg-gate", force="true")
    assert forced.run.data.tags["alias_moved"] == "true" and forced.run.data.tags["registered_version"] == "2"
    assert mlflow.MlflowClient().get_model_version_by_alias("reg-gate", "champion").version == "2"


def test_evidence_from_before_the_alias_moved_moves_nothing(mlflow_run, good_eval, poor_ungated_eval):
    """poor_ungated_eval challenged no version (none held the alias then); once good_eval holds it,
    that evaluation says nothing about the holder: it registers, the alias stays."""
    _register(mlflow_run, good_eval, "reg-compare")
    result = _register(mlflow_run, poor_ungated_eval, "reg-compare")
    assert result.run.data.tags["alias_moved"] == "false"
    assert "challenged no version, but the alias now points to version 1" in result.run.data.tags["alias_reason"]
    assert mlflow.MlflowClient().get_model_version_by_alias("reg-compare", "champion").version == "1"


@pytest.fixture(scope="module")
def new_set(small_csv):
    """Another question set than the one the champion was registered on."""
    path = small_csv.parent / "new.csv"
    path.write_text("question,answer\nWhat is the capital of Spain?,Madrid\nWhat is the capital of Peru?,Lima\n"
                    "What is the capital of Atlantis?,Poseidonia\n")  # fmt: skip
    return path


def _summary(run_id: str) -> dict:
    return mlflow.artifacts.load_dict(f"{mlflow.get_run(run_id).info.artifact_uri}/summary.json")


def test_the_champion_is_challenged_on_a_new_question_set_in_the_same_run(mlflow_run, good_eval, chat_run, new_set):
    # Version 1 (the int4 model) took the alias on small.csv, where it answered everything.
    _register(mlflow_run, good_eval, "reg-evidence")
    params = {"chat_model_uri": chat_run.run.data.tags["model_uri"], "dataset": str(new_set),
              "registered_model_name": "reg-evidence", "alias": "champion", "min_accuracy": "0"}  # fmt: skip
    first = mlflow_run("evaluate", params, experiment="register")
    summary = _summary(first.run_id)
    by_key = {c["key"]: c for c in summary["candidates"]}
    assert summary["champion"] == "champion" and summary["champion_version"] == "1"
    assert by_key["champion"]["version"] == "1" and by_key["champion"]["wrapper"] == "onnx"
    # Both models answered the new questions in this run: the champion's score is the new set's (one
    # of three cannot be answered), not the 1.0 its version recorded on small.csv.
    table = mlflow.artifacts.load_dict(f"{first.run.info.artifact_uri}/eval_table.json")
    correct = [row[table["columns"].index("champion_correct")] for row in table["data"]]
    assert by_key["champion"]["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert by_key["champion"]["accuracy"] < 1.0
    assert summary["vs_champion"]["n"] == 3 and first.run.data.tags["champion_version"] == "1"
    result = _register(mlflow_run, first.run_id, "reg-evidence")
    reason = result.run.data.tags["alias_reason"]
    assert "version 1" in reason and "95 % CI" in reason and reason == summary["alias_reason"]
    # The same candidates evaluated again: identical intervals, and the alias does not move.
    second = mlflow_run("evaluate", params, experiment="register")
    again = _summary(second.run_id)
    # (The reason quotes this run's times per question, which differ; the evidence does not.)
    for key in ("vs_champion", "alias_should_move", "category_stats"):
        assert again[key] == summary[key], key
    assert [(c["key"], c["accuracy_low"], c["accuracy_high"], c["vs_reference"]) for c in again["candidates"]] == [
        (c["key"], c["accuracy_low"], c["accuracy_high"], c["vs_reference"]) for c in summary["candidates"]
    ]
    _register(mlflow_run, second.run_id, "reg-evidence")
    holder = mlflow.MlflowClient().get_model_version_by_alias("reg-evidence", "champion").version
    assert holder == ("1" if not summary["alias_should_move"] else result.run.data.tags["registered_version"])


def test_a_champion_whose_model_is_gone_is_said_in_one_line_and_replaced(mlflow_run, good_eval, int4_run, small_csv):
    client = mlflow.MlflowClient()
    client.create_registered_model("reg-gone")
    # A version whose model's files are gone (deleted from the artifact store, say).
    run = client.create_run(client.get_experiment_by_name("register").experiment_id)
    client.set_terminated(run.info.run_id)
    gone = client.create_model_version("reg-gone", f"{run.info.artifact_uri}/deleted-model", run_id=run.info.run_id)
    client.set_registered_model_alias("reg-gone", "champion", gone.version)
    params = {"onnx_model_uris": int4_run.run.data.tags["model_uri"], "dataset": str(small_csv),
              "registered_model_name": "reg-gone", "alias": "champion"}  # fmt: skip
    evaluated = mlflow_run("evaluate", params, experiment="register")
    said = [
        line for line in evaluated.output.splitlines() if line.startswith("evaluate: @champion (version 1) cannot be")
    ]
    assert len(said) == 1, evaluated.output[-3000:]
    summary = _summary(evaluated.run_id)
    assert summary["champion"] is None and "version 1" in summary["champion_error"]
    result = _register(mlflow_run, evaluated.run_id, "reg-gone")
    assert result.run.data.tags["alias_moved"] == "true" and "cannot be" in result.run.data.tags["alias_reason"]
    assert client.get_model_version_by_alias("reg-gone", "champion").version == "2"


def _start_register(eval_run_id: str, name: str, *args: str) -> subprocess.Popen:
    """``python -m steps.register`` started, not waited for."""
    cmd = [sys.executable, "-m", "steps.register", "--eval_run_id", eval_run_id, "--registered_model_name", name, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def test_parallel_registrations_give_distinct_versions_and_one_consistent_alias(good_eval, weaker_eval, tracking_uri):
    # Two evaluations that challenged no champion, registered at once, in both launch orders: each
    # gets its own version, and the alias ends on one of them, whose run says it moved it there.
    client = mlflow.MlflowClient()
    launches = {"reg-parallel-a": [good_eval, weaker_eval], "reg-parallel-b": [weaker_eval, good_eval]}
    procs = {(name, e): _start_register(e, name) for name, evals in launches.items() for e in evals}
    outs = {key: p.communicate(timeout=300)[0] for key, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outs
    for name in launches:
        versions = _versions(name)
        assert sorted(v.version for v in versions) == ["1", "2"]
        assert sorted(v.tags["source_eval_run"] for v in versions) == sorted([good_eval, weaker_eval])
        holder = client.get_model_version_by_alias(name, "champion")
        winner_out = outs[(name, holder.tags["source_eval_run"])]
        assert f"moved to version {holder.version}" in winner_out, outs


@pytest.mark.parametrize("name", ["it's chat", 'the "chat" model', "ünïcode chät", "both ' and \" quotes"])
def test_odd_names_register_each_evaluation_once(good_eval, tracking_uri, name):
    for _ in range(2):
        proc = run_step("register", "--eval_run_id", good_eval, "--registered_model_name", name, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    with pytest.raises(MlflowException):
        client.get_model_version(name, "2")  # the second run found the first's version
    assert "is already version 1" in proc.stdout


@pytest.mark.parametrize(
    "args,param,env",
    [
        (["--eval_run_id", "0123456789abcdef0123456789abcdef"], "eval_run_id", {}),
        (["--eval_run_id", ""], "eval_run_id", {}),
        (["--eval_run_id", "x", "--force", "maybe"], "--force", {}),
        (["--eval_run_id", "x", "--alias", "latest"], "alias", {}),
        (["--eval_run_id", "x", "--registered_model_name", "flat"], "registered_model_name",
         {"MLFLOW_REGISTRY_URI": "databricks-uc"}),
        (["--eval_run_id", "x", "--registered_model_name", "team/chat"], "registered_model_name", {}),
    ],
)  # fmt: skip
def test_bad_input_fails_with_one_line(args, param, env, tracking_uri, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    line = one_line_error(run_step("register", *args, timeout=60))
    assert param in line, line


def test_serving_the_champion_answers_and_rejects_malformed_requests(mlflow_run, good_eval, tmp_path):
    _register(mlflow_run, good_eval, "reg-serve")
    with serving("models:/reg-serve@champion", tmp_path / "serve.log") as base:
        status, body = post(f"{base}/invocations", {"inputs": {"question": ["What is the capital of Spain?"]}})
        assert 400 <= status < 500 and "prompt" in body
        status, body = post(f"{base}/invocations", {"inputs": {"prompt": ["What is the capital of Spain?"]}})
        assert status == 200 and "Madrid" in body
