"""Progress for the slow stages: a line when a stage starts and one with its time when it ends, and
for a loop over many items a bar with rate and time left on a terminal (stderr), or, when stderr is
not a terminal (CI logs, a scheduled job), a plain line every PLAIN_EVERY_S seconds with the same."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

PLAIN_EVERY_S = 30.0


@contextmanager
def stage(what: str) -> Iterator[None]:
    print(f"{what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"{what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def bar(items, desc: str, unit: str, total: int | None = None):
    """A tqdm bar over ``items`` on a terminal; the plain iterable elsewhere."""
    from tqdm import tqdm  # heavy-ish: only on a terminal

    return tqdm(items, desc=desc, unit=unit, total=total, disable=not sys.stderr.isatty(), file=sys.stderr)


class Progress:
    """``done`` of ``total`` items: ``update(n)`` as they finish, ``note`` for a figure beside the rate."""

    def __init__(self, desc: str, total: int, unit: str = "q", every_s: float = PLAIN_EVERY_S, stream=None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done, self.extra = 0, ""
        self.start = self.last = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm  # heavy-ish: only on a terminal

            self.bar = tqdm(desc=desc, unit=unit, total=total, file=self.stream)

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        self.extra = extra or self.extra
        if self.bar is not None:
            self.bar.update(n)
            if extra:
                self.bar.set_postfix_str(extra, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        """``evaluate chat: 40/400 q, 0.52 q/s, ~11.5 min left (tok_s=21)``."""
        elapsed = (now or time.monotonic()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = f"~{left / 60:.1f} min left" if left >= 60 else f"~{left:.0f} s left"
        extra = f" ({self.extra})" if self.extra else ""
        return f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.3g} {self.unit}/s, {eta}{extra}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
