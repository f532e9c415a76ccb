"""The candidates: the model URIs a user names, resolved and checked to be the wrapper they are
named as (reading only their MLmodel and their run's tags), each given its key (chat, onnx_int4, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from phi3mlflow import tags
from phi3mlflow.errors import InputError

# What each wrapper's signature takes, so a URI of the wrong kind is caught before loading.
INPUT_FIELD = {"chat": "messages", "onnx": "prompt"}
# The key of the transformers pipeline: the reference every other candidate is compared with.
REFERENCE = "chat"
# The key of the alias's current holder when it is asked as a candidate of its own.
CHAMPION = "champion"


def _fail(param: str, message: str):
    raise InputError(param, message)


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate, as named on the command line and as its logging run tagged it."""

    key: str  # chat, or onnx_<precision>: the candidate's name in metrics, tables and summary.json
    wrapper: str  # chat or onnx
    precision: str
    uri: str
    model_id: str | None  # the LoggedModel's ID, when the URI resolves to one


def check_model_uri(param: str, wrapper: str, uri: str) -> ModelRef:
    """Resolve ``uri`` (reads only its MLmodel and its run's tags) and check it is a ``wrapper`` model."""
    import mlflow  # heavy: MLflow stays off the fast path of the checks above
    from mlflow.exceptions import MlflowException  # heavy: as above

    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as e:  # noqa: BLE001 - any failure to resolve is the user's URI
        raise InputError(param, f"cannot resolve {uri!r}: {str(e).splitlines()[0][:200]}") from None
    inputs = info.signature.inputs.input_names() if info.signature else []
    if INPUT_FIELD[wrapper] not in inputs:
        takes = inputs or "no declared inputs"
        _fail(param, f"{uri} takes {takes}, not {INPUT_FIELD[wrapper]!r}: is it the right wrapper?")
    # Both wrappers take chat requests now: the flavor tells them apart.
    is_transformers = "transformers" in (info.flavors or {})
    if is_transformers != (wrapper == "chat"):
        kind = "a transformers pipeline" if is_transformers else "not a transformers pipeline"
        _fail(param, f"{uri} is {kind}: is it the right wrapper?")
    run_tags: dict = {}
    if info.run_id:
        try:
            run_tags = mlflow.MlflowClient().get_run(info.run_id).data.tags
        except MlflowException:
            pass  # a model whose run is gone still evaluates; it is named by position
    precision = "fp32" if wrapper == "chat" else run_tags.get(tags.PRECISION, "unknown")
    key = "chat" if wrapper == "chat" else f"onnx_{precision}"
    return ModelRef(key, wrapper, precision, uri, getattr(info, "model_id", None))


def check_candidates(chat_uri: str, onnx_uris: str) -> list[ModelRef]:
    """The models to evaluate: the transformers reference (if given) and every ONNX model, each
    resolved and named; ONNX models of the same precision are numbered (onnx_int4, onnx_int4_2)."""
    onnx = [u.strip() for u in onnx_uris.split(",") if u.strip()]
    if not chat_uri.strip() and not onnx:
        _fail("chat_model_uri", "give chat_model_uri, onnx_model_uris or both")
    dupes = sorted({u for u in onnx if onnx.count(u) > 1})
    if dupes:
        _fail("onnx_model_uris", f"{dupes[0]} is listed more than once")
    refs = [check_model_uri("chat_model_uri", "chat", chat_uri.strip())] if chat_uri.strip() else []
    for uri in onnx:
        ref = check_model_uri("onnx_model_uris", "onnx", uri)
        same = next((r for r in refs if ref.model_id and r.model_id == ref.model_id), None)
        if same is not None:
            _fail("onnx_model_uris", f"{uri} is the same logged model ({ref.model_id}) as {same.uri}")
        taken = {r.key for r in refs}
        key, n = ref.key, 2
        while key in taken:
            key, n = f"{ref.key}_{n}", n + 1
        refs.append(ModelRef(key, ref.wrapper, ref.precision, ref.uri, ref.model_id))
    return refs


@dataclass(frozen=True)
class Champion:
    """What holds the alias now: its version and, when it can be asked, its ModelRef (key
    ``champion``); otherwise why not."""

    version: str | None
    ref: ModelRef | None = None
    error: str = ""


def find_champion(registered_model_name: str, alias: str) -> Champion:
    """The version ``registered_model_name@alias`` points to, resolved as a candidate of its own (the
    wrapper told by its flavor). No alias (or no registered model): Champion(None). A version whose
    model cannot be resolved is a Champion with ``error`` saying why, in one line."""
    import mlflow  # heavy: MLflow stays off the fast path of the checks above
    from mlflow.exceptions import MlflowException  # heavy: as above

    if not registered_model_name.strip() or not alias.strip():
        return Champion(None)
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(registered_model_name, alias)
    except MlflowException:
        return Champion(None)
    uri = f"models:/{registered_model_name}/{version.version}"
    try:
        info = mlflow.models.get_model_info(uri)
        wrapper = "chat" if "transformers" in (info.flavors or {}) else "onnx"
        ref = check_model_uri("alias", wrapper, uri)
    except Exception as e:  # noqa: BLE001 - deleted artifacts, a model of another kind: the champion is unusable
        cause = " ".join(str(getattr(e, "message", e)).split())[:300] or type(e).__name__
        return Champion(version.version, error=f"@{alias} (version {version.version}) cannot be resolved: {cause}")
    precision = version.tags.get(tags.PRECISION, ref.precision)
    return Champion(version.version, ModelRef(CHAMPION, ref.wrapper, precision, uri, ref.model_id))
