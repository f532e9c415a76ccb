"""The main chain's machinery: parameter profiles, the code version, and step runs with a cache
that reuses a finished run only when its entry point, parameters, code and the contents of the
files its parameters name are unchanged, and its outputs still exist."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from phi3mlflow import PROJECT_ROOT, sources, tags
from phi3mlflow.cache import MARKER, tree_digest, versions
from phi3mlflow.cli import take_cancel
from phi3mlflow.deps import step_files
from phi3mlflow.errors import InputError
from phi3mlflow.stderr_tail import StderrTail
from phi3mlflow.tracking import requirement_pins

# What a profile may set, and so what the chain passes on; main's CLI overrides any of them.
PROFILE_KEYS = (
    "model", "trust_remote_code", "precisions", "onnx_model_dir", "serve_max_new_tokens", "max_new_tokens",
    "temperature", "dataset", "question_column", "answer_column", "select_metric", "engine", "registered_model_name",
    "alias", "min_accuracy", "max_accuracy_drop", "force", "use_cache", "max_prompts_per_request",
    "max_total_new_tokens", "max_kld", "fidelity",
)  # fmt: skip
# Keys renamed after profiles were in use: the error names the new spelling.
RENAMED = {"precision": "precisions (a comma-separated list)"}
# Keys added after profiles were in use: a profile without them gets the step's own default
# (main fills it in from the parser of the step the key is wired to).
OPTIONAL_KEYS = ("max_accuracy_drop", "max_prompts_per_request", "max_total_new_tokens", "max_kld", "fidelity")
# The code a step runs and the environment it runs in: what the code version hashes. Profiles, data
# and docs are not code: data reaches a step through a parameter, whose content is keyed itself.
CODE_GLOBS = ("MLproject", "python_env.yaml", "conda.yaml", "requirements*.txt", "steps/**/*.py",
              "phi3mlflow/**/*.py")  # fmt: skip
# A failed step's stderr tail as kept on its run (tag phi3.stderr_tail), and its last line in main's error.
TAIL_TAG_CHARS, LAST_LINE_CHARS = 2000, 300
# The entry points a chain runs: their runs may be ended by a later chain when left RUNNING (serve's never).
CHAIN_ENTRY_POINTS = ("main", "pipeline_wrapper", "onnx_wrapper", "evaluate", "register")
# Parameters that name a file or folder: the step cache keys on what they hold, not on the string.
CONTENT_PARAMS = ("model", "onnx_model_dir", "dataset")


# Profile keys whose value is text: a YAML number there (model: 0x1F is 31) is a mistake, not a name.
TEXT_KEYS = ("model", "onnx_model_dir", "dataset", "question_column", "answer_column", "select_metric", "engine",
             "registered_model_name", "alias", "precisions")  # fmt: skip


class _StrictLoader(yaml.SafeLoader):
    """YAML without aliases (a billion-laughs profile expands to gigabytes) or duplicate keys (the
    last would win silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, "aliases are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_profile(path: str) -> dict:
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = PROJECT_ROOT / p
    if not p.is_file():
        known = ", ".join(sorted(str(x.relative_to(PROJECT_ROOT)) for x in (PROJECT_ROOT / "params").glob("*.yaml")))
        raise InputError("params_file", f"no such profile {path!r} (known: {known})")
    try:
        profile = yaml.load(p.read_text(), Loader=_StrictLoader) or {}  # noqa: S506 - a safe loader, stricter
    except yaml.YAMLError as e:
        cause = " ".join(str(e).split())[:200]
        raise InputError("params_file", f"{path} is not valid YAML: {cause}") from None
    if not isinstance(profile, dict):
        raise InputError("params_file", f"{path} must be a mapping of parameter names to values")
    unknown = sorted(set(profile) - set(PROFILE_KEYS))
    if unknown:
        hints = "".join(f"; {k} is now {RENAMED[k]}" for k in unknown if k in RENAMED)
        raise InputError("params_file", f"{path} sets unknown parameters {unknown}{hints}")
    missing = sorted(set(PROFILE_KEYS) - set(profile) - set(OPTIONAL_KEYS))
    if missing:
        raise InputError("params_file", f"{path} lacks {missing}")
    for key, value in profile.items():
        if key in TEXT_KEYS and value is not None and not isinstance(value, str):
            raise InputError("params_file", f"{path}: {key} must be text, got {value!r} (quote it)")
        if isinstance(value, list | dict):
            raise InputError("params_file", f"{path}: {key} must be a single value, got {type(value).__name__}")
    return {k: _as_param(v) for k, v in profile.items()}


def _as_param(value) -> str:
    """A YAML value as the string MLflow logs (true/false for booleans, like the CLI takes)."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def code_version(root: Path = PROJECT_ROOT, step: str | None = None) -> str:
    """``sha256:<hash>`` of the code and environment files, wherever they came from: the whole
    project's (CODE_GLOBS), or with ``step`` only the files that step runs (phi3mlflow/deps.py), so
    that editing the server re-runs no export and no evaluation.

    One rule for a git checkout, a dirty tree and a git URL: content. A commit that changes only
    the README or a profile reuses every step; the git commit stays on each run as provenance
    (``mlflow.source.git.commit``). The installed versions of the packages requirements.txt pins
    count too: under ``--env-manager local`` an upgrade changes what the steps produce.
    """
    if step is None:
        files = sorted({f for g in CODE_GLOBS for f in root.glob(g) if f.is_file() and "__pycache__" not in f.parts})
    else:
        files = step_files(step, root)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(versions(*sorted(requirement_pins())).encode())
    return f"sha256:{h.hexdigest()[:20]}"


def cache_key(entry_point: str, params: dict, code: str, inputs: dict | None = None) -> str:
    blob = json.dumps({"entry_point": entry_point, "params": params, "code": code, "inputs": inputs or {}},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def input_digest(param: str, value: str) -> str | None:
    """The content digest of what a path-valued parameter names (None for other parameters)."""

    if not value.strip() or param not in CONTENT_PARAMS:
        return None
    if param == "model":
        return sources.content_digest(value)
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    return tree_digest(path) if path.exists() else "missing"


def process_tag(pid: int | None = None) -> str:
    """The value of tag phi3.process for process ``pid`` (this one by default) on this host."""
    return f"{socket.gethostname()} {pid or os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process of this host that may still end its run (not a reused PID)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): alive as far as can be told
    return b"steps." in cmdline or b"mlflow" in cmdline or b"bash" in cmdline


def abandoned(runs, before_ms: int, host: str, alive=process_alive) -> list[tuple[str, str]]:
    """``(run_id, cause)`` of the runs an earlier chain left RUNNING and that nothing will end:
    RUNNING, tagged phi3.process by a chain (main or one of its steps; never a serve run, whose
    server may be up), started before ``before_ms`` (the current chain's start), on this host, and
    whose process is gone. A run of another host is left alone: its process cannot be looked at."""
    out = []
    for run in runs:
        where = run.data.tags.get(tags.PROCESS, "")
        entry = run.data.tags.get("mlflow.project.entryPoint")
        if run.info.status != "RUNNING" or not where or entry not in CHAIN_ENTRY_POINTS:
            continue
        if run.info.start_time is None or run.info.start_time >= before_ms:
            continue
        run_host, _, pid = where.rpartition(" ")
        if run_host != host or not pid.isdigit() or alive(int(pid)):
            continue
        out.append((run.info.run_id, f"its process ({pid} on {host}) is gone and left it RUNNING; marked FAILED"
                                      " by a later chain"))  # fmt: skip
    return out


@dataclass
class StepResult:
    name: str
    run_id: str
    reused: bool


class StepFailed(RuntimeError):
    def __init__(self, name: str, run_id: str | None, cause: str):
        super().__init__(f"step {name} failed (run {run_id or 'unknown'}): {cause}")


class Chain:
    """Runs the project's entry points as children of the active run, reusing finished ones whose
    parameters, code and input contents are unchanged and whose outputs still exist."""

    def __init__(self, experiment_id: str, parent_run_id: str, use_cache: bool, env_manager: str = "local"):
        import mlflow  # heavy: MLflow, off the fast path

        self.client = mlflow.MlflowClient()
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.use_cache = use_cache
        self.env_manager = env_manager
        self.code = code_version()
        self.client.set_tag(parent_run_id, tags.PROCESS, process_tag())
        self._step_code: dict[str, str] = {}
        self._digests: dict[tuple[str, str], str | None] = {}

    def end_abandoned(self, before_ms: int) -> list[str]:
        """End FAILED, with the cause tagged, the runs earlier chains of this experiment left RUNNING
        whose process is gone (a stopped tracking server, a killed main); their IDs."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500
        )
        ended = []
        for run_id, cause in abandoned(runs, before_ms, socket.gethostname()):
            if run_id == self.parent_run_id:
                continue
            self.client.set_tag(run_id, tags.ERROR, cause)
            self.client.set_tag(run_id, "mlflow.note.content", f"Failed: {cause}")
            self.client.set_terminated(run_id, "FAILED")
            ended.append(run_id)
        return ended

    def inputs(self, params: dict) -> dict:
        """Content digests of the files and folders ``params`` name, computed once per chain run."""
        out = {}
        for param, value in params.items():
            if (param, value) not in self._digests:
                self._digests[(param, value)] = input_digest(param, value)
            if self._digests[(param, value)] is not None:
                out[param] = self._digests[(param, value)]
        return out

    def find_reusable(self, key: str):
        # The key is unique to entry point + params + code + inputs, so the newest match is the
        # one; filtering on the server means no page of old runs is ever skipped.
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{tags.CACHE_KEY}` = '{key}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def run(self, name: str, params: dict, cacheable: bool = True, label: str | None = None,
            extra_inputs: dict[str, str] | None = None) -> StepResult:  # fmt: skip
        """Run entry point ``name`` (or reuse a finished run); ``cacheable=False`` for side effects.

        ``label`` names the child on the parent (tags ``child.<label>.*``) when an entry point runs
        more than once in a chain (``onnx_wrapper.int4``); it defaults to ``name``. ``extra_inputs``
        are inputs that are no parameter (the champion's version) and key the cache all the same."""
        import mlflow  # heavy: MLflow, off the fast path
        from mlflow.exceptions import ExecutionException  # heavy: MLflow, off the fast path

        label = label or name
        params = {k: str(v) for k, v in params.items()}
        inputs = {**self.inputs(params), **(extra_inputs or {})}
        if name not in self._step_code:
            self._step_code[name] = code_version(step=name)
        key = cache_key(name, params, self._step_code[name], inputs)
        if cacheable and self.use_cache and (hit := self.find_reusable(key)):
            problem = outputs_missing(self.client, name, hit)
            if problem is None:
                print(f"main: {label}: reusing finished run {hit.info.run_id}", flush=True)
                return self._record(StepResult(label, hit.info.run_id, True))
            print(f"main: {label}: not reusing run {hit.info.run_id}: {problem}; running again", flush=True)
        print(f"main: {label}: running with {params}", flush=True)
        launched_ms = int(time.time() * 1000)
        stderr = StderrTail()
        try:
            # The child's stderr passes through a tee: its last lines outlive a child killed from outside.
            with stderr.attached():
                submitted = mlflow.run(
                    str(PROJECT_ROOT),
                    entry_point=name,
                    parameters=params,
                    experiment_id=self.experiment_id,
                    env_manager=self.env_manager,
                    synchronous=False,  # waited for below, where the child's exit status can be read
                )
            self.client.set_tag(submitted.run_id, tags.PROCESS, process_tag(submitted.command_proc.pid))
            self._wait(label, submitted, stderr.tail)
        except StepFailed:
            raise
        except Exception as e:  # noqa: BLE001 - the step's own failure, or its environment's (virtualenv, conda)
            failed = self._latest_child(name, launched_ms)
            cause = (failed.data.tags.get(tags.ERROR) if failed else None) or f"{type(e).__name__}: {e}"
            if failed is not None and failed.info.status == "RUNNING":
                self.client.set_tag(failed.info.run_id, tags.ERROR, cause[:1000])
                self.client.set_terminated(failed.info.run_id, "FAILED")
            if not isinstance(e, ExecutionException):
                cause = cause.strip().splitlines()[0] if cause.strip() else type(e).__name__
            raise StepFailed(label, failed.info.run_id if failed else None, cause) from None
        run_tags = {tags.CODE_VERSION: self._step_code[name], **{tags.INPUT_DIGEST + k: v for k, v in inputs.items()}}
        if cacheable:
            run_tags[tags.CACHE_KEY] = key
        for k, v in run_tags.items():
            self.client.set_tag(submitted.run_id, k, v)
        return self._record(StepResult(label, submitted.run_id, False))

    def _wait(self, label: str, submitted, stderr_tail: Callable[[], str] = str) -> None:
        """Wait for a launched step; a cancel (SIGTERM/SIGINT) stops it too. A step that fails records
        its cause on its run; one that dies without a Python error (killed from outside, out of
        memory) cannot, so its signal or exit status and the last lines of its stderr
        (``stderr_tail()``) are recorded here, on its run, and named in the error."""
        try:
            ok = submitted.wait()
        except BaseException as e:
            # The chain takes the cancel: the watchdog must not raise it again while the step stops.
            take_cancel()
            # The step records its own cancellation as it stops (cancel waits for it); where it could
            # not (stopped before its handler ran), the chain's cause ("cancelled by SIGTERM") goes on.
            submitted.cancel()
            self._end(submitted.run_id, str(e) or f"the chain was cancelled ({type(e).__name__})")
            raise
        if ok:
            self._end(submitted.run_id, None)
            return
        code = submitted.command_proc.returncode
        sig = -code if code < 0 else code - 128 if code > 128 else 0
        try:
            how = f"killed by {signal.Signals(sig).name}" if sig else f"exited with status {code}"
        except ValueError:
            how = f"exited with status {code}"
        tail = stderr_tail()[-TAIL_TAG_CHARS:]
        run = self.client.get_run(submitted.run_id)
        own = run.data.tags.get(tags.ERROR)
        cause = own or f"the step was {how}, with no error of its own"
        self.client.set_tag(submitted.run_id, tags.EXIT, how)
        if tail:
            self.client.set_tag(submitted.run_id, tags.STDERR_TAIL, tail)
        if not own:
            last = tail.splitlines()[-1].strip()[:LAST_LINE_CHARS] if tail else ""
            cause += f"; its stderr ended: {last}" if last else "; it wrote nothing to stderr"
        self._end(submitted.run_id, cause, tail)
        raise StepFailed(label, submitted.run_id, cause if how in cause else f"{cause} ({how})")

    def _end(self, run_id: str, cause: str | None, stderr_tail: str = "") -> None:
        """The child's run ended as the step did (a killed step could not end it itself)."""
        run = self.client.get_run(run_id)
        if cause and tags.ERROR not in run.data.tags:
            self.client.set_tag(run_id, tags.ERROR, cause[:1000])
            told = f"\n\nThe last lines of its stderr:\n\n```\n{stderr_tail}\n```" if stderr_tail else ""
            self.client.set_tag(run_id, "mlflow.note.content", f"Failed: {cause[:1000]}{told}")
        if run.info.status == "RUNNING":
            self.client.set_terminated(run_id, "FINISHED" if cause is None else "FAILED")

    def _latest_child(self, name: str, since_ms: int):
        """The run this launch of ``name`` created, if it got that far (not an earlier sibling's)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' "
            f"and tags.`mlflow.project.entryPoint` = '{name}' and attributes.start_time >= {since_ms}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def _record(self, result: StepResult) -> StepResult:
        self.client.set_tag(self.parent_run_id, f"child.{result.name}.run_id", result.run_id)
        self.client.set_tag(self.parent_run_id, f"child.{result.name}.cache", "reused" if result.reused else "run")
        return result


# Files a logged model cannot answer without: its MLmodel and at least one file of weights.
_WEIGHTS = (".onnx", ".safetensors", ".bin", ".pt")


def outputs_missing(client, name: str, run) -> str | None:
    """Why a finished run's outputs cannot be used any more, or None when they all resolve."""
    import mlflow  # heavy: MLflow, off the fast path

    try:
        if name in ("pipeline_wrapper", "onnx_wrapper"):
            uri = run.data.tags.get(tags.MODEL_URI)
            if not uri:
                return "it names no logged model"
            root = mlflow.get_logged_model(uri.split("/")[1]).artifact_location if uri.startswith("models:/m-") else uri
            paths = _list_files(root, depth=4)
            files = [p.rsplit("/", 1)[-1] for p in paths]
            if "MLmodel" not in files:
                return f"its model {uri} has no MLmodel any more"
            if not any(f.endswith(_WEIGHTS) for f in files):
                return f"its model {uri} has no weights any more"
            # A built model carries the digests of its files (the cache's completion marker): each
            # file it names must still be there.
            for marker in (p for p in paths if p.rsplit("/", 1)[-1] == MARKER):
                folder = marker.rsplit("/", 1)[0] if "/" in marker else ""
                named = mlflow.artifacts.load_dict(f"{root.rstrip('/')}/{marker}")["files"]
                gone = sorted(f for f in named if (f"{folder}/{f}" if folder else f) not in paths)
                if gone:
                    return f"its model {uri} is damaged: {gone[0]} is missing"
        elif name == "evaluate":
            mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/summary.json")
    except Exception as e:  # noqa: BLE001 - whatever fails to resolve means "run it again"
        return f"its outputs do not resolve ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})"
    return None


def _list_files(artifact_uri: str, depth: int, prefix: str = "") -> list[str]:
    """Paths of the files under ``artifact_uri``, relative to it, ``depth`` folders deep."""
    import mlflow  # heavy: MLflow, off the fast path

    files = []
    for item in mlflow.artifacts.list_artifacts(artifact_uri=artifact_uri):
        name = item.path.rsplit("/", 1)[-1]
        if item.is_dir:
            if depth > 1:
                files += _list_files(f"{artifact_uri.rstrip('/')}/{name}", depth - 1, f"{prefix}{name}/")
        else:
            files.append(f"{prefix}{name}")
    return files
