"""Model sources: parsing (fast), and the hub path offline through a Hugging Face cache that the
test lays out itself (slow: it builds the built-in model and exports it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from phi3mlflow import sources
from phi3mlflow.errors import InputError
from tests.support import ROOT


@pytest.mark.parametrize(
    "value,kind",
    [
        ("builtin:tiny-phi3", "builtin:tiny-phi3"),
        ("microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct"),
        ("gpt2", "gpt2"),
    ],
)
def test_names_that_need_no_file_pass_through(value, kind):
    assert sources.check(value) == kind


@pytest.mark.parametrize(
    "value,needle",
    [
        ("builtin:gpt5", "unknown built-in model"),
        ("./no/such/folder", "no such model directory"),
        ("/", "has no config.json"),
        ("not a hub id!", "neither a built-in model"),
        ("gguf:/no/such/file.gguf", "/no/such/file.gguf"),
    ],
)
def test_bad_sources_name_model_in_one_line(value, needle):
    with pytest.raises(InputError) as e:
        sources.check(value)
    assert e.value.parameter == "model" and needle in str(e.value) and "\n" not in str(e.value)


REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_home(builtin_dir, tmp_path_factory):
    """A Hugging Face cache holding the built-in model as the hub repo acme/tiny-chat."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / "models--acme--tiny-chat"
    shutil.copytree(builtin_dir, repo / "snapshots" / REVISION, ignore=shutil.ignore_patterns(".phi3-*"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return home


def _offline(hf_home, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_hub_id_resolves_to_its_cached_snapshot_and_exports_once(hf_home, model_cache):
    code = (
        "from phi3mlflow import sources; from phi3mlflow.onnx_export import export\n"
        "folder = sources.resolve('acme/tiny-chat'); print('OUT', folder)\n"
        "print('OUT', sources.content_digest('acme/tiny-chat'))\n"
        "a = export(folder, 'int4'); b = export(folder, 'int4'); print('OUT', a == b, a)\n"
    )
    proc = _offline(hf_home, code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder, digest, exported = [line[4:] for line in proc.stdout.splitlines() if line.startswith("OUT ")]
    assert folder.endswith(f"snapshots/{REVISION}")
    assert digest == f"hub:acme/tiny-chat@{REVISION}"
    assert exported.startswith("True ") and "onnx-int4-" in exported


@pytest.mark.slow
def test_an_unreachable_hub_id_fails_in_seconds_naming_model(hf_home, tracking_uri):
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "steps.pipeline_wrapper", "--model", "acme/not-there"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and time.time() - start < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: model: cannot get 'acme/not-there'"), proc.stderr
