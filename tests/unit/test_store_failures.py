"""A tracking server that stops mid-chain: MLflow's retries bounded where the user has not set them,
its failure named in one line, and the runs a chain left RUNNING ended by the next chain only when
nothing else will end them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from phi3mlflow import cli, tags
from phi3mlflow.chain import abandoned


def test_http_retry_defaults_are_set_only_where_the_user_has_not():
    env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "300"}
    cli.bound_http_retries(env)
    assert env == {"MLFLOW_HTTP_REQUEST_TIMEOUT": "300", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip


class MlflowException(Exception):  # named as MLflow's: the check goes by the exception's type name
    pass


class MaxRetryError(Exception):
    pass


def test_a_refused_connection_anywhere_in_the_chain_is_the_tracking_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    try:
        try:
            raise ConnectionRefusedError("[Errno 111] Connection refused")
        except ConnectionRefusedError as inner:
            raise MlflowException("API request to http://127.0.0.1:5999/api/2.0/mlflow/runs/get failed") from inner
    except MlflowException as e:
        assert cli.store_unreachable(e) == (
            "the tracking server http://127.0.0.1:5999 cannot be reached (it refused the connection)"
        )
    assert "did not answer" in cli.store_unreachable(MaxRetryError("HTTPConnectionPool: Max retries exceeded"))


@pytest.mark.parametrize("error", [ValueError("dataset: bad row"), MlflowException("RESOURCE_DOES_NOT_EXIST: run x"),
                                   KeyError("model_uri")])  # fmt: skip
def test_other_failures_are_not_blamed_on_the_store(error):
    assert cli.store_unreachable(error) is None


def _run(run_id, status="RUNNING", start=1_000, where="host-a 4242", entry="evaluate"):
    run_tags = {"mlflow.project.entryPoint": entry} | ({tags.PROCESS: where} if where else {})
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status, start_time=start),
                           data=SimpleNamespace(tags=run_tags))  # fmt: skip


def test_only_runs_an_earlier_chain_left_whose_process_is_gone_are_ended():
    runs = [
        _run("gone"),  # the one to end
        _run("gone-main", entry="main", where="host-a 4243"),
        _run("alive", where="host-a 777"),  # its process still runs: it will end the run itself
        _run("finished", status="FINISHED"),
        _run("newer", start=5_000),  # started after this chain: another chain's, running now
        _run("other-host", where="host-b 4242"),  # its process cannot be looked at from here
        _run("untagged", where=""),  # not the chain's (a user's run, or launched before the tag)
        _run("serve", entry="serve"),  # a server may be up for days
        _run("bad-tag", where="host-a notapid"),
    ]
    ended = abandoned(runs, before_ms=2_000, host="host-a", alive=lambda pid: pid == 777)
    assert [run_id for run_id, _ in ended] == ["gone", "gone-main"]
    assert "its process (4242 on host-a) is gone" in ended[0][1] and "FAILED" in ended[0][1]
