"""Registry plumbing: name rules, filter literals, alias writes that race, version tags."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException

from phi3mlflow import registry
from phi3mlflow.errors import InputError
from tests.unit.test_decision import decide, right


@pytest.mark.parametrize(
    "name,uri,ok",
    [
        ("phi3-chat", "", True),
        ('it\'s a "chat" model', "", True),
        ("ünïcode model", "", True),
        ("team/chat", "", False),
        ("chat:v2", "", False),
        ("../chat", "", False),
        ("  ", "", False),
        ("main.default.phi3_chat", "databricks-uc", True),
        ("flat", "databricks-uc", False),
        ("main.my schema.chat", "databricks-uc", False),
    ],
)
def test_registered_model_names_follow_mlflow_and_unity_catalog_rules(name, uri, ok):
    if ok:
        registry.check_names(name, "champion", uri)
    else:
        with pytest.raises(InputError) as e:
            registry.check_names(name, "champion", uri)
        assert e.value.parameter == "registered_model_name"


def test_filter_literals_are_quoted_by_what_they_contain():
    assert registry.quoted("plain") == "'plain'"
    assert registry.quoted("it's") == '"it\'s"'
    assert registry.quoted('it\'s "x"') is None


class _Registry:
    """An in-memory alias for settle_alias. ``rival`` writes its version right after each of our next
    ``rival_writes`` writes, as a concurrent registration that read the alias before our write does."""

    def __init__(self, tags: dict, rival: str | None = None, rival_writes: int = 1):
        self.tags, self.rival, self.rival_writes = tags, rival, rival_writes
        self.holder, self.writes = None, []

    def set_registered_model_alias(self, name, alias, version):
        self.writes.append(version)
        self.holder = version
        if self.rival and self.rival_writes:
            self.holder, self.rival_writes = self.rival, self.rival_writes - 1

    def get_model_version_by_alias(self, name, alias):
        from mlflow.exceptions import MlflowException

        if self.holder is None:
            raise MlflowException("no such alias")
        return SimpleNamespace(version=self.holder, tags=self.tags[self.holder])


@pytest.mark.parametrize(
    "code,failures,written",
    [("BAD_REQUEST", 2, True), ("TEMPORARILY_UNAVAILABLE", 1, True), ("BAD_REQUEST", 5, False),
     ("RESOURCE_DOES_NOT_EXIST", 1, False)],
)  # fmt: skip
def test_an_alias_write_that_lost_a_race_is_written_again(monkeypatch, code, failures, written):
    """Two registrations writing a new alias at once: the SQL store's select-then-insert gives one of
    them a unique-key error (400 through the server, seen in CI). It writes again; other errors, or a
    conflict that does not go away, are raised."""
    from mlflow.protos import databricks_pb2

    monkeypatch.setattr(registry.time, "sleep", lambda s: None)
    client = _Registry({"2": {"metric.accuracy": "0.9"}})
    write, calls = client.set_registered_model_alias, []

    def racing(name, alias, version):
        calls.append(version)
        if len(calls) <= failures:
            raise MlflowException("UNIQUE constraint failed", error_code=getattr(databricks_pb2, code))
        write(name, alias, version)

    client.set_registered_model_alias = racing
    if written:
        registry.settle_alias(client, "m", "champion", "2", None)
        assert client.holder == "2" and len(calls) == failures + 1
    else:
        with pytest.raises(MlflowException, match="UNIQUE"):
            registry.settle_alias(client, "m", "champion", "2", None)
        assert client.holder is None and len(calls) == min(failures, 5)


def test_version_tags_record_the_winner_its_metrics_and_provenance():
    summary = decide({"chat": (right(90), 300.0), "onnx_int4": (right(85), 10.0)})
    summary["onnx_int4"].exact_match = 0.123456789
    tags = registry.version_tags(summary, "onnx_int4", "run1", {"source_model": "m"}, "abc")
    assert tags == {"source_eval_run": "run1", "candidate": "onnx_int4", "wrapper": "onnx", "precision": "int4",
                    "source_model": "m",
                    "selected_metric": "accuracy", "metric.accuracy": "0.85", "metric.exact_match": "0.123457",
                    "metric.f1": "0.85", "metric.latency_p50_ms": "10", "metric.latency_p95_ms": "10",
                    "metric.ms_per_question": "10",
                    "metric.tokens_per_s": "100", "git_commit": "abc"}  # fmt: skip
    assert registry.version_tags(summary, "chat", "r", {}, None)["precision"] == "fp32"
    assert "git_commit" not in registry.version_tags(summary, "onnx_int4", "r", {}, None)


class _Versions:
    """search_model_versions over a fixed list; records the filters it was given."""

    def __init__(self, versions, error=None):
        self.versions, self.error, self.filters = versions, error, []

    def search_model_versions(self, filter_string):
        self.filters.append(filter_string)
        if self.error:
            raise self.error
        return self.versions


def test_find_version_filters_by_name_when_it_can_and_takes_the_newest():
    found = [SimpleNamespace(name=n, version=v) for n, v in [("a", "9"), ("a", "10"), ("b", "11")]]
    client = _Versions(found)
    assert registry.find_version(client, "a", "run1").version == "10"  # numeric, not text, order
    assert client.filters == ["name = 'a' and tag.source_eval_run = 'run1'"]
    # A name with both kinds of quote has no filter literal: filter on the tag, then by name here.
    odd = 'it\'s "b"'
    client = _Versions([*found, SimpleNamespace(name=odd, version="3")])
    assert registry.find_version(client, odd, "run1").version == "3"
    assert client.filters == ["tag.source_eval_run = 'run1'"]
    assert registry.find_version(_Versions([]), "a", "run1") is None
    assert registry.find_version(_Versions(found, MlflowException("down")), "a", "run1") is None


def test_source_run_tags_follow_a_runs_uri_and_give_nothing_otherwise():
    class Client:
        def get_run(self, run_id):
            if run_id != "r1":
                raise MlflowException(f"no run {run_id}")
            return SimpleNamespace(data=SimpleNamespace(tags={"precision": "int4"}))

    assert registry.source_run_tags(Client(), "runs:/r1/model") == {"precision": "int4"}
    assert registry.source_run_tags(Client(), "runs:/r2/model") == {}
    assert registry.source_run_tags(Client(), "/some/folder") == {}
