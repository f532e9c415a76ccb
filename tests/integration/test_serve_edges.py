"""The OpenAI-compatible server where it is easy to get wrong, as a process: stop strings on the
transformers model, a model that will not load. (The disconnect polling and the error fields are in
tests/unit/test_http_app.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import ROOT, openai_server


@pytest.mark.slow
def test_stop_strings_cut_the_transformers_models_answer(chat_run, tmp_path):
    import openai

    with openai_server(chat_run.run.data.tags["model_uri"], tmp_path / "chat.log") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of Spain?"}]
        out = client.chat.completions.create(model="m", messages=question, max_tokens=16, stop=["Madrid"])
        assert out.choices[0].message.content == "The capital of Spain is "
        assert out.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_a_model_that_will_not_load_fails_in_one_line(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    proc = subprocess.run([sys.executable, "-m", "phi3mlflow.serve", "models:/nope@champion"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model_uri: cannot load 'models:/nope@champion'")
    assert "Traceback" not in proc.stderr
