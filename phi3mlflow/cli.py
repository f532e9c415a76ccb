"""Command-line plumbing shared by the steps: argument types that reject bad values with one line
naming the parameter, before any model is loaded; failure causes recorded on the run; and clean
cancellation on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import signal
import sys
import threading
import time
from typing import NoReturn

from phi3mlflow import sources, tags
from phi3mlflow.errors import InputError

ERROR_TAG = tags.ERROR
# `mlflow run` hands a step its run through MLFLOW_RUN_ID, and mlflow.start_run() removes the
# variable from the environment: remember it before any step code runs.
_LAUNCH_RUN_ID = os.environ.get("MLFLOW_RUN_ID")


# MLflow's HTTP client retries a failed request 7 times with a backoff of 2 s doubling, each try
# waiting up to 120 s: a stopped tracking server held a chain for 29 minutes. These defaults bound
# one request to 3 tries (about 3 s against a stopped server; 3 x 30 s against one that does not
# answer); a value the user set wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# Exception types (by name, so that no HTTP library is imported here) that mean the tracking server
# did not answer, wherever they sit in an exception's chain.
_UNREACHABLE = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "MaxRetryError",
                "NewConnectionError", "RetryError", "ConnectionRefusedError")  # fmt: skip


def bound_http_retries(environ=os.environ) -> None:
    """Set MLflow's HTTP retry and timeout defaults (HTTP_DEFAULTS) where the user has not."""
    for key, value in HTTP_DEFAULTS.items():
        environ.setdefault(key, value)


def store_unreachable(e: BaseException) -> str | None:
    """The one-line cause when ``e`` is the tracking server not answering, else None."""
    chain: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    if not any(
        type(x).__name__ in _UNREACHABLE
        or "Max retries exceeded" in str(x)
        or (type(x).__name__ == "MlflowException" and str(x).startswith("API request to"))
        for x in chain
    ):
        return None
    refused = any(isinstance(x, ConnectionRefusedError) or "refused" in str(x).lower() for x in chain)
    reason = "it refused the connection" if refused else "it did not answer"
    return f"the tracking server {_tracking_uri()} cannot be reached ({reason})"


def _tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "(MLFLOW_TRACKING_URI)"


class Cancelled(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived. A KeyboardInterrupt, so mlflow.run cancels a running child step."""

    def __init__(self, signum: int):
        super().__init__(f"cancelled by {signal.Signals(signum).name}")
        self.signum = signum


def launched_run_id() -> str | None:
    """The run ``mlflow run`` made for this step (MLFLOW_RUN_ID at start-up), or None when run directly."""
    return _LAUNCH_RUN_ID


def _current_run_id() -> str | None:
    if _LAUNCH_RUN_ID:
        return _LAUNCH_RUN_ID
    if "mlflow" in sys.modules:
        import mlflow  # heavy: MLflow, off the fast path

        # A step run directly (python -m steps.x) made its own run, which has ended by now.
        run = mlflow.active_run() or mlflow.last_active_run()
        if run is not None:
            return run.info.run_id
    return None


def record_failure(message: str, status: str | None = None, keep_existing: bool = False) -> None:
    """Put a step's one-line error on its run (where main reads the cause); optionally set its status."""
    run_id = _current_run_id()
    if not run_id:
        return
    try:
        from mlflow import MlflowClient  # heavy: MLflow, off the fast path

        client = MlflowClient()
        if not (keep_existing and ERROR_TAG in client.get_run(run_id).data.tags):
            client.set_tag(run_id, ERROR_TAG, message[:1000])
            # The run's description in the MLflow UI.
            client.set_tag(run_id, "mlflow.note.content", f"Failed: {message[:1000]}")
        if status:
            client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - reporting must never hide the original error
        pass


# A cancel must stop the step even when the raise lands where Python ignores it (a __del__, a
# weakref callback, a generator's close: "Exception ignored in ... Cancelled"). The first signal
# starts a watchdog: until a handler has taken the cancel (run_main's, or the chain's while it stops
# its child), it raises Cancelled again in the main thread every REPEAT_S seconds; whatever happens,
# the process ends DEADLINE_S seconds after the signal, its cause recorded on the run, with the
# status a signal gives (128 + its number).
REPEAT_S = 2.0
DEADLINE_S = 60.0
RECORD_S = 10.0  # how long the watchdog waits for the tracking store before it exits anyway


class _CancelState:
    def __init__(self) -> None:
        self.signum: int | None = None  # the first SIGTERM/SIGINT, once one arrived
        self.taken = threading.Event()  # a handler caught the Cancelled and is ending the process
        self.due = False  # the watchdog asks the signal handler to raise again


_cancel = _CancelState()


def _hard_exit(status: int) -> None:  # a seam for the unit tests, which must not end pytest
    os._exit(status)


def take_cancel() -> None:
    """Say that the Cancelled has been caught by code that ends the process (or the chain): the
    watchdog stops raising it again, so that the cleanup runs uninterrupted; the deadline stands."""
    _cancel.taken.set()


def cancel_requested() -> int | None:
    """The signal number of a cancel that arrived (even one whose Cancelled was swallowed), else None."""
    return _cancel.signum


def _raise_cancelled(signum, frame):
    if _cancel.signum is None:
        _cancel.signum = signum
        watchdog = threading.Thread(
            target=_watchdog, args=(_cancel, record_failure, _hard_exit), name="phi3-cancel-watchdog", daemon=True
        )
        watchdog.start()
    elif not _cancel.due:
        # Once is enough: Ctrl-C reaches every process of the group and mlflow.run then sends
        # SIGTERM too; a second Cancelled during the cleanup would lose the cause.
        return
    _cancel.due = False
    raise Cancelled(_cancel.signum)


def _watchdog(state: _CancelState, record, hard_exit) -> None:
    """Raise a swallowed Cancelled again every REPEAT_S seconds until a handler takes it; end the
    process DEADLINE_S seconds after the signal whatever happens, the cause recorded first."""
    signum = state.signum
    assert signum is not None
    deadline = time.monotonic() + DEADLINE_S
    main_thread = threading.main_thread().ident
    while time.monotonic() < deadline:
        if state.taken.wait(min(REPEAT_S, max(0.0, deadline - time.monotonic()))):
            time.sleep(max(0.0, deadline - time.monotonic()))  # the cleanup runs; the deadline stands
            break
        if main_thread:
            # The raise was swallowed (or the cleanup is slow): raise it again. A real signal to
            # the main thread also interrupts a blocking call there (time.sleep, a socket read).
            state.due = True
            signal.pthread_kill(main_thread, signum)
    cause = f"cancelled by {signal.Signals(signum).name}; the step did not stop within {DEADLINE_S:g} s"
    sys.stderr.write(f"{_prog()}: {cause}, exiting\n")
    recorder = threading.Thread(target=record, args=(cause, "KILLED", True), daemon=True)
    recorder.start()
    recorder.join(RECORD_S)
    hard_exit(128 + signum)


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent process dies.

    A scheduler cancels by signalling the ``mlflow run`` launcher, which dies without passing the
    signal on; ``bash -c`` execs the step, so the step's parent is the launcher (or main).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def run_main(main, parse_args) -> None:
    """A step's ``__main__``: parse, run, and record any failure's cause on the run.

    SIGTERM and SIGINT raise Cancelled: the step's run ends KILLED with the cause tagged, and a
    child step that main is waiting for is cancelled too (mlflow.run does that on KeyboardInterrupt).
    A Cancelled that Python swallowed is raised again by a watchdog, and the process ends within
    DEADLINE_S seconds of the signal whatever the step does (see ``_watchdog``).

    Every step process imports MLflow (a heap of a few hundred thousand objects with its SQL
    store), and the cyclic garbage collector walks that heap again and again while it grows and
    twice more at interpreter exit, a large share of a fully cached re-run (bench/README.md has
    the measurements). The import runs with the collector paused and its objects are then frozen
    out of every later collection (they live as long as the process); at exit everything is
    frozen, as the OS frees it anyway. atexit handlers still run.
    """
    signal.signal(signal.SIGTERM, _raise_cancelled)
    signal.signal(signal.SIGINT, _raise_cancelled)
    _die_with_parent()
    bound_http_retries()
    try:
        args = parse_args(sys.argv[1:])
        gc.disable()
        try:
            import mlflow  # noqa: F401 - every step needs it; imported here with the collector paused
        finally:
            gc.freeze()
            gc.enable()
        main(args)
        if _cancel.signum is not None:
            # A cancel whose Cancelled was swallowed and the step still got to its end: it was
            # cancelled all the same (nothing after this point may count as done).
            raise Cancelled(_cancel.signum)
    except Cancelled as e:
        take_cancel()
        sys.stderr.write(f"{_prog()}: {e}\n")
        record_failure(str(e), status="KILLED", keep_existing=True)
        raise SystemExit(128 + e.signum) from None
    except InputError as e:
        fail(e.parameter, e.message)
    except Exception as e:
        unreachable = store_unreachable(e)
        if unreachable:
            # Nothing can be recorded on a store that does not answer, and every further request
            # (the run's end, MLflow's own at exit) would wait out its retries again: one line, and
            # out. The runs left RUNNING end FAILED when the next chain starts (phi3mlflow/chain.py).
            sys.stderr.write(f"error: {_prog()}: {unreachable}\n")
            sys.stdout.flush()
            sys.stderr.flush()
            _hard_exit(1)
        record_failure(f"{type(e).__name__}: {first_line(e)}")
        raise
    finally:
        gc.freeze()


def _prog() -> str:
    return os.path.basename(sys.argv[0]).removesuffix(".py") or "step"


class StepParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        record_failure(f"{self.prog}: {message}")
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        if not sys.stderr.isatty():
            # MLflow's download bars would flood CI logs and bury one-line errors.
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        return super().parse_args(args, namespace)


def fail(parameter: str, message: str) -> NoReturn:
    """Exit with the one-line error for a value that is only found bad after parsing."""
    sys.stderr.write(f"error: {parameter}: {message}\n")
    # The first cause recorded wins: main tags a failed step's cause before it exits through here.
    record_failure(f"{parameter}: {message}", keep_existing=True)
    raise SystemExit(2)


def true_false(value: str) -> bool:
    v = str(value).strip().lower()
    if v not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return v == "true"


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {n}")
    return n


def non_negative_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return x


def unit_interval(value: str) -> float:
    x = non_negative_float(value)
    if x > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return x


def model_source(value: str) -> str:
    """Validate ``--model`` cheaply (see phi3mlflow.sources); weights are not loaded here."""

    try:
        return sources.check(value)
    except InputError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def resolve_model_dir(source: str) -> str:
    """The local folder ``from_pretrained`` takes for a checked ``--model``, built or converted on demand."""

    return str(sources.resolve(source))
