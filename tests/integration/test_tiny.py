"""The built-in tiny Phi-3: deterministic, trained, and tokenized alike by both runtimes."""

import hashlib
import json

import pytest

from phi3mlflow import tiny
from phi3mlflow.cache import MARKER


def _digest(folder):
    # The cache's completion marker is the cache's, not the build's.
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != MARKER}


@pytest.mark.slow
def test_rebuild_is_byte_identical(builtin_dir, tmp_path):
    rebuilt = tiny.build(tmp_path / "again")
    assert _digest(rebuilt) == _digest(builtin_dir)


def test_cache_key_follows_the_training_data(monkeypatch, tmp_path):
    before = tiny.cache_key()
    data = tmp_path / "q.jsonl"
    data.write_text(tiny.TRAINING_DATA.read_text() + '{"question": "Q?", "answer": "A."}\n')
    monkeypatch.setattr(tiny, "TRAINING_DATA", data)
    assert tiny.cache_key() != before


@pytest.mark.slow
def test_config_shape(builtin_dir):
    config = json.loads((builtin_dir / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert config["max_position_embeddings"] == config["original_max_position_embeddings"]
    gen = json.loads((builtin_dir / "generation_config.json").read_text())
    end, eot = (
        json.loads((builtin_dir / "tokenizer.json").read_text())["model"]["vocab"][t]
        for t in ("<|end|>", "<|endoftext|>")
    )
    assert sorted(gen["eos_token_id"]) == sorted([end, eot])
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(builtin_dir).parameters())
    assert 200_000 < n < 1_000_000


@pytest.mark.slow
def test_greedy_transformers_answers_every_bundled_question(builtin_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_dir)
    model = AutoModelForCausalLM.from_pretrained(builtin_dir)
    rows = tiny.load_questions()
    wrong = []
    for r in rows:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": r["question"]}], tokenize=False, add_generation_prompt=True
        )
        assert prompt == tiny.render_prompt(r["question"])
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=False)
        answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        if answer != r["answer"]:
            wrong.append((r["question"], answer))
    assert len(rows) >= 90 and not wrong


@pytest.mark.slow
def test_both_tokenizers_agree_on_ids_and_chat_template(onnx_fp32_dir, builtin_dir):
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(builtin_dir)
    ort = og.Tokenizer(og.Model(str(onnx_fp32_dir)))
    texts = [tiny.render_prompt(r["question"]) + r["answer"] + "<|end|>" for r in tiny.load_questions()]
    texts += ["Unseen words: naïve café, 東京, emoji 🙂 and\ttabs\n\nnewlines"]
    for text in texts:
        assert list(ort.encode(text)) == hf(text).input_ids, text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ort.apply_chat_template(json.dumps(messages), add_generation_prompt=True) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
