"""A bench-size Phi-3 of random weights (~42 M parameters) for speed measurements.

Hidden 512, 8 layers, a byte-level BPE vocabulary of 8192 trained on seeded synthetic text. The
LM-head rows of the end tokens are zeroed so greedy decoding never stops early: every
measurement generates exactly the tokens it asks for. Built on demand and cached like the
built-in model; nothing here is trained, so it answers nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from phi3mlflow import tiny
from phi3mlflow.cache import cached

SHAPE = {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
         "num_attention_heads": 8, "max_position_embeddings": 1024, "seed": 0}  # fmt: skip


def _corpus(n_words: int = 200_000) -> list[str]:
    rng = random.Random(SHAPE["seed"])
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in ["a", "e", "i", "o", "u", "ai", "ou", "ee"]]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20_000)]
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(words))
        if len(line) == 12:
            lines.append(" ".join(line) + ".")
            line = []
    return lines


def bench_model_dir() -> Path:
    key = hashlib.sha256(
        Path(__file__).read_bytes() + json.dumps(SHAPE, sort_keys=True).encode() + tiny.cache_key().encode()
    ).hexdigest()[:16]
    return cached("bench-phi3", key, _build)


def _build(out: Path) -> None:
    import torch
    from transformers import Phi3ForCausalLM

    tok = tiny.train_tokenizer(_corpus(), vocab_size=SHAPE["vocab_size"])
    tiny.save_tokenizer(tok, out, model_max_length=SHAPE["max_position_embeddings"])
    ids = {t: tok.token_to_id(t) for t in tiny.SPECIAL_TOKENS}
    torch.manual_seed(SHAPE["seed"])
    config = tiny.phi3_config(SHAPE, tok.get_vocab_size(), ids)
    model = Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for t in ("<|end|>", "<|endoftext|>"):
            model.lm_head.weight[ids[t]].zero_()
    model.generation_config = tiny.greedy_generation_config(ids)
    model.save_pretrained(out)
