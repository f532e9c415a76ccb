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
from typing import NoReturn

from phi3mlflow import sources, tags
from phi3mlflow.errors import InputError

ERROR_TAG = tags.ERROR
# `mlflow run` hands a step its run through MLFLOW_RUN_ID, and mlflow.start_run() removes the
# variable from the environment: remember it before any step code runs.
_LAUNCH_RUN_ID = os.environ.get("MLFLOW_RUN_ID")


class Cancelled(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived. A KeyboardInterrupt, so mlflow.run cancels a running child step."""

    def __init__(self, signum: int):
        super().__init__(f"cancelled by {signal.Signals(signum).name}")
        self.signum = signum


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


def _raise_cancelled(signum, frame):
    # Once is enough: Ctrl-C reaches every process of the group and mlflow.run then sends SIGTERM
    # too; a second Cancelled during the cleanup would lose the cause.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Cancelled(signum)


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
    try:
        args = parse_args(sys.argv[1:])
        gc.disable()
        try:
            import mlflow  # noqa: F401 - every step needs it; imported here with the collector paused
        finally:
            gc.freeze()
            gc.enable()
        main(args)
    except Cancelled as e:
        sys.stderr.write(f"{_prog()}: {e}\n")
        record_failure(str(e), status="KILLED", keep_existing=True)
        raise SystemExit(128 + e.signum) from None
    except InputError as e:
        fail(e.parameter, e.message)
    except Exception as e:
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
