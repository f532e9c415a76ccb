"""Which model version the server answers with, and the swap to another one.

``ModelInfo`` says what is served (the registered name, version and alias, the logged model, the
evaluation run that promoted it). ``Served`` is one loaded version: its backend, MLflow's scoring
app for it, and how many requests are using it. ``ModelSlot`` holds the current one: a request
takes the current version when it starts and keeps it to its end (``acquire``/``release``); a swap
makes the new version current for every later request, and the old one is released (its batching
loop ended, its model dropped) when its last request ends. ``Follower`` checks the registry every
``interval`` seconds and swaps when the alias points to another version; a version that fails to
load leaves the current one serving, and ``/health`` says why.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelInfo:
    """What the server answers with."""

    id: str  # the model id /v1/models reports (--model_name, or the URI)
    uri: str  # the URI it was started on
    name: str = ""  # the registered model, when served from the registry
    version: str = ""
    alias: str = ""
    model_id: str = ""  # the logged model (m-...)
    eval_run_id: str = ""  # the evaluation run that promoted the version (its phi3.eval_run_id tag)

    @property
    def fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: the registered version when known, else the logged model."""
        if self.version:
            return f"{self.name}/{self.version}"
        return self.model_id or self.uri

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}


class Served:
    """One loaded model version."""

    def __init__(self, info: ModelInfo, backend, fallback=None):
        self.info, self.backend, self.fallback = info, backend, fallback
        self.in_use = 0
        self.released = threading.Event()


def release(served: Served) -> None:
    """End the version's generation worker and drop its model, so its memory goes back."""
    close = getattr(served.backend, "close", None)
    if close is not None:
        close()
    served.backend = served.fallback = None
    _forget_endpoints()
    gc.collect()
    _return_freed_memory()


# glibc's mallopt parameter, and the size above which the server's allocations get mappings of their own.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024


def map_large_allocations() -> None:
    """Called once before the first model loads. glibc serves an allocation above a threshold from
    a mapping of its own, unmapped when freed; it raises that threshold as the process frees large
    blocks, and then a model's weights land in heaps that keep their pages after a release. Fixed
    at 64 KiB, a released version's memory goes back to the system (bench/README.md has the figures)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def _forget_endpoints() -> None:
    """FastAPI (0.16x) keeps every endpoint it has classified in module-level LRU caches, and the
    endpoints of MLflow's scoring app (the fallback) close over the model: without this, a
    released version's model stays in memory (bench/README.md)."""
    try:
        from fastapi.dependencies import models  # only where FastAPI serves the fallback
    except ImportError:
        return
    for name in ("_is_gen_callable_cached", "_is_async_gen_callable_cached", "_is_coroutine_callable_cached"):
        cached = getattr(models, name, None)
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()


def _return_freed_memory() -> None:
    """glibc keeps freed memory in its heaps; give what is free back to the system (a no-op where
    the C library is not glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ModelSlot:
    def __init__(self, served: Served, on_release: Callable[[Served], None] = release, log=print):
        self.current = served
        self.on_release = on_release
        self.log = log
        self.pending = ""  # the version being loaded, if any
        self.error = ""  # why the last version the alias pointed to is not served
        self._lock = threading.Lock()

    def acquire(self) -> Served:
        with self._lock:
            served = self.current
            served.in_use += 1
            return served

    def release(self, served: Served) -> None:
        with self._lock:
            served.in_use -= 1
            done = served is not self.current and served.in_use == 0
        if done:
            self._retire(served)

    def swap(self, new: Served) -> Served:
        """Make ``new`` current; the old version is released once its last request ends."""
        with self._lock:
            old, self.current = self.current, new
            idle = old.in_use == 0
        self.log(f"serve: now serving {new.info.fingerprint} (was {old.info.fingerprint})")
        if idle:
            self._retire(old)
        return old

    def _retire(self, served: Served) -> None:
        """Release ``served`` on a thread of its own: its last request may end on the event loop."""

        def run() -> None:
            self.on_release(served)
            served.released.set()
            self.log(f"serve: released {served.info.fingerprint}")

        threading.Thread(target=run, name="phi3mlflow-release", daemon=True).start()

    def health(self) -> dict:
        info = self.current.info
        out: dict = {"status": "ok", "model": info.id, "fingerprint": info.fingerprint, **info.describe()}
        out["swap_pending"] = self.pending or None
        if self.error:
            out["swap_error"] = self.error
        return out


class Follower:
    """Follows ``models:/<name>@<alias>``: every ``interval`` s, asks the registry which version
    holds the alias (``resolve(name, alias) -> ModelInfo``) and, when it is another one, loads it
    (``load(info) -> Served``) beside the current one and swaps."""

    def __init__(self, slot: ModelSlot, interval: float, resolve: Callable[[str, str], ModelInfo],
                 load: Callable[[ModelInfo], Served]):  # fmt: skip
        self.slot, self.interval, self.resolve, self.load = slot, interval, resolve, load
        self.failed = ""  # a version that failed to load: not tried again until the alias moves on
        self.unreachable = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await asyncio.to_thread(self.check)

    def check(self) -> None:
        current = self.slot.current.info
        try:
            target = self.resolve(current.name, current.alias)
        except Exception as e:  # noqa: BLE001 - the registry's troubles never stop the serving
            if not self.unreachable:
                self.slot.log(f"serve: cannot read @{current.alias} of {current.name}: {_first_line(e)}; "
                              "serving on")  # fmt: skip
            self.unreachable = True
            return
        self.unreachable = False
        if target.version in (current.version, self.failed):
            return
        self.slot.pending = target.version
        self.slot.log(f"serve: @{current.alias} of {current.name} moved to version {target.version}; loading it")
        try:
            served = self.load(target)
        except Exception as e:  # noqa: BLE001 - any failure to load keeps the old version serving
            self.failed = target.version
            self.slot.error = f"version {target.version} failed to load: {_first_line(e)}"
            self.slot.log(f"serve: {self.slot.error}; still serving {current.fingerprint}")
            return
        finally:
            self.slot.pending = ""
        self.failed = ""
        self.slot.error = ""
        self.slot.swap(served)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
