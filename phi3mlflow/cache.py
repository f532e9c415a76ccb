"""The model cache and content digests.

Built and converted models live under ``cache_root()/<name>-<key>``. An entry counts only when it
is complete: its builder writes a marker holding every file's sha256 last, and a lookup checks the
files against it, so a build that was killed half-way or a file truncated later is rebuilt rather
than handed to transformers.

Digests are sha256 of the bytes. Hashing a 500 MB model folder on every step would cost seconds,
so each file's digest is remembered with its size, mtime, inode and change time (``digests.json``
in the cache root) and recomputed only when one of those changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

MARKER = ".phi3-complete.json"
_STAT_CACHE: dict[str, list] | None = None


def cache_root() -> Path:
    """Where built models live: ``$PHI3MLFLOW_CACHE`` or ``~/.cache/phi3mlflow``."""
    return Path(os.environ.get("PHI3MLFLOW_CACHE") or Path.home() / ".cache" / "phi3mlflow")


def _stat_cache_file() -> Path:
    return cache_root() / "digests.json"


def _load_stat_cache() -> dict[str, list]:
    global _STAT_CACHE
    if _STAT_CACHE is None:
        try:
            _STAT_CACHE = json.loads(_stat_cache_file().read_text())
        except (OSError, ValueError):
            _STAT_CACHE = {}
    return _STAT_CACHE


def _save_stat_cache() -> None:
    # Concurrent writers may drop each other's entries; a dropped entry only costs a re-hash.
    path = _stat_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(_load_stat_cache(), f)
        os.replace(tmp, path)
    except OSError:
        pass


def _stamp(st: os.stat_result) -> list:
    # The change time too: an edit of the same size whose mtime was put back (touch -r) cannot put
    # the ctime back.
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def file_digest(path: str | Path, save: bool = True) -> str:
    """sha256 of a file's bytes, re-hashed only when its size, mtime, inode or change time changed."""
    path = Path(path).resolve()
    st = path.stat()
    cache = _load_stat_cache()
    hit = cache.get(str(path))
    stamp = _stamp(st)
    if hit and hit[: len(stamp)] == stamp and len(hit) == len(stamp) + 1:
        return hit[-1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    cache[str(path)] = [*_stamp(st), h.hexdigest()]
    if save:
        _save_stat_cache()
    return h.hexdigest()


def versions(*packages: str) -> str:
    """``name==version;`` of each installed package (``name missing;`` if not), for cache keys:
    read from package metadata, so it costs no import of the package."""

    out = []
    for name in packages:
        try:
            out.append(f"{name}=={version(name)};")
        except PackageNotFoundError:
            out.append(f"{name} missing;")
    return "".join(out)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER and "__pycache__" not in p.parts)


def tree_digest(path: str | Path) -> str:
    """sha256 over a file's bytes, or over a folder's relative file names and their digests."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for p in _files(path):
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + file_digest(p, save=False).encode() + b"\0")
    _save_stat_cache()
    return h.hexdigest()


def incomplete(folder: Path) -> str | None:
    """Why ``folder`` is not a complete cache entry, or None when every file matches its marker."""
    try:
        expected = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "it has no completion marker"
    for rel, digest in expected.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if file_digest(p, save=False) != digest:
            _save_stat_cache()
            return f"{rel} is not what was built"
    _save_stat_cache()
    return None


def _mark_complete(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): file_digest(p, save=False) for p in _files(folder)}
    (folder / MARKER).write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def cached(name: str, key: str, build_fn: Callable[[Path], object], note=None) -> Path:
    """``cache_root()/<name>-<key>``, built by ``build_fn(folder)`` first if missing or damaged.

    One process builds while others wait on a lock (parallel sweeps and test workers share the
    cache); the build goes to a temporary folder renamed into place, its marker written last, so
    nobody sees half a model.
    """
    note = note or (lambda msg: print(msg, file=sys.stderr, flush=True))
    target = cache_root() / f"{name}-{key}"
    if target.is_dir() and incomplete(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            reason = incomplete(target)
            if reason is None:
                return target
            note(f"model cache: {target} is incomplete ({reason}); rebuilding it")
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            build_fn(tmp)
            _mark_complete(tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # Renaming keeps each file's inode and mtime: remember the digests under the new paths, and
        # forget the temporary ones.
        stat_cache = _load_stat_cache()
        for rel, digest in json.loads((target / MARKER).read_text())["files"].items():
            stat_cache.pop(str((tmp / rel).resolve()), None)
            stat_cache[str((target / rel).resolve())] = [*_stamp((target / rel).stat()), digest]
        _save_stat_cache()
    return target
