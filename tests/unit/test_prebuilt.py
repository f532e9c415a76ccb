"""Which files of a prebuilt ORT GenAI folder travel with a logged model (phi3mlflow/prebuilt.py)."""

from __future__ import annotations

import json

import pytest

from phi3mlflow import prebuilt
from phi3mlflow.errors import InputError


def _folder(tmp_path, config: dict, files: tuple[str, ...]):
    root = tmp_path / "prebuilt"
    root.mkdir()
    (root / "genai_config.json").write_text(json.dumps(config))
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


DECODER = {"model": {"decoder": {"filename": "model.onnx", "inputs": {"input_ids": "input_ids"}}}}
NEEDED = (
    "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "config.json", "generation_config.json", "chat_template.jinja", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "processor_config.json", "additional_chat_templates/tool_use.jinja",
)  # fmt: skip
STRAY = (
    ".git/config", ".git/objects/ab/cdef", ".cache/huggingface/token", ".env", "notes.txt", "other.onnx",
    "other.onnx.data", "sub/tokenizer.json", "builder.log", ".chat_template.jinja.swp",
)  # fmt: skip


def test_only_what_the_model_needs_is_selected(tmp_path):
    root = _folder(tmp_path, DECODER, NEEDED + STRAY)
    assert prebuilt.model_files(root) == sorted(("genai_config.json", *NEEDED))


def test_every_file_genai_config_names_is_selected_with_its_external_data(tmp_path):
    config = {"model": {"decoder": {"filename": "parts/decoder.onnx"}, "embedding": {"filename": "embed.onnx"},
                        "vision": {"filename": "vision.onnx", "config_filename": "vision_processor.json"}}}  # fmt: skip
    files = ("parts/decoder.onnx", "parts/decoder.onnx_data", "embed.onnx", "embed.onnx.data", "vision.onnx",
             "vision_processor.json", "parts/.decoder.onnx.data", "parts/notes.txt")  # fmt: skip
    root = _folder(tmp_path, config, files)
    assert prebuilt.model_files(root) == sorted(("genai_config.json", *files[:6]))


@pytest.mark.parametrize(
    ("name", "why"),
    [("../model.onnx", "not a file inside"), ("/etc/passwd", "not a file inside"),
     (".git/model.onnx", "a hidden file"), ("missing.onnx", "not a file in")],
)  # fmt: skip
def test_a_named_file_outside_hidden_or_missing_is_refused_naming_the_parameter(tmp_path, name, why):
    (tmp_path / "model.onnx").write_text("outside")
    root = _folder(tmp_path, {"model": {"decoder": {"filename": name}}}, (".git/model.onnx",))
    with pytest.raises(InputError) as e:
        prebuilt.model_files(root)
    assert e.value.parameter == "onnx_model_dir" and why in e.value.message and repr(name) in e.value.message


def test_staged_files_are_the_selection_with_the_same_bytes(tmp_path):
    root = _folder(tmp_path, DECODER, NEEDED + STRAY)
    files = prebuilt.model_files(root)
    dest = prebuilt.stage(root, files, tmp_path / "staged")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == files
    assert all((dest / f).read_bytes() == (root / f).read_bytes() for f in files)
