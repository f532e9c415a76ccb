"""Small helpers around the MLflow tracking API used by every step."""

from __future__ import annotations

import re

from phi3mlflow import PROJECT_ROOT


def requirement_pins() -> dict[str, str]:
    """Every ``name==version`` line of requirements.txt, the one source of versions, by lower-case name."""
    pins = {}
    for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line)
        if m:
            pins[m.group(1).lower()] = line
    return pins


def pinned(*names: str) -> list[str]:
    """The ``name==version`` pins for ``names`` from requirements.txt."""
    pins = requirement_pins()
    missing = [n for n in names if n.lower() not in pins]
    if missing:
        raise KeyError(f"requirements.txt pins none of {missing}")
    return [pins[n.lower()] for n in names]


def log_params_once(params: dict) -> None:
    """Log params the run does not have yet.

    Under ``mlflow run`` the run already carries the entry point's parameters as given; a step run
    directly (``python -m steps.x``) logs its own, so every value ends up on the run either way.
    """
    import mlflow  # heavy: MLflow, off the fast path

    run = mlflow.active_run()
    assert run is not None, "log_params_once needs an active run"
    have = mlflow.get_run(run.info.run_id).data.params
    todo = {k: str(v) for k, v in params.items() if k not in have}
    if todo:
        mlflow.log_params(todo)
