"""onnx_wrapper: export parity, the logged pickle-free pyfunc, validation and serving."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from phi3mlflow import tiny
from tests.support import one_line_error, post, run_step, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int4_model(int4_run):
    return mlflow.pyfunc.load_model(int4_run.run.data.tags["model_uri"])


def test_fp32_export_matches_transformers_greedy_token_for_token(builtin_dir, onnx_fp32_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from phi3mlflow.genai import GenAIChat, SearchOptions

    hf = AutoModelForCausalLM.from_pretrained(builtin_dir)
    chat = GenAIChat(onnx_fp32_dir)
    opts = SearchOptions(max_new_tokens=32)
    end = chat.tokenizer.to_token_id("<|end|>")
    for row in tiny.load_questions():
        ids = chat.encode(row["question"])
        ours = chat.generate_ids(ids, opts)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
        # ORT GenAI leaves out the final <|end|> that transformers keeps.
        assert ours + [end] == ref, row["question"]


def test_int4_run_logs_a_tagged_model_that_answers_the_bundled_questions(int4_run, int4_model):
    run = int4_run.run
    assert run.info.status == "FINISHED"
    assert run.data.tags["wrapper"] == "onnx" and run.data.tags["precision"] == "int4"
    assert run.data.params["precision"] == "int4"
    # The model builder's chatter is an artifact of the step, not ~90 lines of its console.
    assert "builder|" not in int4_run.output and "Saving GenAI config" not in int4_run.output
    [log] = mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="onnx_export")
    assert log.path.endswith(".builder.log") and log.file_size > 0
    rows = tiny.load_questions()
    questions = [r["question"] for r in rows]
    # At most 32 prompts per request: the model's default cap.
    answers = [
        a for i in range(0, len(rows), 32) for a in int4_model.predict(pd.DataFrame({"prompt": questions[i : i + 32]}))
    ]
    correct = sum(a == r["answer"] for a, r in zip(answers, rows, strict=True))
    assert correct / len(rows) >= 0.95


def test_batched_greedy_answers_equal_one_at_a_time_on_the_bundled_set(int4_model):
    """A request of many prompts decodes them as ORT GenAI generator batches, right-padded to the
    batch's longest prompt; its greedy answers are the ones each prompt gets alone, through the
    plain generator loop."""
    questions = [r["question"] for r in tiny.load_questions()]
    chat = int4_model.unwrap_python_model().chat
    lengths = {len(chat.encode(q)) for q in questions[: chat.max_batch_size]}
    # The first batch holds prompts of several lengths: padding is exercised.
    assert len(lengths) >= 2, lengths
    params = {"max_new_tokens": 24}
    alone = [int4_model.predict({"prompt": q}, params=params)[0] for q in questions]
    batched = [a for i in range(0, len(questions), 32)
               for a in int4_model.predict({"prompt": questions[i : i + 32]}, params=params)]  # fmt: skip
    # Prompts of different lengths in one batch, out of order: still each prompt's own answer.
    mixed = questions[::-7][:9]
    assert int4_model.predict({"prompt": mixed}, params=params) == [alone[questions.index(q)] for q in mixed]
    differ = [q for q, a, b in zip(questions, alone, batched, strict=True) if a != b]
    assert differ == [], differ


def test_a_caller_whose_sink_raises_ends_only_its_own_answer(int4_model):
    """A server's event loop closed under a request makes that request's sink raise on the worker
    thread: its batch-mate still gets the answer it gets alone, and the loop keeps serving."""
    import queue

    from phi3mlflow.batching import Delta, Done, GenerationRequest

    model = int4_model.unwrap_python_model()
    batcher = model.chat.batcher
    turn = {q: GenerationRequest(model.chat.encode_messages([{"role": "user", "content": q}]), 16)
            for q in ("What is the capital of Spain?", "What is the capital of Italy?")}  # fmt: skip
    [(alone, _)] = batcher.complete_all([turn["What is the capital of Italy?"]])

    def broken(event):
        raise RuntimeError("Event loop is closed")

    good: queue.SimpleQueue = queue.SimpleQueue()
    before = batcher.batches
    first, second = batcher.submit_many([(turn["What is the capital of Spain?"], broken),
                                         (turn["What is the capital of Italy?"], good.put)])  # fmt: skip
    events = [good.get(timeout=60)]
    while isinstance(events[-1], Delta):
        events.append(good.get(timeout=60))
    assert isinstance(events[-1], Done) and "".join(e.text for e in events[:-1]) == alone
    # They really shared a batch: one batch ran for both.
    assert batcher.batches == before + 1 and set(batcher.last_batch) == {first, second}
    assert batcher.complete_all([turn["What is the capital of Italy?"]])[0][0] == alone


def test_a_busy_model_is_a_503_not_a_bad_request(int4_run):
    """More requests than the batching loop takes are refused as MLflow's TEMPORARILY_UNAVAILABLE,
    which `mlflow models serve` answers 503 (it answers 400 to an unknown error, blaming the request)."""
    busy = mlflow.pyfunc.load_model(int4_run.run.data.tags["model_uri"])
    busy.unwrap_python_model().chat.batcher.max_waiting = 1
    for request in ({"prompt": ["Hi", "Hello"]}, pd.DataFrame({"messages": [[{"role": "user", "content": "Hi"}]] * 2})):
        with pytest.raises(MlflowException, match="the model is busy") as e:
            busy.predict(request, params={"max_new_tokens": 4} if "prompt" in request else None)
        assert e.value.get_http_status_code() == 503


def test_requirements_name_onnxruntime_genai_not_torch(int4_run):
    reqs = open(mlflow.pyfunc.get_model_dependencies(int4_run.run.data.tags["model_uri"])).read()
    assert "onnxruntime-genai==" in reqs
    assert "torch" not in reqs and "transformers" not in reqs


def test_signature_has_prompt_and_generation_params(int4_model):
    sig = int4_model.metadata.signature
    # prompt requests, and the OpenAI chat request both wrappers answer.
    assert sig.inputs.input_names() == ["prompt", "messages", "max_tokens", "stop", "n", "stream"]
    params = {p.name: p.default for p in sig.params.params}
    assert params == {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "do_sample": False}


def test_prompts_with_chat_markers_pass_through_and_params_apply(int4_model):
    marked = tiny.render_prompt("What is the capital of France?")
    assert int4_model.predict({"prompt": marked}) == ["The capital of France is Paris."]
    assert int4_model.predict({"prompt": ["What is the capital of Peru?", "What is the capital of Cuba?"]}) == [
        "The capital of Peru is Lima.",
        "The capital of Cuba is Havana.",
    ]
    [short] = int4_model.predict({"prompt": "What is the capital of Spain?"}, params={"max_new_tokens": 3})
    assert short and len(short) < len("The capital of Spain is Madrid.")


def test_threads_default_to_all_cores_and_can_be_overridden(int4_run, int4_model):
    from phi3mlflow.genai import default_threads

    assert int4_model.unwrap_python_model().chat.threads == default_threads()
    one = mlflow.pyfunc.load_model(int4_run.run.data.tags["model_uri"], model_config={"intra_op_num_threads": 1})
    assert one.unwrap_python_model().chat.threads == 1
    assert one.predict({"prompt": "What is the capital of Spain?"}) == ["The capital of Spain is Madrid."]


def test_predict_stream_yields_the_answer_in_chunks(int4_model):
    chunks = list(int4_model.predict_stream({"prompt": "What is the chemical symbol for gold?"}))
    assert len(chunks) > 1
    assert "".join(chunks) == "The chemical symbol for gold is Au."


@pytest.mark.parametrize(
    "model_input,params,field",
    [
        ({"question": "What?"}, None, "prompt"),
        ({"prompt": 5}, None, "prompt"),
        ({"prompt": "   "}, None, "prompt"),
        ({"prompt": "word " * 400}, None, "prompt"),
        ({"prompt": "Hi"}, {"max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "Hi"}, {"temperature": -1.0}, "temperature"),
        ({"prompt": "Hi"}, {"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_requests_raise_invalid_parameter_value_naming_the_field(int4_model, model_input, params, field):
    with pytest.raises(MlflowException) as e:
        int4_model.predict(model_input, params=params)
    assert e.value.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert field in e.value.message


def test_caps_bound_one_requests_work_and_can_be_raised(int4_run, int4_model):
    with pytest.raises(MlflowException, match="max_prompts_per_request: the request has 33 prompts"):
        int4_model.predict({"prompt": ["Hi"] * 33})
    with pytest.raises(MlflowException, match="max_total_new_tokens"):
        int4_model.predict({"prompt": ["Hi"] * 2}, params={"max_new_tokens": 4000})
    with pytest.raises(MlflowException, match="max_total_new_tokens"):
        list(int4_model.predict_stream({"prompt": "Hi"}, params={"max_new_tokens": 5000}))
    raised = mlflow.pyfunc.load_model(int4_run.run.data.tags["model_uri"], model_config={"max_prompts_per_request": 64})
    assert len(raised.predict({"prompt": ["What is the capital of Spain?"] * 33}, params={"max_new_tokens": 8})) == 33


def test_loads_without_pickle_from_a_copy_outside_the_repo(int4_run, tmp_path):
    src = mlflow.artifacts.download_artifacts(
        artifact_uri=int4_run.run.data.tags["model_uri"], dst_path=str(tmp_path / "dl")
    )
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(src, copy)
    assert not list(copy.rglob("*.pkl")) and not list(copy.rglob("*.pickle"))
    code = (
        "import mlflow, sys; m = mlflow.pyfunc.load_model(sys.argv[1]);"
        "print(m.predict({'prompt': 'What is the capital of Spain?'})[0])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(copy)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "The capital of Spain is Madrid."


def test_prebuilt_onnx_model_dir_skips_the_export_and_uploads_only_what_the_model_needs(
    mlflow_run, onnx_fp32_dir, tmp_path
):
    # A user's folder as it may lie on disk: a git checkout with a password in its remote's URL, a
    # hub token, notes. None of it may reach the tracking store.
    secret = "hunter2-prebuilt-secret"
    folder = tmp_path / "prebuilt"
    shutil.copytree(onnx_fp32_dir, folder)
    strays = {".git/config": f'[remote "origin"]\n\turl = https://me:{secret}@git.example.com/m.git\n',
              ".cache/huggingface/token": secret, "notes.txt": f"token {secret}"}  # fmt: skip
    for rel, text in strays.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    result = mlflow_run("onnx_wrapper", {"onnx_model_dir": str(folder)}, experiment="onnx-wrapper")
    assert "onnxruntime_genai.models.builder" not in result.output
    run = result.run
    assert run.data.tags["precision"] == "prebuilt"
    uri = run.data.tags["model_uri"]
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "logged"))
    logged = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
    onnx_files = sorted(f.split("/", 2)[-1] for f in logged if f.startswith("artifacts/"))
    assert onnx_files == ["chat_template.jinja", "genai_config.json", "model.onnx", "model.onnx.data",
                          "tokenizer.json", "tokenizer_config.json"], logged  # fmt: skip
    assert not [f for f in logged if any(part.startswith(".") for part in f.split("/"))], logged
    assert not [f for f in logged if secret.encode() in (Path(local) / f).read_bytes()]
    run_files = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run.info.run_id)}
    assert not {".git", ".cache", "notes.txt"} & run_files
    model = mlflow.pyfunc.load_model(uri)
    assert model.predict({"prompt": "What is the capital of Norway?"}) == ["The capital of Norway is Oslo."]


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--precision", "int3"),
        ("--onnx_model_dir", "/no/such/folder"),
        ("--onnx_model_dir", "."),
        ("--serve_max_new_tokens", "-1"),
        ("--temperature", "hot"),
        ("--model", "./missing"),
    ],
)
def test_bad_step_input_fails_fast_naming_the_parameter(flag, value):
    line = one_line_error(run_step("onnx_wrapper", flag, value, timeout=60))
    assert flag in line, line


def test_builder_failure_is_reported_clearly(tmp_path, model_cache):
    from phi3mlflow.onnx_export import ExportError, export

    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}))
    with pytest.raises(ExportError, match="model builder failed"):
        export(str(bogus), "fp32")
    assert not [p for p in model_cache.iterdir() if p.name.startswith(".export-")]


def test_models_serve_answers_good_requests_and_400s_bad_ones(int4_run, tmp_path):
    env = dict(os.environ, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    with serving(int4_run.run.data.tags["model_uri"], tmp_path / "serve.log", env) as base:
        status, body = post(f"{base}/invocations", {"inputs": {"prompt": ["What is the capital of Japan?"]}})
        assert status == 200, body
        assert json.loads(body)["predictions"] == ["The capital of Japan is Tokyo."]
        status, body = post(f"{base}/invocations", {"inputs": {"prompt": [""]}})
        assert status == 400 and "prompt" in body
        status, body = post(f"{base}/invocations", {"inputs": {"prompt": ["Hi"]}, "params": {"top_p": 7.0}})
        assert status == 400 and "top_p" in body
        # One request may not hold the server: 10,000 prompts are refused at once, naming the cap.
        start = time.time()
        status, body = post(f"{base}/invocations", {"inputs": {"prompt": ["What is the capital of Chile?"] * 10_000}})
        assert status == 400 and "max_prompts_per_request" in body and time.time() - start < 30
        big = {"inputs": {"prompt": ["Hi"] * 8}, "params": {"max_new_tokens": 600}}
        status, body = post(f"{base}/invocations", big)
        assert status == 400 and "max_total_new_tokens" in body
        status, _ = post(f"{base}/invocations", {"inputs": {"prompt": ["What is the capital of Chile?"]}})
        assert status == 200  # still serving after bad requests
