"""Export a Hugging Face causal LM to an ONNX Runtime GenAI model folder with its model builder.

Exports of local folders are cached under ``cache_root()/onnx-<key>``; the key hashes the source
folder's bytes, the precision and the onnxruntime-genai version, so a re-export is a lookup.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from phi3mlflow.tiny import cache_root

PRECISIONS = ("fp32", "int8", "int4")


class ExportError(RuntimeError):
    pass


def check_genai_folder(folder: str | Path) -> Path:
    """Raise ExportError unless ``folder`` is an ORT GenAI model folder."""
    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        raise ExportError(f"{folder} is not an ONNX Runtime GenAI model folder: it has no genai_config.json")
    return folder


def _source_key(source: Path, precision: str) -> str:
    import onnxruntime_genai

    h = hashlib.sha256(f"{precision};onnxruntime-genai={onnxruntime_genai.__version__};".encode())
    for p in sorted(source.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(source)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def export(source: str, precision: str) -> Path:
    """Return an ORT GenAI folder for ``source`` (a local HF folder or a hub id) at ``precision``."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    local = Path(source).is_dir()
    root = cache_root()
    if local:
        target = root / f"onnx-{precision}-{_source_key(Path(source), precision)}"
        if (target / "genai_config.json").exists():
            print(f"onnx export: reusing cached {target}", flush=True)
            return target
    else:
        target = root / f"onnx-{precision}-hub-{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
    try:
        out = work / "model"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder",
               *(["-i", source] if local else ["-m", source]),
               "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(work / "hf-cache")]  # fmt: skip
        print("onnx export: " + " ".join(cmd[1:]), flush=True)
        _run_streaming(cmd)
        check_genai_folder(out)
        if not local:
            # A hub id names no fixed bytes: the fresh export replaces the previous one.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "genai_config.json").exists():  # not merely a concurrent twin
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _run_streaming(cmd: list[str]) -> None:
    """Run the builder, echoing its progress, and fail with its last lines when it fails."""
    tail: deque[str] = deque(maxlen=15)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            # The builder redraws tqdm bars with \r; keep the console readable.
            line = line.rstrip().rsplit("\r", 1)[-1]
            tail.append(line)
            print(f"  builder| {line}", flush=True)
    if proc.returncode != 0:
        raise ExportError(f"the ONNX model builder failed (exit {proc.returncode}): " + " | ".join(list(tail)[-5:]))
