"""Everything here starts a server, runs ``mlflow run``, loads a model or runs a step as a process:
marked slow, so ``pytest tests/unit`` (or ``-m "not slow"``) is the fast layer."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
