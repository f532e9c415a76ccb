"""What code each step runs, declared by its entry files and followed through their imports (as DVC
declares a stage's ``deps``): the step cache keys a step on exactly these files, so editing the
server re-runs neither the exports nor the evaluation; and the ONNX pyfunc is logged with exactly
the package files it imports, nothing else of the folder (no stray, hidden or ignored file)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from phi3mlflow import PACKAGE_DIR, PROJECT_ROOT

# Each entry point's own files: the step's module and what it loads by path rather than by import.
STEP_ENTRIES = {
    "pipeline_wrapper": ("steps/pipeline_wrapper.py",),
    "onnx_wrapper": ("steps/onnx_wrapper.py", "phi3mlflow/onnx_pyfunc.py"),
    "evaluate": ("steps/evaluate.py",),
    "register": ("steps/register.py",),
    "main": ("steps/main.py",),
    "serve": ("steps/serve.py",),
}
# Every step runs in the environment these files build.
ENVIRONMENT = ("MLproject", "python_env.yaml", "conda.yaml", "requirements.txt")
PACKAGES = ("phi3mlflow", "steps")


def _module_file(name: str, root: Path) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, root: Path) -> set[Path]:
    """The project files one file imports (at any level, module or function), with the packages'
    ``__init__`` files on the way."""
    here = ".".join(path.relative_to(root).with_suffix("").parts)
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".")[: -node.level]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c loads a/__init__, a/b/__init__ and a/b/c
                file = _module_file(".".join(parts[:i]), root)
                if file is not None:
                    found.add(file)
    return found


def project_files(entries: tuple[str, ...] | list[str], root: Path = PROJECT_ROOT) -> list[Path]:
    """``entries`` (paths relative to ``root``) and every project file they import, transitively."""
    todo = [root / e for e in entries]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [p for p in _imports(path, root) if p not in seen]
    return sorted(seen)


def step_files(step: str, root: Path = PROJECT_ROOT) -> list[Path]:
    """What the step cache keys ``step`` on: its code and the environment files."""
    return project_files(STEP_ENTRIES[step], root) + [root / f for f in ENVIRONMENT if (root / f).is_file()]


def stage_package(entries: tuple[str, ...], dst: Path) -> Path:
    """A copy of the ``phi3mlflow`` package holding only the files ``entries`` import, under
    ``dst/phi3mlflow``, for ``code_paths`` of a logged model."""
    target = dst / PACKAGE_DIR.name
    for path in project_files(entries):
        rel = path.relative_to(PROJECT_ROOT)
        if rel.parts[0] != PACKAGE_DIR.name:
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst / rel)
    return target
