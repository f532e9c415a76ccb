"""The tee main puts on a child's stderr: every byte still reaches the real stderr, and the last
lines are kept, bounded, after the writer is gone. fd 2 of this process stands in for the child's
(a child inherits exactly that descriptor)."""

from __future__ import annotations

import os

from phi3mlflow.stderr_tail import StderrTail, last_lines


def test_what_passes_the_tee_reaches_stderr_and_its_last_lines_are_kept(capfd):
    tee = StderrTail()
    with tee.attached():
        for i in range(30):
            os.write(2, f"line {i}\n".encode())
        os.write(2, b"\n  \nKilled\n")
    assert tee.tail() == "\n".join([*(f"line {i}" for i in range(21, 30)), "Killed"])
    err = capfd.readouterr().err
    assert err.startswith("line 0\nline 1\n") and err.endswith("line 29\n\n  \nKilled\n")
    os.write(2, b"after\n")  # fd 2 is the real stderr again, not the tee
    assert capfd.readouterr().err == "after\n" and "after" not in tee.tail()


def test_the_tail_is_bounded_in_bytes(capfd):
    tee = StderrTail(max_bytes=100)
    with tee.attached():
        os.write(2, b"x" * 1_000_000 + b"\nthe end\n")
    assert tee.tail().endswith("the end") and len(tee.tail()) <= 100
    assert len(capfd.readouterr().err) == 1_000_009


def test_last_lines_skips_blank_lines_and_splits_progress_bars():
    assert last_lines("a\n\nb 10%\rb 100%\n   \n", 2) == ["b 10%", "b 100%"]
