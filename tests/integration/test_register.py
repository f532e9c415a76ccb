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
def evaluate_onnx(mlflow_run, int4_run, small_csv):
    def run(**params):
        params = {"onnx_model_uris": int4_run.run.data.tags["model_uri"], "dataset": str(small_csv), **params}
        return mlflow_run("evaluate", params, experiment="register").run_id

    return run


@pytest.fixture(scope="module")
def good_eval(evaluate_onnx):
    return evaluate_onnx()


@pytest.fixture(scope="module")
def poor_eval(evaluate_onnx):
    # Three tokens cannot hold "Rome" after "The capital of": accuracy 0, below min_accuracy 0.5.
    return evaluate_onnx(max_new_tokens=3, min_accuracy=0.5)


@pytest.fixture(scope="module")
def poor_ungated_eval(evaluate_onnx):
    # The same answers with no accuracy goal: it wins its evaluation, but is worse than good_eval.
    return evaluate_onnx(max_new_tokens=3, min_accuracy=0.0)


@pytest.fixture(scope="module")
def weaker_eval(evaluate_onnx, small_csv):
    """The same model on small.csv plus a question it cannot answer: accuracy 2/3, below good_eval's
    1.0 but above a min_accuracy of 0.5, so both pass the gate and only the comparison separates them."""
    path = small_csv.parent / "weaker.csv"
    path.write_text(small_csv.read_text() + "What is the capital of Atlantis?,Poseidonia\n")
    return evaluate_onnx(dataset=str(path), min_accuracy=0.5)


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


def test_a_worse_winner_than_the_current_champion_does_not_take_the_alias(mlflow_run, good_eval, poor_ungated_eval):
    _register(mlflow_run, good_eval, "reg-compare")
    result = _register(mlflow_run, poor_ungated_eval, "reg-compare")
    assert result.run.data.tags["alias_moved"] == "false"
    assert "worse" in result.run.data.tags["alias_reason"]


def _start_register(eval_run_id: str, name: str, *args: str) -> subprocess.Popen:
    """``python -m steps.register`` started, not waited for."""
    cmd = [sys.executable, "-m", "steps.register", "--eval_run_id", eval_run_id, "--registered_model_name", name, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def test_parallel_registrations_give_distinct_versions_and_one_consistent_alias(good_eval, weaker_eval, tracking_uri):
    client = mlflow.MlflowClient()
    weaker = float(client.get_run(weaker_eval).data.metrics["onnx_int4_accuracy"])
    assert 0.5 <= weaker < float(client.get_run(good_eval).data.metrics["onnx_int4_accuracy"])
    # Both evaluations pass the gate (min_accuracy 0.5), so both registrations may move the alias: when
    # they race, the better one must take it back if the weaker one wrote last. Two models, each pair
    # started together, in both launch orders.
    launches = {"reg-parallel-a": [good_eval, weaker_eval], "reg-parallel-b": [weaker_eval, good_eval]}
    procs = {(name, e): _start_register(e, name) for name, evals in launches.items() for e in evals}
    outs = {key: p.communicate(timeout=300)[0] for key, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outs
    for name in launches:
        versions = _versions(name)
        assert sorted(v.version for v in versions) == ["1", "2"]
        assert sorted(v.tags["source_eval_run"] for v in versions) == sorted([good_eval, weaker_eval])
        assert "moved to version" in outs[(name, good_eval)], outs[(name, good_eval)]
        # Whichever finished first, the better evaluation holds the alias.
        holder = client.get_model_version_by_alias(name, "champion")
        assert holder.tags["source_eval_run"] == good_eval, outs


@pytest.mark.parametrize("name", ["it's chat", 'the "chat" model', "ünïcode chät", "both ' and \" quotes"])
def test_odd_names_register_each_evaluation_once(good_eval, tracking_uri, name):
    for _ in range(2):
        proc = run_step("register", "--eval_run_id", good_eval, "--registered_model_name", name, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    with pytest.raises(MlflowException):
        client.get_model_version(name, "2")  # the second run found the first's version
    assert "already version 1" in proc.stdout


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
