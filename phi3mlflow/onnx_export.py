"""Export a Hugging Face causal LM to an ONNX Runtime GenAI model folder with its model builder.

Exports are cached under ``cache_root()/onnx-<precision>-<key>``; the key hashes the source
folder's content, the precision and the onnxruntime-genai version, so a re-export is a lookup.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from phi3mlflow.cache import cached, tree_digest, versions

PRECISIONS = ("fp32", "int8", "int4")


class ExportError(RuntimeError):
    pass


def check_genai_folder(folder: str | Path) -> Path:
    """Raise ExportError unless ``folder`` is an ORT GenAI model folder."""
    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        raise ExportError(f"{folder} is not an ONNX Runtime GenAI model folder: it has no genai_config.json")
    return folder


def log_path(folder: Path) -> Path:
    """Where the builder's output of the export in ``folder`` is kept (beside it, not in the model)."""
    return folder.parent / f"{folder.name}.builder.log"


def export(source: str | Path, precision: str) -> Path:
    """An ORT GenAI folder for the local Hugging Face folder ``source`` at ``precision``, from the cache.

    The cache key is the folder's content digest, the precision and the onnxruntime-genai version;
    the export runs under the cache's lock, so parallel sweeps export once. The builder's ~90 lines
    of output go to :func:`log_path` of the folder (onnx_wrapper logs it as an artifact), not to
    the console; a failure still shows its last lines.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    source = Path(source)
    blob = f"{tree_digest(source)};{precision};{versions('onnxruntime-genai')}"
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]

    name = f"onnx-{precision}"

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as work:
            model = Path(work) / "model"
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(model),
                   "-p", precision, "-e", "cpu", "-c", str(Path(work) / "hf-cache")]  # fmt: skip
            log = log_path(out.parent / f"{name}-{key}")
            print(f"onnx export: {precision} with the ORT GenAI model builder (its output: {log})", flush=True)
            start = time.perf_counter()
            _run_logged(cmd, log)
            print(f"onnx export: done in {time.perf_counter() - start:.1f} s", flush=True)
            check_genai_folder(model)
            for item in model.iterdir():
                shutil.move(str(item), out / item.name)

    return cached(name, key, build)


def _run_logged(cmd: list[str], log: Path) -> None:
    """Run the builder with its output in ``log``, and fail with its last lines when it fails."""
    tail: deque[str] = deque(maxlen=15)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with (
        open(log, "w") as out,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc,
    ):
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                # The builder redraws tqdm bars with \r; keep the last state of each line.
                line = line.rstrip().rsplit("\r", 1)[-1]
                tail.append(line)
                out.write(line + "\n")
        except BaseException:
            # Cancelled or failed while exporting: the builder must not run on alone.
            proc.kill()
            raise
    if proc.returncode != 0:
        raise ExportError(f"the ONNX model builder failed (exit {proc.returncode}): " + " | ".join(list(tail)[-5:]))
