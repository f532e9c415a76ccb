"""Cancellation cannot be swallowed: a Cancelled raised where Python ignores it (a __del__) is
raised again by the watchdog, a step that got to its end regardless still ends as cancelled, and a
step that swallows every raise is ended at the deadline. Real signals to this process; the hard
exit is the one stand-in (it must not end pytest)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from phi3mlflow import cli

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def fresh(monkeypatch):
    """A fresh cancel state, short watchdog periods, and the test process's handlers put back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(cli, "_cancel", cli._CancelState())
    monkeypatch.setattr(cli, "REPEAT_S", 0.2)
    monkeypatch.setattr(cli, "DEADLINE_S", 1.5)
    monkeypatch.setattr(cli, "RECORD_S", 0.1)
    monkeypatch.setattr(cli, "_die_with_parent", lambda: None)
    monkeypatch.setattr(cli, "record_failure", lambda *a, **k: None)
    exits: list[int] = []
    done = threading.Event()

    def hard_exit(status):
        exits.append(status)
        done.set()

    monkeypatch.setattr(cli, "_hard_exit", hard_exit)
    yield exits, done
    cli._cancel.taken.set()  # let a watchdog still waiting finish
    for s, handler in saved.items():
        signal.signal(s, handler)


class SignalledInDel:
    """The signal's handler runs inside __del__, where Python prints 'Exception ignored' and goes on."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecode for the pending handler to run on, inside __del__
            pass


def _swallowed() -> None:
    obj = SignalledInDel()
    del obj
    assert cli.cancel_requested() == signal.SIGTERM  # the raise was swallowed; the step goes on


def test_a_cancel_swallowed_in_a_del_is_raised_again_and_the_step_stops(fresh):
    worked = []

    def step(args):
        _swallowed()
        for _ in range(300):  # 30 s of work unless stopped
            time.sleep(0.1)
            worked.append(1)

    started = time.monotonic()
    with pytest.raises(SystemExit) as e:
        cli.run_main(step, lambda argv: None)
    assert e.value.code == 128 + signal.SIGTERM and time.monotonic() - started < 5 and len(worked) < 50
    assert fresh[0] == []  # ended by the re-raise, not the deadline


def test_a_step_that_ends_after_a_swallowed_cancel_still_ends_cancelled(fresh):
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda args: _swallowed(), lambda argv: None)
    assert e.value.code == 128 + signal.SIGTERM


def test_a_step_that_swallows_every_raise_is_ended_at_the_deadline(fresh, capsys):
    exits, done = fresh
    raised = []

    def step(args):
        while True:  # a library that catches everything, for ever
            try:
                if not raised:
                    raised.append(0)
                    os.kill(os.getpid(), signal.SIGTERM)
                while not done.is_set():
                    time.sleep(0.05)
                return
            except cli.Cancelled:
                raised.append(1)

    started = time.monotonic()
    with pytest.raises(SystemExit):  # the stand-in exit returned: run_main ends it as cancelled
        cli.run_main(step, lambda argv: None)
    assert exits == [128 + signal.SIGTERM] and 1.4 < time.monotonic() - started < 5
    assert len(raised) >= 4  # the first, then raised again every REPEAT_S until the deadline
    assert "did not stop within 1.5 s, exiting" in capsys.readouterr().err


def test_a_second_signal_during_the_cleanup_is_not_raised(fresh):
    cleaned = []

    def step(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # mlflow.run's SIGTERM after a Ctrl-C
            time.sleep(0.05)
            cleaned.append(1)

    with pytest.raises(SystemExit) as e:
        cli.run_main(step, lambda argv: None)
    assert e.value.code == 128 + signal.SIGTERM and cleaned == [1]


def test_a_cancel_taken_by_its_handler_is_not_cut_short_by_the_watchdog(fresh):
    exits, _ = fresh

    def step(args):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as e:
        cli.run_main(step, lambda argv: None)
    time.sleep(0.6)  # the cleanup (run_main's recording, MLflow's end of run) has until the deadline, 1.5 s
    assert e.value.code == 128 + signal.SIGTERM and exits == []
