"""Batch scoring of the question set on Spark, for ``evaluate --engine spark``.

The ONNX pyfunc is scored with ``mlflow.pyfunc.spark_udf`` (string in, string out). The chat model
cannot be: MLflow 3.17's transformers ``llm/v1/chat`` pyfunc rejects the numpy arrays that Arrow
hands a pandas UDF for the ``messages`` column ("Input messages should be list of dictionaries"),
so it is scored with ``mapInPandas``, one model load per partition, the same requests the local
engine sends. ``tests/test_spark.py`` pins that limitation so an MLflow upgrade that lifts it shows.

Spark has no per-row clock: each answer's latency is the job's wall time divided by the rows it
scored (so p50 == p95), and tokens/s is the job's throughput, model loading included.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from phi3mlflow.errors import InputError
from phi3mlflow.evaluation.callers import Answer, OnnxCaller, chat_request
from phi3mlflow.evaluation.candidates import ModelRef


def check_available() -> None:
    """Fail before any model work when this machine cannot start Spark."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise InputError("engine", "spark needs pyspark: pip install -r requirements-spark.txt") from None
    java_home = os.environ.get("JAVA_HOME")
    if not (java_home and os.path.exists(os.path.join(java_home, "bin", "java"))) and not shutil.which("java"):
        raise InputError("engine", "spark needs Java 17 or later (set JAVA_HOME or put java on PATH)")


def session():
    """The active session (Databricks, spark-submit) or a local one; master from PYSPARK_SUBMIT_ARGS."""
    # Workers must run this interpreter: it has the model's libraries and this package.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession  # heavy: Spark, off the fast path

    return (
        SparkSession.builder.appName("phi3-evaluate")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )


def _frame(spark, questions: list[str]):
    import pandas as pd  # heavy: pandas, off the fast path

    df = spark.createDataFrame(pd.DataFrame({"idx": range(len(questions)), "question": questions}))
    return df.repartition(min(len(questions), spark.sparkContext.defaultParallelism))


def _chat_partitions(uri: str, max_new_tokens: int, temperature: float):
    def score(batches):
        import mlflow  # heavy: MLflow, off the fast path  # heavy: MLflow, off the fast path
        import pandas as pd  # heavy: pandas, off the fast path  # heavy: pandas, off the fast path

        model = mlflow.pyfunc.load_model(uri)
        for batch in batches:
            texts, tokens = [], []
            for question in batch["question"]:
                [out] = model.predict(chat_request(question, max_new_tokens, temperature))
                texts.append(out["choices"][0]["message"]["content"])
                tokens.append(int(out["usage"]["completion_tokens"]))
            yield pd.DataFrame({"idx": batch["idx"], "text": texts, "completion_tokens": tokens})

    return score


def score(spark, ref: ModelRef, questions: list[str], max_new_tokens: int, temperature: float) -> list[Answer]:
    """Answer every question with the model ``ref`` names on ``spark``; answers in question order."""
    import mlflow  # heavy: MLflow, off the fast path

    uri = ref.uri
    df = _frame(spark, questions)
    start = time.perf_counter()
    if ref.wrapper == "onnx":
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "do_sample": temperature > 0}
        # A batch job, not a served request: lift the per-request caps to the whole question set.
        caps = {"max_prompts_per_request": len(questions), "max_total_new_tokens": len(questions) * max_new_tokens}
        udf = mlflow.pyfunc.spark_udf(
            spark, uri, result_type="string", env_manager="local", params=params, model_config=caps
        )
        from pyspark.sql.functions import struct  # heavy: Spark, off the fast path

        df = df.withColumnRenamed("question", "prompt")
        # As a struct: the UDF then hands the model a frame of just its named columns. Unnamed, the
        # signature's other (optional) inputs - messages, stop, ... - would arrive as NaN and fail
        # MLflow's schema check.
        rows = df.select("idx", udf(struct("prompt")).alias("text")).toPandas()
    else:
        fn = _chat_partitions(uri, max_new_tokens, temperature)
        rows = df.mapInPandas(fn, schema="idx long, text string, completion_tokens long").toPandas()
    per_row_ms = (time.perf_counter() - start) * 1000 / len(questions)
    rows = rows.sort_values("idx")
    if ref.wrapper == "onnx":
        # As the local engine counts: the ONNX model's own rule.
        chat = OnnxCaller(ref).chat
        counts = [chat.completion_tokens(t, max_new_tokens) for t in rows["text"]]
    else:
        counts = rows["completion_tokens"].tolist()
    return [Answer(t, per_row_ms, int(n)) for t, n in zip(rows["text"], counts, strict=True)]
