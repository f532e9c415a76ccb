"""What of a prebuilt ORT GenAI folder (``onnx_model_dir``) travels with a logged model: the files
its ``genai_config.json`` names and their external data, and the tokenizer and config files; never
a hidden file or folder (``.git/``, ``.cache/``, ``.env``) and nothing else (notes, logs, other
exports). :func:`model_files` selects them, :func:`stage` links or copies them into a folder that
is then logged whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath

from phi3mlflow.errors import InputError

PARAMETER = "onnx_model_dir"
GENAI_CONFIG = "genai_config.json"
# The tokenizer, chat template and model config files ORT GenAI and transformers read, at the top of
# the folder (the builder copies them there).
TOKENIZER_AND_CONFIG = (
    GENAI_CONFIG, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "config.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
)  # fmt: skip
# Extra chat templates transformers saves beside the tokenizer (one .jinja file each).
TEMPLATE_FOLDER = "additional_chat_templates"
# An ONNX file's external weights, named after it by the exporters (model.onnx.data, model.onnx_data).
EXTERNAL_DATA_SUFFIXES = (".data", "_data")


def _named(config) -> list[str]:
    """Every string under a ``filename`` or ``*_filename`` key of genai_config.json, at any depth."""
    found: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            if isinstance(key, str) and (key == "filename" or key.endswith("_filename")):
                found += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
            else:
                found += _named(value)
    elif isinstance(config, list):
        for item in config:
            found += _named(item)
    return found


def _hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def model_files(folder: Path) -> list[str]:
    """The folder's files a model needs, as sorted POSIX paths relative to it.

    ``InputError("onnx_model_dir", ...)`` when genai_config.json is unreadable or names a file that is
    missing, hidden or outside the folder."""
    folder = Path(folder)
    try:
        config = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(PARAMETER, f"{folder / GENAI_CONFIG} cannot be read: {e}") from None
    selected: set[PurePosixPath] = set()
    for name in _named(config):
        rel = PurePosixPath(os.path.normpath(name).replace(os.sep, "/"))
        if rel.is_absolute() or rel.parts[:1] == ("..",) or not rel.parts or rel == PurePosixPath("."):
            raise InputError(PARAMETER, f"{GENAI_CONFIG} names {name!r}, which is not a file inside {folder}")
        if _hidden(rel):
            raise InputError(PARAMETER, f"{GENAI_CONFIG} names {name!r}, a hidden file, which is never uploaded")
        if not (folder / rel).is_file():
            raise InputError(PARAMETER, f"{GENAI_CONFIG} names {name!r}, which is not a file in {folder}")
        selected.add(rel)
        # External data next to it: model.onnx.data, model.onnx_data, model.data.
        stem = rel.name.rsplit(".", 1)[0]
        for sibling in (folder / rel).parent.iterdir():
            if (
                sibling.is_file()
                and not sibling.name.startswith(".")
                and sibling.name != rel.name
                and sibling.name.startswith(stem)
                and sibling.name.endswith(EXTERNAL_DATA_SUFFIXES)
            ):
                selected.add(rel.parent / sibling.name)
    for name in TOKENIZER_AND_CONFIG:
        if (folder / name).is_file():
            selected.add(PurePosixPath(name))
    templates = folder / TEMPLATE_FOLDER
    if templates.is_dir():
        selected |= {PurePosixPath(TEMPLATE_FOLDER, f.name) for f in templates.glob("*.jinja") if f.is_file()}
    return sorted(str(p) for p in selected)


def stage(folder: Path, files: list[str], dest: Path) -> Path:
    """``files`` of ``folder`` under ``dest`` (hard links where the file system allows, else copies)."""
    for rel in files:
        src, dst = (Path(folder) / rel).resolve(), dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return dest
