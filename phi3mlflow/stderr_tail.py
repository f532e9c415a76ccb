"""The last lines a child process wrote to its stderr, kept by its parent without taking them from
the user's terminal: while :meth:`StderrTail.attached` is open this process's file descriptor 2 is
a pipe, which every process started meanwhile inherits; a thread copies what arrives to the real
stderr and keeps the last ``max_bytes``. The parent outlives a child killed by a signal, so the
tail survives the child (what a SIGKILL or the OOM killer leaves behind)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

TAIL_LINES = 10
TAIL_BYTES = 4096


class StderrTail:
    """A tee of fd 2 for the processes started while :meth:`attached` is open."""

    def __init__(self, max_bytes: int = TAIL_BYTES):
        self.max_bytes = max_bytes
        self._kept = bytearray()
        self._lock = threading.Lock()
        self._pump: threading.Thread | None = None

    @contextlib.contextmanager
    def attached(self):
        """fd 2 is the tee's pipe inside; a process started here writes to it until it exits."""
        read, write = os.pipe()
        out = os.dup(2)  # the real stderr, written to by the pump until the pipe's last writer exits
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(write, 2)
        os.close(write)
        self._pump = threading.Thread(target=self._copy, args=(read, out), name="phi3-stderr-tail", daemon=True)
        self._pump.start()
        try:
            yield self
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)

    def _copy(self, read: int, out: int) -> None:
        try:
            while chunk := os.read(read, 65536):
                with self._lock:
                    self._kept += chunk
                    del self._kept[: max(0, len(self._kept) - self.max_bytes)]
                view = memoryview(chunk)
                while view:
                    try:
                        view = view[os.write(out, view) :]
                    except OSError:
                        break  # the terminal went away: keep the tail all the same
        finally:
            os.close(read)
            os.close(out)

    def tail(self, lines: int = TAIL_LINES, wait_s: float = 2.0) -> str:
        """The last ``lines`` non-blank lines received (waiting up to ``wait_s`` for the writers to close)."""
        if self._pump is not None:
            self._pump.join(wait_s)
        with self._lock:
            text = bytes(self._kept).decode("utf-8", errors="replace")
        return "\n".join(last_lines(text, lines))


def last_lines(text: str, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-blank lines of ``text`` (a progress bar's carriage returns end lines too)."""
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
