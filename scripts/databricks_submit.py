"""Run this project on a Databricks job cluster with ``mlflow run -b databricks``, uploading only the project.

MLflow tars the whole directory it is given (it skips only ``mlruns``): run on a working checkout,
it would upload .venv, mlflow.db and whatever else lies there. This stages exactly the files git
tracks (those still on disk, as they are in the working tree) in a temporary folder and runs, from
the repository root:

    mlflow run <stage> -b databricks --backend-config deploy/cluster.json --env-manager local [ARGS]

Untracked files are never uploaded, ignored or not (a ``.envrc``, ``.env.local``, ``.netrc`` or
notes holding a token stay home), unless named with ``--include PATH`` (repeatable; a path relative
to the repository root that must be a file inside it, outside ``.git``). The script says how many
untracked files it left out and names the first few. Commit a file, or name it, to upload it. A
committed symlink is uploaded as the file it points to, so one that leads outside the repository
is refused, in one line naming it, before anything is staged.

ARGS, all the other arguments, go to ``mlflow run`` as they are (``-e main``,
``-P registered_model_name=...``, ``--experiment-name ...``, ``--backend-config other.json`` to
replace the default). Credentials come from the environment (DATABRICKS_HOST and DATABRICKS_TOKEN,
or a Databricks config profile) and are never put on the command line or in the upload.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BACKEND_CONFIG = ROOT / "deploy" / "cluster.json"
SHOWN_LEFT_OUT = 5


def _git_files(root: Path, *args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", *args], capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f]


def untracked_files(root: Path) -> list[str]:
    """Untracked files that .gitignore does not exclude: what a user may expect to be uploaded."""
    return sorted({f for f in _git_files(root, "--others", "--exclude-standard") if (root / f).is_file()})


def check_include(root: Path, path: str) -> str:
    """``path`` as a repository-relative POSIX name; ValueError unless it is a file inside ``root``."""
    if not path:
        raise ValueError("empty path")
    given = Path(path)
    rel = Path(os.path.normpath(given if given.is_absolute() else root / given))
    try:
        rel = rel.relative_to(root)
    except ValueError:
        raise ValueError(f"{path}: outside the repository {root}") from None
    if rel == Path(".") or rel.parts[0] == ".git":
        raise ValueError(f"{path}: not a file of the project")
    full = root / rel
    if not full.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{path}: leads outside the repository {root}")
    if not full.exists():
        raise ValueError(f"{path}: no such file in {root}")
    if not full.is_file():
        raise ValueError(f"{path}: not a file")
    return PurePosixPath(*rel.parts).as_posix()


def check_tracked(root: Path, files: Iterable[str]) -> list[str]:
    """The tracked ``files`` that still exist as files; ValueError naming the first committed symlink
    that leads outside ``root`` (staging copies what a link points to: a link to ``~/.netrc`` would
    upload the user's credentials). A link to a file inside the repository is staged as that file."""
    inside = root.resolve()
    kept = []
    for rel in files:
        full = root / rel
        if full.is_symlink() and not full.resolve().is_relative_to(inside):
            raise ValueError(f"{rel}: a committed symlink that leads outside the repository {root}")
        if full.is_file():
            kept.append(rel)
    return kept


def project_files(root: Path, include: Iterable[str] = ()) -> list[str]:
    """The tracked files that still exist (checked with :func:`check_tracked`), plus ``include``
    (checked with :func:`check_include`)."""
    tracked = set(check_tracked(root, _git_files(root, "--cached")))
    return sorted(tracked | {check_include(root, p) for p in include})


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the ``--include`` paths, the arguments for ``mlflow run``); ValueError for a bare ``--include``."""
    include, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--include":
            value = next(args, None)
            if value is None:
                raise ValueError("needs a path")
            include.append(value)
        elif arg.startswith("--include="):
            include.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return include, rest


def stage(root: Path, dest: Path, include: Iterable[str] = ()) -> list[str]:
    files = project_files(root, include)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    return files


def main(argv: list[str], root: Path = ROOT) -> int:
    if not (root / ".git").exists():
        sys.stderr.write(f"error: {root} is not a git checkout: the upload is what git tracks\n")
        return 2
    try:
        include, extra = split_args(argv)
        for path in include:
            check_include(root, path)
    except ValueError as e:
        sys.stderr.write(f"error: --include: {e}\n")
        return 2
    try:
        check_tracked(root, _git_files(root, "--cached"))
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    if "--backend-config" not in extra and not any(a.startswith("--backend-config=") for a in extra):
        extra = ["--backend-config", str(DEFAULT_BACKEND_CONFIG), *extra]
    with tempfile.TemporaryDirectory(prefix="phi3-databricks-") as tmp:
        project = Path(tmp) / "project"
        files = stage(root, project, include)
        cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-b", "databricks", "--env-manager", "local"]
        print(f"databricks_submit: {len(files)} files staged from {root}", flush=True)
        staged = set(files)
        left_out = [f for f in untracked_files(root) if f not in staged]
        if left_out:
            names = ", ".join(left_out[:SHOWN_LEFT_OUT]) + (", ..." if len(left_out) > SHOWN_LEFT_OUT else "")
            print(f"databricks_submit: {len(left_out)} untracked files left out (name one with --include PATH "
                  f"to upload it): {names}", flush=True)  # fmt: skip
        return subprocess.run(cmd + extra, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
