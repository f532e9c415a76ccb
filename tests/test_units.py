"""The fast layer: pure logic, no server, no model, no mlflow run (``pytest -m "not slow"``)."""

import json
import os

import pytest

from phi3mlflow import cache, metrics, registry
from phi3mlflow.errors import InputError
from phi3mlflow.evaluation import load_dataset


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


def _summary(chat_acc, onnx_acc, chat_p50=50.0, onnx_p50=10.0, metric="accuracy"):
    models = {
        "chat": {"accuracy": chat_acc, "latency_p50_ms": chat_p50, "tokens_per_s": 10.0},
        "onnx": {"accuracy": onnx_acc, "latency_p50_ms": onnx_p50, "tokens_per_s": 100.0},
    }
    return {"metric": metric, "reference": "chat", "models": models}


def test_choose_takes_the_best_candidate_that_meets_both_goals():
    assert registry.choose(_summary(0.9, 0.9), 0.5, 0.02).key == "onnx"  # tie: faster wins
    assert registry.choose(_summary(0.8, 0.9), 0.5, 0.02).key == "onnx"
    refused = registry.choose(_summary(0.9, 0.85, metric="tokens_per_s"), 0.5, 0.02)
    assert refused.key == "chat" and refused.passes and "max_accuracy_drop" in refused.reason
    none = registry.choose(_summary(0.3, 0.2), 0.5, 0.02)
    assert not none.passes and none.key == "chat" and "min_accuracy" in none.reason


@pytest.mark.parametrize(
    "holder,force,moves,says",
    [
        (None, False, True, "no version holds"),
        ({}, False, True, "records no accuracy"),
        ({"metric.accuracy": "0.8"}, False, True, "beats"),
        ({"metric.accuracy": "0.95"}, False, False, "worse"),
        ({"metric.accuracy": "0.9", "metric.latency_p50_ms": "10.5"}, False, False, "tie"),
        ({"metric.accuracy": "0.9", "metric.latency_p50_ms": "20"}, False, True, "tie on accuracy"),
        ({"metric.accuracy": "0.95"}, True, True, "force"),
    ],
)
def test_the_alias_gate_moves_only_on_a_real_improvement(holder, force, moves, says):
    summary = _summary(0.9, 0.9)
    decision = registry.gate(summary, registry.choose(summary, 0.5, 0.02), force, holder, "3")
    assert decision.move is moves and says in decision.reason


def test_a_failing_choice_never_moves_the_alias_without_force():
    summary = _summary(0.3, 0.2)
    choice = registry.choose(summary, 0.5, 0.02)
    assert not registry.gate(summary, choice, False, None).move
    assert registry.gate(summary, choice, True, None).move


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
