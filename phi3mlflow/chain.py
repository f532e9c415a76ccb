"""The main chain's machinery: parameter profiles, the source version, and step runs with a
cache that reuses a finished run when its entry point, parameters and code are unchanged."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from phi3mlflow import PROJECT_ROOT
from phi3mlflow.cli import ERROR_TAG

CACHE_TAG = "phi3.cache_key"
SOURCE_TAG = "phi3.source_version"
# What a profile may set, and so what the chain passes on; main's CLI overrides any of them.
PROFILE_KEYS = (
    "model", "trust_remote_code", "precision", "onnx_model_dir", "serve_max_new_tokens", "max_new_tokens",
    "temperature", "dataset", "question_column", "answer_column", "select_metric", "engine", "registered_model_name",
    "alias", "min_accuracy", "force", "use_cache",
)  # fmt: skip
# The project's own files: what a content hash of the source covers outside a clean git tree.
SOURCE_GLOBS = ("MLproject", "*.yaml", "requirements*.txt", "steps/**/*.py", "phi3mlflow/**/*.py", "data/**/*")


class ProfileError(ValueError):
    pass


def load_profile(path: str) -> dict:
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = PROJECT_ROOT / p
    if not p.is_file():
        known = ", ".join(sorted(str(x.relative_to(PROJECT_ROOT)) for x in (PROJECT_ROOT / "params").glob("*.yaml")))
        raise ProfileError(f"params_file: no such profile {path!r} (known: {known})")
    try:
        profile = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"params_file: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(profile, dict):
        raise ProfileError(f"params_file: {path} must be a mapping of parameter names to values")
    unknown = sorted(set(profile) - set(PROFILE_KEYS))
    if unknown:
        raise ProfileError(f"params_file: {path} sets unknown parameters {unknown}")
    missing = sorted(set(PROFILE_KEYS) - set(profile))
    if missing:
        raise ProfileError(f"params_file: {path} lacks {missing}")
    return {k: _as_param(v) for k, v in profile.items()}


def _as_param(value) -> str:
    """A YAML value as the string MLflow logs (true/false for booleans, like the CLI takes)."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def source_version(root: Path = PROJECT_ROOT) -> str:
    """``git:<commit>`` for a clean git tree; else ``sha256:<hash>`` of the project's own files."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
        if not dirty.stdout.strip():
            return f"git:{commit.stdout.strip()}"
    except (OSError, subprocess.CalledProcessError):
        pass
    h = hashlib.sha256()
    files = sorted({f for g in SOURCE_GLOBS for f in root.glob(g) if f.is_file() and "__pycache__" not in f.parts})
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return f"sha256:{h.hexdigest()[:20]}"


def cache_key(entry_point: str, params: dict, source: str) -> str:
    blob = json.dumps({"entry_point": entry_point, "params": params, "source": source}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class StepResult:
    name: str
    run_id: str
    reused: bool


class StepFailed(RuntimeError):
    def __init__(self, name: str, run_id: str | None, cause: str):
        super().__init__(f"step {name} failed (run {run_id or 'unknown'}): {cause}")


class Chain:
    """Runs the project's entry points as children of the active run, reusing finished ones."""

    def __init__(self, experiment_id: str, parent_run_id: str, use_cache: bool, env_manager: str = "local"):
        import mlflow

        self.client = mlflow.MlflowClient()
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.use_cache = use_cache
        self.env_manager = env_manager
        self.source = source_version()

    def find_reusable(self, key: str):
        # The key is unique to entry point + params + source, so the newest match is the one;
        # filtering on the server means no page of old runs is ever skipped.
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{CACHE_TAG}` = '{key}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def run(self, name: str, params: dict) -> StepResult:
        import mlflow
        from mlflow.exceptions import ExecutionException

        params = {k: str(v) for k, v in params.items()}
        key = cache_key(name, params, self.source)
        if self.use_cache and (hit := self.find_reusable(key)):
            print(f"main: {name}: reusing finished run {hit.info.run_id}", flush=True)
            return self._record(StepResult(name, hit.info.run_id, True))
        print(f"main: {name}: running with {params}", flush=True)
        try:
            submitted = mlflow.run(
                str(PROJECT_ROOT),
                entry_point=name,
                parameters=params,
                experiment_id=self.experiment_id,
                env_manager=self.env_manager,
                synchronous=True,
            )
        except ExecutionException as e:
            failed = self._latest_child(name)
            cause = (failed.data.tags.get(ERROR_TAG) if failed else None) or str(e)
            raise StepFailed(name, failed.info.run_id if failed else None, cause) from None
        self.client.set_tag(submitted.run_id, CACHE_TAG, key)
        self.client.set_tag(submitted.run_id, SOURCE_TAG, self.source)
        return self._record(StepResult(name, submitted.run_id, False))

    def _latest_child(self, name: str):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' "
            f"and tags.`mlflow.project.entryPoint` = '{name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def _record(self, result: StepResult) -> StepResult:
        self.client.set_tag(self.parent_run_id, f"child.{result.name}.run_id", result.run_id)
        self.client.set_tag(self.parent_run_id, f"child.{result.name}.cache", "reused" if result.reused else "run")
        return result
