"""Run this project on a Databricks job cluster with ``mlflow run -b databricks``, uploading only the project.

MLflow tars the whole directory it is given (it skips only ``mlruns``): run on a working checkout,
it would upload .venv, mlflow.db and whatever else lies there. This stages what git tracks, plus
new files git does not ignore, in a temporary folder and runs, from the repository root:

    mlflow run <stage> -b databricks --backend-config deploy/cluster.json --env-manager local [ARGS]

ARGS go to ``mlflow run`` as they are (``-e main``, ``-P registered_model_name=...``,
``--experiment-name ...``, ``--backend-config other.json`` to replace the default).
Credentials come from the environment (DATABRICKS_HOST and DATABRICKS_TOKEN, or a Databricks
config profile) and are never put on the command line or in the upload.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BACKEND_CONFIG = ROOT / "deploy" / "cluster.json"


def project_files(root: Path) -> list[str]:
    """Tracked files that still exist, and untracked ones that .gitignore does not exclude."""
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    return sorted({f for f in out.decode().split("\0") if f and (root / f).is_file()})


def stage(root: Path, dest: Path) -> list[str]:
    files = project_files(root)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    return files


def main(argv: list[str]) -> int:
    if not (ROOT / ".git").exists():
        sys.stderr.write(f"error: {ROOT} is not a git checkout: the upload is what git tracks\n")
        return 2
    extra = list(argv)
    if "--backend-config" not in extra and not any(a.startswith("--backend-config=") for a in extra):
        extra = ["--backend-config", str(DEFAULT_BACKEND_CONFIG), *extra]
    with tempfile.TemporaryDirectory(prefix="phi3-databricks-") as tmp:
        project = Path(tmp) / "project"
        files = stage(ROOT, project)
        cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-b", "databricks", "--env-manager", "local"]
        print(f"databricks_submit: {len(files)} files staged from {ROOT}", flush=True)
        return subprocess.run(cmd + extra, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
