"""Command-line plumbing shared by the steps: argument types that reject bad values with one line
naming the parameter, before any model is loaded."""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
from pathlib import Path

from phi3mlflow.tiny import BUILTIN_MODEL

# A hub id: "name" or "org/name", no leading dot or slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


ERROR_TAG = "phi3.error"


def record_failure(message: str) -> None:
    """Put a step's one-line error on its run (under ``mlflow run``), where main reads the cause."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        from mlflow import MlflowClient

        MlflowClient().set_tag(run_id, ERROR_TAG, message[:1000])
    except Exception:  # noqa: BLE001 - reporting must never hide the original error
        pass


def run_main(main, parse_args) -> None:
    """A step's ``__main__``: parse, run, and record any failure's cause on the run.

    Every step process imports MLflow (~280k objects with its SQL store), and the cyclic garbage
    collector walks that heap again and again while it grows and twice more at interpreter exit:
    ~0.35 s + ~0.4 s per process on a 2-core machine, which is most of what a fully cached re-run
    of the chain costs beyond MLflow's own CLI. The import runs with the collector paused and its
    objects are then frozen out of every later collection (they live as long as the process); at
    exit everything is frozen, as the OS frees it anyway. atexit handlers still run.
    """
    args = parse_args(sys.argv[1:])
    gc.disable()
    try:
        import mlflow  # noqa: F401 - every step needs it; imported here with the collector paused
    finally:
        gc.freeze()
        gc.enable()
    try:
        main(args)
    except Exception as e:
        record_failure(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        raise
    finally:
        gc.freeze()


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


def fail(parameter: str, message: str) -> None:
    """Exit with the one-line error for a value that is only found bad after parsing."""
    sys.stderr.write(f"error: {parameter}: {message}\n")
    record_failure(f"{parameter}: {message}")
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
    """Validate ``--model``: the built-in model, an existing local folder, or a hub id.

    Anything that looks like a path (absolute, ``./``, ``../``, ``~``) must exist and hold a
    ``config.json``; hub ids are passed through (only users with hub access can use them).
    """
    value = value.strip()
    if value == BUILTIN_MODEL:
        return value
    path = Path(value).expanduser()
    if value.startswith(("/", "./", "../", "~")) or path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"no such model directory: {value}")
        if not (path / "config.json").exists():
            raise argparse.ArgumentTypeError(f"{value} has no config.json (not a Hugging Face model folder)")
        return str(path.resolve())
    if not _HUB_ID.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither {BUILTIN_MODEL}, an existing directory nor a hub id like org/name"
        )
    return value


def resolve_model_dir(source: str) -> str:
    """What ``from_pretrained`` takes for a validated ``--model``: builds the built-in model on demand."""
    if source == BUILTIN_MODEL:
        from phi3mlflow.tiny import builtin_model_dir

        return str(builtin_model_dir())
    return source
