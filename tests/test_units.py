"""The fast layer: pure logic, no server, no model, no mlflow run (``pytest -m "not slow"``)."""

import json
import os
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException

from phi3mlflow import cache, metrics, registry
from phi3mlflow.errors import InputError
from phi3mlflow.evaluation import load_dataset
from phi3mlflow.summary import Candidate, Goals, Summary, build


@pytest.mark.parametrize(
    "expected,reply,right",
    [
        ("8 | eight", "The answer is 8.", True),
        ("8 | eight", "The answer is 18.", False),
        ("8 | eight", "Eight!", True),
        ("Paris", "It is paris, France", True),
        ("Paris", "Parisian food", False),
        ("The capital of Spain is Madrid.", "The capital of Spain is Madrid.", True),
        ("H2O | water", "Its formula is H2O.", True),
    ],
)
def test_alias_grading_matches_whole_words(expected, reply, right):
    assert metrics.contains(reply, expected) == float(right)


def test_exact_and_f1_take_the_closest_alias():
    assert metrics.exact("eight", "8 | eight") == 1.0
    assert metrics.token_f1("it is eight", "8 | eight") == pytest.approx(0.5)


@pytest.mark.parametrize(
    "rows,needle",
    [
        ('{"question": "", "answer": "x"}', "row 2: question is empty"),
        ('{"question": "   ", "answer": "x"}', "row 2: question is empty"),
        ('{"question": 42, "answer": "x"}', "row 2: question is not text"),
        ('{"question": null, "answer": "x"}', "row 2: question is not text"),
        ('{"question": "Why?", "answer": ""}', "row 2: answer is missing"),
        ('{"question": "Why?", "answer": null}', "row 2: answer is missing"),
    ],
)
def test_every_dataset_row_is_checked_with_its_number(tmp_path, rows, needle):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "What is 2 plus 2?", "answer": "4 | four"}\n' + rows + "\n")
    with pytest.raises(InputError) as e:
        load_dataset(str(path), "question", "answer")
    assert e.value.parameter == "dataset" and needle in str(e.value) and "\n" not in str(e.value)


def test_a_category_column_is_kept_and_numeric_answers_are_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "What is 2 plus 2?", "answer": 4, "category": "arithmetic"}\n')
    df = load_dataset(str(path), "question", "answer")
    assert list(df.columns) == ["question", "expected", "category"] and df["expected"][0] == "4"


def test_the_real_question_set_is_valid():
    from phi3mlflow import DATA_DIR

    df = load_dataset(str(DATA_DIR / "real_questions.jsonl"), "question", "answer")
    assert len(df) >= 100 and df["question"].is_unique
    assert set(df["category"]) == {"geography", "science", "arithmetic", "language", "history"}


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


def _candidate(key, accuracy, p50, tokens_per_s) -> Candidate:
    wrapper, precision = ("chat", "fp32") if key == "chat" else ("onnx", key.split("_", 1)[1])
    return Candidate.scored(key, wrapper, precision, f"models:/m-{key}", {
        "accuracy": accuracy, "exact_match": accuracy, "f1": accuracy, "latency_p50_ms": p50, "latency_p95_ms": p50,
        "tokens_per_s": tokens_per_s, "ms_per_question": p50})  # fmt: skip


def _summary(chat_acc, onnx_acc, chat_p50=50.0, onnx_p50=10.0, metric="accuracy", min_accuracy=0.5, max_drop=0.02):
    candidates = [_candidate("chat", chat_acc, chat_p50, 10.0), _candidate("onnx_int4", onnx_acc, onnx_p50, 100.0)]
    return build(candidates, metric, Goals(min_accuracy, max_drop), "chat")


def test_the_winner_is_the_best_candidate_that_meets_both_goals():
    assert registry.choose(_summary(0.9, 0.9)).key == "onnx_int4"  # tie: faster wins
    assert registry.choose(_summary(0.8, 0.9)).key == "onnx_int4"
    refused = registry.choose(_summary(0.9, 0.85, metric="tokens_per_s"))
    assert refused.key == "chat" and refused.passes and "max_accuracy_drop" in refused.reason
    none = registry.choose(_summary(0.3, 0.2))
    assert not none.passes and none.key == "chat" and "min_accuracy" in none.reason


def test_candidates_are_ranked_with_their_difference_to_the_reference():
    candidates = [_candidate("chat", 0.62, 300.0, 10.0), _candidate("onnx_fp32", 0.62, 40.0, 80.0),
                  _candidate("onnx_int8", 0.61, 25.0, 120.0), _candidate("onnx_int4", 0.55, 15.0, 200.0)]  # fmt: skip
    answers = {"chat": ["a", "b", "c", "d"], "onnx_fp32": ["a", "b", "c", "d"], "onnx_int8": ["a", "b", "c", "x"],
               "onnx_int4": ["A.", "y", "z", "x"]}  # fmt: skip
    summary = build(candidates, "accuracy", Goals(0.3, 0.05), "chat", answers)
    assert [c.key for c in summary.candidates] == ["onnx_fp32", "chat", "onnx_int8", "onnx_int4"]
    assert [c.rank for c in summary.candidates] == [1, 2, 3, 4]
    assert summary.winner == "onnx_fp32" and summary.best == "onnx_fp32"
    assert summary["onnx_int8"].accuracy_delta == pytest.approx(-0.01) and summary["onnx_int8"].agreement == 0.75
    assert summary["onnx_int4"].agreement == 0.25  # "A." is "a" once normalised
    assert not summary["onnx_int4"].meets_goals and "max_accuracy_drop" in summary["onnx_int4"].missed
    assert summary["chat"].accuracy_delta is None and summary["chat"].agreement is None
    assert Summary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary
    # Sorted by f1 (equal to accuracy here) the same way; by a lower-is-better metric the fastest leads.
    fastest = build([_candidate("chat", 0.62, 300.0, 10.0), _candidate("onnx_int4", 0.55, 15.0, 200.0)],
                    "latency_p50_ms", Goals(0.3, 0.05), "chat")  # fmt: skip
    assert fastest.best == "onnx_int4" and fastest.winner == "chat"


def test_the_verdict_names_ties_wins_and_refusals():
    from phi3mlflow import report

    tie = _summary(1.0, 1.0, chat_p50=45.0, onnx_p50=17.0)
    assert report.verdict(tie) == (
        "onnx_int4 and chat tie on accuracy (1); decided by time per question (17 ms vs 45 ms)"
    )
    assert report.verdict(_summary(0.62, 0.61)) == "chat wins on accuracy: 0.62 vs onnx_int4 0.61"
    refused = report.verdict(_summary(0.62, 0.57))
    assert refused.startswith(
        "chat is the only candidate that meets the goals (accuracy 0.62); refused: onnx_int4 loses"
    )
    assert report.verdict(_summary(0.2, 0.1)).startswith("no candidate meets the goals (chat accuracy 0.2 is below")
    alone = build([_candidate("onnx_int4", 0.9, 10.0, 1.0)], "accuracy", Goals(), None)
    assert report.verdict(alone) == "onnx_int4 alone: accuracy 0.9" and alone["onnx_int4"].accuracy_delta is None


@pytest.mark.parametrize(
    "holder,force,moves,says",
    [
        (None, False, True, "no version holds"),
        ({}, False, True, "records no accuracy"),
        ({"metric.accuracy": "0.8"}, False, True, "beats"),
        ({"metric.accuracy": "0.95"}, False, False, "worse"),
        ({"metric.accuracy": "0.9", "metric.ms_per_question": "10.5"}, False, False, "tie"),
        ({"metric.accuracy": "0.9", "metric.ms_per_question": "20"}, False, True, "tie on accuracy"),
        # A holder recorded before ms_per_question existed: its p50 latency is not compared.
        ({"metric.accuracy": "0.9", "metric.latency_p50_ms": "2000"}, False, False, "tie"),
        ({"metric.accuracy": "0.95"}, True, True, "force"),
    ],
)
def test_the_alias_gate_moves_only_on_a_real_improvement(holder, force, moves, says):
    summary = _summary(0.9, 0.9)
    decision = registry.gate(summary, registry.choose(summary), force, holder, "3")
    assert decision.move is moves and says in decision.reason


def test_a_failing_choice_never_moves_the_alias_without_force():
    summary = _summary(0.3, 0.2)
    choice = registry.choose(summary)
    assert not registry.gate(summary, choice, False, None).move
    assert registry.gate(summary, choice, True, None).move


def test_a_lower_is_better_metric_ranks_and_gates_the_other_way():
    summary = _summary(0.9, 0.9, chat_p50=50.0, onnx_p50=10.0, metric="latency_p50_ms")
    assert [c.key for c in summary.candidates] == ["onnx_int4", "chat"]
    choice = registry.choose(summary)
    assert choice.key == "onnx_int4" and choice.passes
    assert registry.gate(summary, choice, False, {"metric.latency_p50_ms": "20"}, "1").move  # 10 ms beats 20
    assert not registry.gate(summary, choice, False, {"metric.latency_p50_ms": "5"}, "1").move


def test_the_accuracy_goals_hold_at_their_bounds_and_without_a_reference():
    # Exactly min_accuracy, and exactly max_accuracy_drop (0.9 - 0.88 is 0.0200...02 in floating point), pass.
    assert _summary(0.9, 0.88, min_accuracy=0.88)["onnx_int4"].meets_goals
    assert "max_accuracy_drop" in _summary(0.9, 0.87)["onnx_int4"].missed
    assert "min_accuracy" in _summary(0.9, 0.87, min_accuracy=0.875, max_drop=1.0)["onnx_int4"].missed
    # The reference is never measured against itself, and one evaluated model has no reference to lose to.
    assert _summary(0.9, 0.5, max_drop=0.0)["chat"].meets_goals
    alone = build([_candidate("onnx_int4", 0.6, 10.0, 100.0)], "accuracy", Goals(0.5, 0.0), None)
    assert registry.choose(alone).key == "onnx_int4" and registry.choose(alone).passes


def test_a_tie_against_a_holder_without_a_latency_stays_and_names_the_holder():
    summary = _summary(0.9, 0.9)
    choice = registry.choose(summary)
    decision = registry.gate(summary, choice, False, {"metric.accuracy": "0.9"}, "7")
    assert not decision.move and "tie" in decision.reason and "version 7" in decision.reason
    decision = registry.gate(summary, choice, False, {"metric.accuracy": "0.8"})
    assert decision.move and "the current version" in decision.reason


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
    "metric,ours,theirs,rival_writes,holder,writes",
    [
        ("accuracy", "0.9", "0.5", 0, "2", 1),  # no race: one write
        ("accuracy", "0.9", "0.5", 1, "2", 2),  # a worse rival wrote last: ours takes the alias back
        ("accuracy", "0.9", "0.5", 99, "1", 6),  # a rival that never stops: bounded rounds, then leave it
        ("accuracy", "0.9", "1.0", 1, "1", 1),  # a better rival keeps it
        ("accuracy", "0.9", "0.9", 1, "1", 1),  # an equal one too: only a strict improvement takes back
        ("accuracy", "0.9", None, 1, "1", 1),  # a rival that records no metric is left alone
        ("latency_p50_ms", "10", "20", 1, "2", 2),  # lower is better: 10 ms takes back from 20 ms
        ("latency_p50_ms", "30", "20", 1, "1", 1),
    ],
)
def test_settle_alias_takes_the_alias_back_only_from_a_worse_concurrent_writer(
    monkeypatch, metric, ours, theirs, rival_writes, holder, writes
):
    monkeypatch.setattr(registry.time, "sleep", lambda s: None)
    tags = {"2": {f"metric.{metric}": ours}, "1": {} if theirs is None else {f"metric.{metric}": theirs}}
    client = _Registry(tags, rival="1", rival_writes=rival_writes)
    registry.settle_alias(client, "m", "champion", "2", metric, tags["2"])
    assert client.holder == holder and client.writes == ["2"] * writes


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
        registry.settle_alias(client, "m", "champion", "2", "accuracy", client.tags["2"])
        assert client.holder == "2" and len(calls) == failures + 1
    else:
        with pytest.raises(MlflowException, match="UNIQUE"):
            registry.settle_alias(client, "m", "champion", "2", "accuracy", client.tags["2"])
        assert client.holder is None and len(calls) == min(failures, 5)


def test_settle_alias_stops_when_the_alias_is_gone(monkeypatch):
    monkeypatch.setattr(registry.time, "sleep", lambda s: None)
    client = _Registry({"2": {"metric.accuracy": "0.9"}})
    client.get_model_version_by_alias = lambda name, alias: (_ for _ in ()).throw(MlflowException("deleted"))
    registry.settle_alias(client, "m", "champion", "2", "accuracy", client.tags["2"])
    assert client.writes == ["2"]


def test_version_tags_record_the_winner_its_metrics_and_provenance():
    summary = _summary(0.9, 0.85)
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


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PHI3MLFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "_STAT_CACHE", None)
    builds = []

    def build(out):
        builds.append(out)
        (out / "model.safetensors").write_bytes(os.urandom(4096))
        (out / "config.json").write_text(json.dumps({"ok": True}))

    entry = cache.cached("demo", "k1", build)
    assert cache.cached("demo", "k1", build) == entry and len(builds) == 1
    with open(entry / "model.safetensors", "r+b") as f:  # truncated, as a killed copy leaves it
        f.truncate(100)
    assert cache.incomplete(entry) == "model.safetensors is not what was built"
    assert cache.cached("demo", "k1", build) == entry and len(builds) == 2
    assert "incomplete (model.safetensors is not what was built); rebuilding" in capsys.readouterr().err
    # An entry without the completion marker (a build killed before it finished, or an older layout).
    (entry / cache.MARKER).unlink()
    cache.cached("demo", "k1", build)
    assert len(builds) == 3 and cache.incomplete(entry) is None


def test_digests_follow_content_not_names(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI3MLFLOW_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(cache, "_STAT_CACHE", None)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"1" * 100)
    before = cache.tree_digest(tmp_path / "a")
    assert cache.tree_digest(tmp_path / "a") == before
    (tmp_path / "a" / "w.bin").write_bytes(b"2" * 100)
    assert cache.tree_digest(tmp_path / "a") != before


def test_run_names_calls_and_where_to_look():
    from phi3mlflow import report

    assert (
        report.main_run_name("params/smollm2.yaml", {"precisions": "int8", "model": ""})
        == "main smollm2 precisions=int8"
    )
    serve, curl, openai_server = report.call_command("phi3-tiny-chat", "champion")
    assert "models:/phi3-tiny-chat@champion" in serve and '"messages"' in curl and "/invocations" in curl
    assert openai_server.startswith('python -m phi3mlflow.serve "models:/phi3-tiny-chat@champion"')
    assert (
        report.where_to_look("http://127.0.0.1:5000/", "1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    )
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in report.where_to_look("sqlite:///mlflow.db", "0", "r")


def test_an_equal_score_is_a_tie_as_the_version_tags_store_it():
    acc = 97 / 132  # 0.7348484..., stored on the holder as "0.734848"
    summary = build([_candidate("onnx_int4", acc, 10.0, 1.0)], "accuracy", Goals(0.5, 1.0), None)
    holder = registry.version_tags(summary, "onnx_int4", "r", {}, None)
    decision = registry.gate(summary, registry.choose(summary), False, holder, "1")
    assert not decision.move and decision.reason.startswith("tie on accuracy")


@pytest.mark.parametrize("answer,needle", [('["Paris", "paris"]', "must be text"), ('"|"', "no alias left"),
                                           ('"?"', "no alias left")])  # fmt: skip
def test_answers_must_be_text_with_an_alias(tmp_path, answer, needle):
    path = tmp_path / "d.jsonl"
    path.write_text(f'{{"question": "What is the capital of France?", "answer": {answer}}}\n')
    with pytest.raises(InputError) as e:
        load_dataset(str(path), "question", "answer")
    assert e.value.parameter == "dataset" and "row 1" in str(e.value) and needle in str(e.value)


def test_an_old_gguf_version_is_named_not_called_damaged(tmp_path):
    import struct

    from phi3mlflow import gguf

    old = tmp_path / "old.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<I", 1) + b"\0" * 64)
    with pytest.raises(InputError) as e:
        gguf.inspect(old)
    assert "GGUF version 1" in str(e.value) and "damaged" not in str(e.value)


def test_rows_and_aggregates_are_the_metrics_evaluate_logs():
    rows = metrics.score_rows(["It is 8.", "eighteen", "Paris"], ["8 | eight", "8 | eight", "Paris"])
    assert rows["accuracy"] == [1.0, 0.0, 1.0] and rows["exact_match"] == [0.0, 0.0, 1.0]
    agg = metrics.aggregate(rows, [10.0, 20.0, 30.0], [3, 4, 5])
    assert agg["accuracy"] == pytest.approx(2 / 3) and agg["latency_p50_ms"] == 20.0
    assert agg["tokens_per_s"] == pytest.approx(12 / 0.06) and set(agg) == set(metrics.METRICS)


def test_the_digest_memo_forgets_the_temporary_build_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI3MLFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "_STAT_CACHE", None)
    entry = cache.cached("memo", "k", lambda out: (out / "w.bin").write_bytes(b"w" * 10))
    memo = json.loads((tmp_path / "digests.json").read_text())
    assert str((entry / "w.bin").resolve()) in memo and not any(".build-" in k for k in memo)
