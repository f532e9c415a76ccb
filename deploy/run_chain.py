"""Databricks job entry point (databricks.yml): the chain of ``steps.main`` from the synced bundle files.

A ``spark_python_task`` runs this file as a script, with its own folder on ``sys.path`` and the
working directory wherever the runtime puts it; the chain reads ``params/`` and ``data/`` relative
to the project root, so both are set to the root first. Arguments are main's flags.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

from phi3mlflow.cli import run_main  # noqa: E402
from steps import main  # noqa: E402

if __name__ == "__main__":
    run_main(main.main, main.parse_args)
