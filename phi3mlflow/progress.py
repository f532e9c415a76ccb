"""Progress for the slow stages: a line when a stage starts and one with its time when it ends,
and a bar on a terminal (stderr; off when stderr is not a terminal, so CI logs stay readable)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


@contextmanager
def stage(what: str) -> Iterator[None]:
    print(f"{what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"{what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def bar(items: Iterable, desc: str, unit: str, total: int | None = None):
    """A tqdm bar over ``items`` on a terminal; the plain iterable elsewhere."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, disable=not sys.stderr.isatty(), file=sys.stderr)
