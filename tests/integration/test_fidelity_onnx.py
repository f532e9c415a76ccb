"""phi3mlflow.fidelity end to end on the built-in tiny Phi-3: its fp32 ONNX export matches the
transformers model it came from, int4 drifts further, and the two tokenizers agree."""

import os
from pathlib import Path

import pytest

from phi3mlflow import fidelity
from phi3mlflow.tiny import load_questions

pytestmark = pytest.mark.slow

QUESTIONS = 10


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory) -> Path:
    """The tiny model, built into this module's own cache (or PHI3MLFLOW_TEST_CACHE's, to reuse one)."""
    before = os.environ.get("PHI3MLFLOW_CACHE")
    os.environ["PHI3MLFLOW_CACHE"] = os.environ.get("PHI3MLFLOW_TEST_CACHE") or str(
        tmp_path_factory.mktemp("model-cache")
    )
    from phi3mlflow.tiny import builtin_model_dir

    yield builtin_model_dir()
    if before is None:
        os.environ.pop("PHI3MLFLOW_CACHE", None)
    else:
        os.environ["PHI3MLFLOW_CACHE"] = before


@pytest.fixture(scope="module")
def reference(builtin_dir) -> fidelity.TransformersScorer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(builtin_dir).eval()
    return fidelity.TransformersScorer(model, AutoTokenizer.from_pretrained(builtin_dir))


@pytest.fixture(scope="module")
def chats(builtin_dir):
    from phi3mlflow.genai import GenAIChat
    from phi3mlflow.onnx_export import export

    return {precision: GenAIChat(export(str(builtin_dir), precision)) for precision in ("fp32", "int4")}


@pytest.fixture(scope="module")
def figures(reference, chats) -> dict[str, fidelity.Fidelity]:
    questions = [row["question"] for row in load_questions()[:QUESTIONS]]
    answers = [reference.answer(q, max_new_tokens=32) for q in questions]
    assert all(answers), answers
    calls = []
    candidates = {name: fidelity.GenAIScorer(chat) for name, chat in chats.items()}
    candidates["fp32-stepwise"] = fidelity.GenAIScorer(chats["fp32"], stepwise=True)
    result = fidelity.measure(reference, candidates, questions, answers, progress=lambda *a: calls.append(a))
    assert calls[-1] == (QUESTIONS, QUESTIONS)
    return result


@pytest.mark.parametrize("name", ["fp32", "fp32-stepwise"])
def test_fp32_export_matches_its_source(figures, name):
    fp32 = figures[name]
    assert fp32.positions > 5 * QUESTIONS and fp32.skipped == 0
    assert fp32.kld_mean < 1e-3
    assert fp32.top1_agreement > 0.99
    assert fp32.ppl_ratio == pytest.approx(1.0, abs=1e-3)


def test_int4_drifts_further_than_fp32(figures):
    assert figures["int4"].kld_mean > figures["fp32"].kld_mean
    assert figures["int4"].kld_max >= figures["int4"].kld_p99 >= 0


def test_tokenizers_agree(reference, chats):
    assert all(fidelity.same_tokenizer(reference, chat) for chat in chats.values())


def test_one_prefill_equals_decoding(reference, chats):
    scorer = fidelity.GenAIScorer(chats["fp32"])
    prompt, answer = reference.sequence("What is the capital of Spain?", "The capital of Spain is Madrid.")
    assert abs(scorer.logprobs(prompt, answer) - scorer.logprobs_stepwise(prompt, answer)).max() < 1e-4


def test_a_sequence_beyond_the_context_is_skipped(reference, chats):
    scorer = fidelity.GenAIScorer(chats["fp32"])
    long_answer = "Madrid " * scorer.context_length
    result = fidelity.measure(reference, {"fp32": scorer}, ["What is the capital of Spain?"], [long_answer])
    assert result["fp32"].skipped == 1 and result["fp32"].positions == 0


def test_empty_answer_scores_the_end_token(reference):
    prompt, answer = reference.sequence("What is the capital of Spain?", "")
    assert answer == [reference.end_id]
    assert reference.logprobs(prompt, answer).shape == (1, reference.vocab_size)
