"""The built-in tiny Phi-3: a deterministic, offline stand-in for Phi-3-mini.

It is a ~0.5 M-parameter ``Phi3ForCausalLM`` with a GPT-2-style byte-level BPE tokenizer and the
Phi-3 chat template, trained for a few seconds to memorise the bundled question set. It is a
memoriser for offline runs and tests, not a language model: it answers the bundled questions and
little else.

The model is built on demand and cached under ``phi3mlflow.cache.cache_root()/tiny-phi3-<key>``, where the key
hashes everything that changes the bytes (this file, the training data, the library versions).
A rebuild with the same inputs is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from phi3mlflow import DATA_DIR
from phi3mlflow.cache import cached, versions
from phi3mlflow.progress import bar, stage

BUILTIN_MODEL = "builtin:tiny-phi3"

# The Phi-3-mini-4k-instruct chat template, verbatim, so prompts look like the real model's.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Ids 0..4, in this order; <|endoftext|> doubles as pad like in Phi-3.
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Everything that shapes the bytes; part of the cache key.
HPARAMS: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    # ORT GenAI's builder takes any Linear with out_features == vocab_size for the LM head, so
    # neither qkv_proj (3 * hidden) nor gate_up_proj (2 * intermediate) may be 512 wide.
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "steps": 100,
    "lr": 3e-3,
    "weight_decay": 0.0,
    "seed": 0,
    "threads": 2,
}
TRAINING_DATA = DATA_DIR / "questions.jsonl"


def load_questions(path: Path = TRAINING_DATA) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cache_key() -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(TRAINING_DATA.read_bytes())
    h.update(json.dumps(HPARAMS, sort_keys=True).encode())
    h.update(versions("torch", "transformers", "tokenizers").encode())
    return h.hexdigest()[:16]


def builtin_model_dir() -> Path:
    """The built-in model's folder, building it first if needed."""
    return cached("tiny-phi3", cache_key(), build)


def train_tokenizer(texts: list[str], vocab_size: int = HPARAMS["vocab_size"]):
    """A GPT-2-style byte-level BPE with the Phi-3 chat tokens, which both runtimes encode alike."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # heavy: tokenizers, off the fast path

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out: Path, model_max_length: int = HPARAMS["max_position_embeddings"]) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        # GPT2Tokenizer: both transformers and ORT GenAI read it as plain byte-level BPE.
        "tokenizer_class": "GPT2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": PHI3_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")


def render_prompt(question: str) -> str:
    """The Phi-3 chat prompt for one user turn, ready for the assistant's answer."""
    return f"<|user|>\n{question}<|end|>\n<|assistant|>\n"


def phi3_config(shape: dict, vocab_size: int, ids: dict):
    """A Phi-3 config of ``shape`` (hidden/intermediate size, layers, heads, context) whose special
    tokens are the tokenizer's ``ids``; shared by the built-in model and the bench model."""
    from transformers import Phi3Config  # heavy: transformers, off the fast path

    return Phi3Config(
        vocab_size=vocab_size,
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=shape["max_position_embeddings"],
        # Equal to max_position_embeddings, or the ONNX builder picks the LongRoPE variant.
        original_max_position_embeddings=shape["max_position_embeddings"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def greedy_generation_config(ids: dict):
    """Greedy decoding that stops at the end of the assistant's turn or of the text."""
    from transformers import GenerationConfig  # heavy: transformers, off the fast path

    return GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )


def build(out: Path) -> Path:
    """Train the tiny model on the bundled question set and save it to ``out``."""
    with stage(f"{BUILTIN_MODEL}: training the built-in model ({HPARAMS['steps']} steps, once; cached after)"):
        return _build(out)


def _build(out: Path) -> Path:
    import torch  # heavy: torch, off the fast path
    from transformers import Phi3ForCausalLM  # heavy: transformers, off the fast path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_questions()
    prompts = [render_prompt(r["question"]) for r in rows]
    answers = [r["answer"] + "<|end|>" for r in rows]
    tok = train_tokenizer([p + a for p, a in zip(prompts, answers, strict=True)])
    save_tokenizer(tok, out)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}

    # Determinism: fixed seed, fixed thread count and deterministic kernels, restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(HPARAMS["threads"])
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(HPARAMS["seed"])
    try:
        config = phi3_config(HPARAMS, tok.get_vocab_size(), ids)
        model = Phi3ForCausalLM(config)
        input_ids, labels, mask = _batch(tok, prompts, answers, ids["<|endoftext|>"])
        opt = torch.optim.AdamW(model.parameters(), lr=HPARAMS["lr"], weight_decay=HPARAMS["weight_decay"])
        model.train()
        for _ in bar(range(HPARAMS["steps"]), desc="training the built-in tiny-phi3", unit="step"):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)

    model.generation_config = greedy_generation_config(ids)
    model.save_pretrained(out)
    (out / "BUILTIN.json").write_text(
        json.dumps({"model": BUILTIN_MODEL, "final_loss": round(loss.item(), 6), **HPARAMS}, indent=2, sort_keys=True)
        + "\n"
    )
    return out


def _batch(tok, prompts, answers, pad_id):
    """Right-padded full batch; labels mask the prompt so loss falls on answer tokens only."""
    import torch  # heavy: torch, off the fast path

    seqs, labels = [], []
    for p, a in zip(prompts, answers, strict=True):
        p_ids = tok.encode(p).ids
        a_ids = tok.encode(a).ids
        seqs.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return input_ids, label_t, mask
