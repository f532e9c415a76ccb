"""pipeline_wrapper through the real ``mlflow run`` CLI against the real test server."""

import mlflow
import pytest

from tests.support import one_line_error, run_step

pytestmark = pytest.mark.slow


def test_run_finishes_with_params_and_model_uri_tag(chat_run):
    run = chat_run.run
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "builtin:tiny-phi3"
    assert run.data.params["serve_max_new_tokens"] == "32"
    assert run.data.params["trust_remote_code"] == "false"
    assert run.data.tags["model_uri"].startswith("models:/")
    assert run.data.tags["wrapper"] == "chat"


def test_logged_model_answers_in_chat_completion_schema(chat_run):
    model = mlflow.pyfunc.load_model(chat_run.run.data.tags["model_uri"])
    [out] = model.predict({"messages": [{"role": "user", "content": "What is the capital of Spain?"}]})
    assert out["object"] == "chat.completion"
    assert out["id"] and isinstance(out["created"], int)
    assert out["model"] == "builtin:tiny-phi3"
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "The capital of Spain is Madrid."
    assert choice["finish_reason"] == "stop"
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_logged_model_carries_pinned_requirements_without_torchvision(chat_run):
    local = mlflow.pyfunc.get_model_dependencies(chat_run.run.data.tags["model_uri"])
    reqs = open(local).read()
    assert "transformers==" in reqs and "torch==" in reqs
    assert "torchvision" not in reqs


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--model", "./no/such/model", "--model"),
        ("--model", "not a model id!", "--model"),
        ("--serve_max_new_tokens", "0", "--serve_max_new_tokens"),
        ("--serve_max_new_tokens", "ten", "--serve_max_new_tokens"),
        ("--temperature", "-0.5", "--temperature"),
        ("--trust_remote_code", "yes", "--trust_remote_code"),
    ],
)
def test_bad_input_fails_fast_with_one_line_naming_the_parameter(flag, value, needle):
    proc = run_step("pipeline_wrapper", flag, value, timeout=60)
    line = one_line_error(proc)
    assert needle in line, line
    assert "Loading" not in proc.stdout


def test_bad_input_through_mlflow_run_leaves_the_run_failed_without_a_model(mlflow_run):
    result = mlflow_run("pipeline_wrapper", {"serve_max_new_tokens": 0}, experiment="pipeline-wrapper-bad", check=False)
    assert result.proc.returncode != 0
    assert "--serve_max_new_tokens" in result.output
    run = result.run
    assert run.info.status == "FAILED"
    assert "model_uri" not in run.data.tags
