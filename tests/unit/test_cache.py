"""The model cache and content digests: damaged entries rebuilt, digests that follow content."""

from __future__ import annotations

import json
import os
import shutil
import time

from phi3mlflow import cache


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PHI3MLFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "_STAT_CACHE", None)
    builds = []

    def build(out):
        builds.append(out)
        (out / "model.safetensors").write_bytes(os.urandom(4096))
        (out / "config.json").write_text(json.dumps({"ok": True}))

    entry = cache.cached("demo", "k1", build)
    assert cache.cached("demo", "k1", build) == entry and len(builds) == 1
    with open(entry / "model.safetensors", "r+b") as f:  # truncated, as a killed copy leaves it
        f.truncate(100)
    assert cache.incomplete(entry) == "model.safetensors is not what was built"
    assert cache.cached("demo", "k1", build) == entry and len(builds) == 2
    assert "incomplete (model.safetensors is not what was built); rebuilding" in capsys.readouterr().err
    # An entry without the completion marker (a build killed before it finished, or an older layout).
    (entry / cache.MARKER).unlink()
    cache.cached("demo", "k1", build)
    assert len(builds) == 3 and cache.incomplete(entry) is None


def test_digests_follow_content_not_names(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI3MLFLOW_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(cache, "_STAT_CACHE", None)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"1" * 100)
    before = cache.tree_digest(tmp_path / "a")
    assert cache.tree_digest(tmp_path / "a") == before
    # Renamed or copied elsewhere: the same content, the same digest.
    (tmp_path / "a").rename(tmp_path / "b")
    assert cache.tree_digest(tmp_path / "b") == before
    shutil.copytree(tmp_path / "b", tmp_path / "copy")
    assert cache.tree_digest(tmp_path / "copy") == before
    (tmp_path / "b" / "w.bin").write_bytes(b"2" * 100)
    assert cache.tree_digest(tmp_path / "b") != before


def test_a_same_size_edit_with_its_mtime_put_back_is_seen(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI3MLFLOW_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(cache, "_STAT_CACHE", None)
    f = tmp_path / "data.jsonl"
    f.write_text("answer: 1\n")
    before = cache.file_digest(f)
    st = f.stat()
    time.sleep(0.01)
    f.write_text("answer: 2\n")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: the mtime put back
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    assert cache.file_digest(f) != before


def test_the_digest_memo_forgets_the_temporary_build_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI3MLFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "_STAT_CACHE", None)
    entry = cache.cached("memo", "k", lambda out: (out / "w.bin").write_bytes(b"w" * 10))
    memo = json.loads((tmp_path / "digests.json").read_text())
    assert str((entry / "w.bin").resolve()) in memo and not any(".build-" in k for k in memo)
