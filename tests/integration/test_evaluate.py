"""evaluate through ``mlflow run`` on models logged by the two wrapper steps."""

import json
import os
import subprocess
import sys

import mlflow
import pytest

from phi3mlflow import metrics, tiny
from tests.support import ROOT, one_line_error, run_step


@pytest.fixture(scope="module")
def int8_run(mlflow_run):
    return mlflow_run("onnx_wrapper", {"precision": "int8", "serve_max_new_tokens": 32}, experiment="evaluate")


@pytest.fixture(scope="module")
def eval_run(mlflow_run, chat_run, int4_run, int8_run):
    """Three candidates: the transformers reference and two ONNX precisions."""
    return mlflow_run(
        "evaluate",
        {
            "chat_model_uri": chat_run.run.data.tags["model_uri"],
            "onnx_model_uris": f"{int4_run.run.data.tags['model_uri']},{int8_run.run.data.tags['model_uri']}",
            "max_new_tokens": 32,
        },
        experiment="evaluate",
    )


KEYS = ("chat", "onnx_int4", "onnx_int8")


def _artifact(run_id, path, tmp_path):
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path))


@pytest.mark.slow
def test_every_candidate_scores_high_and_every_metric_is_logged(eval_run):
    run = eval_run.run
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for key in KEYS:
        assert m[f"{key}_accuracy"] >= 0.95
        for name in metrics.METRICS:
            assert f"{key}_{name}" in m
        assert 0 < m[f"{key}_latency_p50_ms"] <= m[f"{key}_latency_p95_ms"]
        assert m[f"{key}_tokens_per_s"] > 0
        assert m[f"{key}_accuracy_ci_low"] <= m[f"{key}_accuracy"] <= m[f"{key}_accuracy_ci_high"]
    for key in KEYS[1:]:
        assert 0.9 <= m[f"{key}_agreement"] <= 1.0
        delta = m[f"{key}_vs_reference_delta"]
        assert delta == pytest.approx(m[f"{key}_accuracy"] - m["chat_accuracy"], abs=1e-6)
        assert m[f"{key}_vs_reference_ci_low"] <= delta <= m[f"{key}_vs_reference_ci_high"]
        assert 0 <= m[f"{key}_vs_reference_p_value"] <= 1
        # Distribution fidelity against the reference, teacher-forced on its answers.
        assert 0 <= m[f"{key}_kld_mean"] <= m[f"{key}_kld_p99"] <= m[f"{key}_kld_max"] + 1e-12
        assert 0.5 <= m[f"{key}_top1_agreement"] <= 1 and m[f"{key}_ppl_ratio"] > 0
    assert "chat_agreement" not in m and "chat_vs_reference_delta" not in m and "chat_kld_mean" not in m
    # The run's own rows are all prefixed: no bare "accuracy" that would read as the run's.
    assert not set(metrics.METRICS) & set(m)
    assert run.data.tags["best"] in KEYS and run.data.tags["winner"] in KEYS


@pytest.mark.slow
def test_the_summary_ranks_every_candidate_and_the_table_and_plot_show_them(eval_run, chat_run, tmp_path):
    run = eval_run.run
    summary = json.load(open(_artifact(run.info.run_id, "summary.json", tmp_path)))
    assert summary["metric"] == "accuracy" and summary["reference"] == "chat"
    assert summary["goals"] == {"min_accuracy": 0.9, "max_accuracy_drop": 1.0, "max_kld": None}  # the defaults
    ranked = summary["candidates"]
    assert sorted(c["key"] for c in ranked) == sorted(KEYS) and [c["rank"] for c in ranked] == [1, 2, 3]
    assert ranked[0]["key"] == run.data.tags["best"] == summary["winner"] == run.data.tags["winner"]
    # The winner is the fastest per question of the candidates tied with it within the noise.
    tied = [c for c in ranked if c["key"] in summary["tied"]]
    assert all(ranked[0]["ms_per_question"] <= c["ms_per_question"] for c in tied)
    by_key = {c["key"]: c for c in ranked}
    assert by_key["chat"]["model_uri"] == chat_run.run.data.tags["model_uri"]
    assert (by_key["chat"]["wrapper"], by_key["chat"]["precision"]) == ("chat", "fp32")
    assert (by_key["onnx_int8"]["wrapper"], by_key["onnx_int8"]["precision"]) == ("onnx", "int8")
    assert by_key["chat"]["vs_reference"] is None and by_key["chat"]["agreement"] is None
    assert by_key["chat"]["fidelity"] is None
    for key in KEYS[1:]:
        assert by_key[key]["agreement"] == run.data.metrics[f"{key}_agreement"]
        assert by_key[key]["meets_goals"] is True and by_key[key]["missed"] == ""
        assert by_key[key]["vs_reference"]["n"] == len(tiny.load_questions())
        assert by_key[key]["fidelity"]["kld_mean"] == pytest.approx(run.data.metrics[f"{key}_kld_mean"])
    side = json.load(open(_artifact(run.info.run_id, "candidates_table.json", tmp_path)))
    side_rows = [dict(zip(side["columns"], r, strict=True)) for r in side["data"]]
    assert [r["candidate"] for r in side_rows] == [c["key"] for c in ranked]
    assert all("…" in r["accuracy_95ci"] for r in side_rows)
    png = open(_artifact(run.info.run_id, "comparison.png", tmp_path), "rb").read()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    table = json.load(open(_artifact(run.info.run_id, "eval_table.json", tmp_path)))
    cols = table["columns"]
    for col in ("question", "expected", *(f"{k}_{c}" for k in KEYS for c in ("answer", "correct", "latency_ms")),
                "onnx_int4_agrees", "onnx_int8_agrees"):  # fmt: skip
        assert col in cols
    rows = [dict(zip(cols, r, strict=True)) for r in table["data"]]
    assert len(rows) == len(tiny.load_questions())
    spain = next(r for r in rows if r["question"] == "What is the capital of Spain?")
    assert {spain[f"{k}_answer"] for k in KEYS} == {"The capital of Spain is Madrid."}
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert inputs["questions"].dataset.digest
    assert [t.value for t in inputs["questions"].tags] == ["evaluation"]


@pytest.mark.slow
def test_each_candidates_metrics_are_on_its_logged_model_and_the_search_ranks_them_alike(eval_run):
    from phi3mlflow.summary import Summary

    run = eval_run.run
    summary = Summary.from_dict(mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/summary.json"))
    digest = next(d.dataset.digest for d in run.inputs.dataset_inputs if d.dataset.name == "questions")
    # Logged from a nested run per candidate, named after it, so the evaluate run's rows stay prefixed.
    nested = {r.data.tags["mlflow.runName"]: r.info.run_id for r in mlflow.MlflowClient().search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")}  # fmt: skip
    assert set(nested) == {f"evaluate {c.key}" for c in summary.candidates}
    against = {"agreement", "vs_reference_delta", "vs_reference_ci_low", "vs_reference_ci_high", "vs_reference_p_value",
               "kld_mean", "kld_p99", "kld_max", "top1_agreement", "ppl_ratio"}  # fmt: skip
    for c in summary.candidates:
        logged = mlflow.get_logged_model(c.model_uri.split("/")[1])
        mine = {m.key: m for m in logged.metrics if m.run_id == nested[f"evaluate {c.key}"]}
        extra = {"accuracy_ci_low", "accuracy_ci_high"} | (set() if c.key == "chat" else against)
        assert set(mine) == set(metrics.METRICS) | extra
        assert mine["accuracy"].value == pytest.approx(c.accuracy)
        assert mine["accuracy"].dataset_name == "questions" and mine["accuracy"].dataset_digest == digest
        assert run.data.metrics[f"{c.key}_accuracy"] == pytest.approx(c.accuracy)
    # MLflow's own ranking of the logged models, by the latest metrics on this dataset, is summary.json's.
    on_this_set = {"dataset_name": "questions", "dataset_digest": digest}
    found = mlflow.search_logged_models(
        experiment_ids=list(
            {mlflow.get_logged_model(c.model_uri.split("/")[1]).experiment_id for c in summary.candidates}
        ),  # fmt: skip
        datasets=[on_this_set],
        order_by=[
            {"field_name": "metrics.accuracy", "ascending": False, **on_this_set},
            {"field_name": "metrics.ms_per_question", "ascending": True, **on_this_set},
        ],  # fmt: skip
        output_format="list",
    )
    ids = [c.model_uri.split("/")[1] for c in summary.candidates]
    assert [m.model_id for m in found if m.model_id in ids] == ids


@pytest.mark.slow
def test_every_request_leaves_a_trace_linked_to_its_model_with_token_counts(eval_run, tmp_path):
    """The chat model is asked one question per request, the ONNX models in batches: every request
    leaves one trace linked to its model, with its token counts (per question too in a batch)."""
    from phi3mlflow.summary import Summary

    run = eval_run.run
    summary_dict = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/summary.json")
    summary = Summary.from_dict(summary_dict)
    per_request = summary_dict["questions_per_request"]
    n = len(tiny.load_questions())
    # The tiny model's caps (32 prompts, 4096 tokens) at max_new_tokens 32: 32 questions a request.
    assert per_request == {"chat": 1, "onnx_int4": 32, "onnx_int8": 32}
    assert "wall time" in summary_dict["latency"]
    traces = mlflow.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id, return_type="list",
                                  max_results=1000)  # fmt: skip
    requests = {k: -(-n // size) for k, size in per_request.items()}
    assert len(traces) == sum(requests.values())
    by_model: dict[str, list] = {}
    for t in traces:
        by_model.setdefault(t.info.trace_metadata.get("mlflow.modelId"), []).append(t)
    with open(_artifact(run.info.run_id, "eval_table.json", tmp_path)) as f:
        table = json.load(f)
    columns = table["columns"]
    for c in summary.candidates:
        mine = by_model[c.model_uri.split("/")[1]]
        assert len(mine) == requests[c.key]
        asked = 0
        for trace in mine:
            spans = {s.name: s for s in trace.data.spans}
            assert set(spans) == {f"answer {c.key}", "chat_template", "generate"}
            gen, template = spans["generate"].attributes, spans["chat_template"].attributes
            assert gen["prompt_tokens"] == template["prompt_tokens"] > 5
            if c.wrapper == "chat":
                asked += 1
                assert 0 < gen["completion_tokens"] <= 32
                # The chat model cannot stream, so it does not know when its first token came.
                assert "ttft_ms" not in gen
                continue
            if "batch_size" not in gen:
                # A request of one question (97 = 3 x 32 + 1) is streamed: it knows its first token's time.
                asked += 1
                assert 0 < gen["completion_tokens"] <= 32
                assert 0 < gen["ttft_ms"] < (spans["generate"].end_time_ns - spans["generate"].start_time_ns) / 1e6
                continue
            size = gen["batch_size"]
            asked += size
            assert "ttft_ms" not in gen
            assert len(template["prompt_tokens_per_question"]) == len(gen["completion_tokens_per_question"]) == size
            assert sum(template["prompt_tokens_per_question"]) == gen["prompt_tokens"]
            assert sum(gen["completion_tokens_per_question"]) == gen["completion_tokens"]
            assert all(0 < k <= 32 for k in gen["completion_tokens_per_question"])
            assert len(spans[f"answer {c.key}"].outputs["answers"]) == size
        assert asked == n
        # In a batch every question's latency is the batch's wall time: at most one value per request
        # (fewer when two requests took the same time to the table's 0.01 ms).
        latency = [row[columns.index(f"{c.key}_latency_ms")] for row in table["data"]]
        assert len(set(latency)) <= requests[c.key]
        if c.wrapper == "onnx":
            assert len(set(latency)) < n


@pytest.mark.slow
def test_custom_csv_with_other_columns_and_one_model(mlflow_run, int4_run, tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_text("q,gold\nWhat is the capital of Italy?,Rome\nWhat is the chemical symbol for iron?,Fe\n")
    result = mlflow_run(
        "evaluate",
        {
            "onnx_model_uris": int4_run.run.data.tags["model_uri"],
            "dataset": str(csv),
            "question_column": "q",
            "answer_column": "gold",
            "select_metric": "latency_p50_ms",
        },
        experiment="evaluate",
    )
    run = result.run
    assert run.data.metrics["onnx_int4_accuracy"] == 1.0  # "Rome" is contained in the sentence answer
    assert run.data.metrics["onnx_int4_exact_match"] == 0.0
    assert "chat_accuracy" not in run.data.metrics and "onnx_int4_agreement" not in run.data.metrics
    summary = json.load(open(_artifact(run.info.run_id, "summary.json", tmp_path)))
    assert summary["winner"] == "onnx_int4" and summary["reference"] is None and summary["metric"] == "latency_p50_ms"
    assert summary["candidates"][0]["agreement"] is None


@pytest.fixture()
def bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    header_only = tmp_path / "header.csv"
    header_only.write_text("question,answer\n")
    wrong_cols = tmp_path / "cols.csv"
    wrong_cols.write_text("prompt,answer\nHi?,Hello\n")
    return {"empty": empty, "header": header_only, "cols": wrong_cols, "missing": tmp_path / "nope.jsonl"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,param",
    [
        ("missing", "dataset"),
        ("empty", "dataset"),
        ("header", "dataset"),
        ("cols", "question_column"),
        ("bad_uri", "onnx_model_uris"),
        ("twice", "onnx_model_uris"),
        ("same_model", "onnx_model_uris: runs:/"),
        ("wrong_kind", "chat_model_uri"),
        ("no_models", "chat_model_uri"),
        ("metric", "select_metric"),
    ],
)
def test_bad_input_fails_before_any_model_loads(case, param, bad_files, int4_run):
    onnx_uri = int4_run.run.data.tags["model_uri"]
    args = {"--onnx_model_uris": onnx_uri}
    if case in bad_files:
        args["--dataset"] = str(bad_files[case])
    elif case == "bad_uri":
        args["--onnx_model_uris"] = "models:/m-doesnotexist"
    elif case == "twice":
        args["--onnx_model_uris"] = f"{onnx_uri}, {onnx_uri}"
    elif case == "same_model":  # one logged model under two URIs is one candidate
        args["--onnx_model_uris"] = f"{onnx_uri},runs:/{int4_run.run_id}/onnx_int4"
    elif case == "wrong_kind":  # both wrappers take chat requests: the flavor tells them apart
        args["--chat_model_uri"] = onnx_uri
    elif case == "no_models":
        args = {}
    elif case == "metric":
        args["--select_metric"] = "vibes"
    proc = run_step("evaluate", *[x for kv in args.items() for x in kv], timeout=120)
    line = one_line_error(proc)
    assert param in line, line
    assert " on 97 questions" not in proc.stdout


@pytest.mark.slow
def test_a_question_beyond_a_models_context_fails_before_any_answer(chat_run, int4_run, tmp_path):
    data = tmp_path / "long.csv"
    data.write_text("question,answer\nWhat is the capital of Spain?,Madrid\n" + "why " * 400 + "?,because\n")
    uris = [
        "--chat_model_uri",
        chat_run.run.data.tags["model_uri"],
        "--onnx_model_uris",
        int4_run.run.data.tags["model_uri"],
    ]
    proc = run_step("evaluate", *uris, "--dataset", str(data), timeout=180)
    assert proc.returncode == 2
    # MLflow warns while loading a model; the error is one line, and the last.
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], proc.stderr
    assert "dataset: long.csv row 2" in lines[-1] and "context of 256 tokens" in lines[-1]
    assert "evaluate: chat models:/" not in proc.stdout


@pytest.mark.slow
def test_a_failure_inside_the_steps_run_is_recorded_on_it(mlflow_run, tmp_path):
    # A model whose per-request cap is below what evaluate asks for fails while answering, inside
    # the evaluate run; the cause must be on that run, not only in a traceback.
    capped = mlflow_run("onnx_wrapper", {"precision": "int4", "max_total_new_tokens": "8"}, experiment="evaluate")
    failed = mlflow_run("evaluate", {"onnx_model_uris": capped.run.data.tags["model_uri"], "max_new_tokens": "16"},
                        experiment="evaluate", check=False)  # fmt: skip
    assert failed.proc.returncode != 0
    run = failed.run
    assert run.info.status == "FAILED"
    assert run.data.tags["phi3.error"].startswith("MlflowException: max_total_new_tokens: ")


def test_answer_metrics_normalise_text():
    assert metrics.contains("The capital of Spain is MADRID!", "madrid") == 1.0
    assert metrics.exact("  the capital of spain is madrid ", "The capital of Spain is Madrid.") == 1.0
    assert metrics.exact("Madrid", "The capital of Spain is Madrid.") == 0.0
    assert metrics.token_f1("capital Madrid", "Madrid is the capital") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert metrics.token_f1("Paris", "Madrid") == 0.0
    assert metrics.agreement(["A.", "b"], ["a", "c"]) == 0.5


def _answers(run_id, tmp_path):
    table = json.load(open(_artifact(run_id, "eval_table.json", tmp_path)))
    cols = table["columns"]
    return [{k: v for k, v in zip(cols, row, strict=True) if k.endswith("_answer")} for row in table["data"]]


@pytest.mark.slow
def test_spark_engine_gives_the_local_engines_answers_and_metrics(
    mlflow_run, eval_run, chat_run, int4_run, int8_run, tmp_path
):
    spark = mlflow_run(
        "evaluate",
        {
            "chat_model_uri": chat_run.run.data.tags["model_uri"],
            "onnx_model_uris": f"{int4_run.run.data.tags['model_uri']},{int8_run.run.data.tags['model_uri']}",
            "max_new_tokens": 32,
            "engine": "spark",
        },
        experiment="evaluate",
    )
    run, local = spark.run, eval_run.run
    assert run.data.params["engine"] == "spark" and local.data.params["engine"] == "local"
    # Greedy decoding: the same answer to every question, row for row.
    assert _answers(run.info.run_id, tmp_path / "s") == _answers(local.info.run_id, tmp_path / "l")
    m, lm = run.data.metrics, local.data.metrics
    for key in KEYS:
        for name in ("accuracy", "exact_match", "f1"):
            assert m[f"{key}_{name}"] == lm[f"{key}_{name}"]
        # Spark has no per-row clock: the amortised latency makes p50 == p95.
        assert m[f"{key}_latency_p50_ms"] == m[f"{key}_latency_p95_ms"] > 0
        assert m[f"{key}_tokens_per_s"] > 0
    assert m["onnx_int8_agreement"] == lm["onnx_int8_agreement"] and run.data.tags["best"] in KEYS


@pytest.mark.slow
def test_spark_udf_still_cannot_feed_the_chat_model(chat_run):
    """Why the chat model is scored with mapInPandas: if an MLflow upgrade makes this pass, use spark_udf."""
    import pandas as pd

    from phi3mlflow import spark_scoring

    spark = spark_scoring.session()
    try:
        import pyspark.sql.functions as F

        df = spark.createDataFrame(pd.DataFrame({"q": ["What is the capital of Spain?"]})).select(
            F.array(F.struct(F.lit("user").alias("role"), F.col("q").alias("content"))).alias("messages"),
            F.lit(8).cast("long").alias("max_tokens"),
        )
        result_type = "choices array<struct<message: struct<content: string>>>"
        udf = mlflow.pyfunc.spark_udf(
            spark, chat_run.run.data.tags["model_uri"], env_manager="local", result_type=result_type
        )
        with pytest.raises(Exception, match="Input messages should be list of dictionaries"):
            df.withColumn("answer", udf(F.struct("messages", "max_tokens"))).collect()
    finally:
        spark.stop()


@pytest.mark.slow
def test_spark_engine_without_java_fails_before_any_model_loads(int4_run, tmp_path):
    env_path = tmp_path / "bin"
    env_path.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "steps.evaluate", "--onnx_model_uris", int4_run.run.data.tags["model_uri"],
         "--engine", "spark"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "JAVA_HOME"} | {"PATH": str(env_path)},
    )  # fmt: skip
    line = one_line_error(proc)
    assert line.startswith("error: engine:") and "Java" in line, line
