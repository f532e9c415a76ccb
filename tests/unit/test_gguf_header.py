"""GGUF header checks that need no model file of real size: sparse files (``truncate``) stand in
for large ones, so a header's claims are tested without writing the bytes."""

from __future__ import annotations

import struct
import time

import pytest

from phi3mlflow import gguf
from phi3mlflow.errors import InputError


def test_an_old_gguf_version_is_named_not_called_damaged(tmp_path):
    old = tmp_path / "old.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<I", 1) + b"\0" * 64)
    with pytest.raises(InputError) as e:
        gguf.inspect(old)
    assert "GGUF version 1" in str(e.value) and "damaged" not in str(e.value)


def _sparse(path, header: bytes, size: int):
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)
    return path


def _string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def _refused_quickly(path) -> str:
    started = time.monotonic()
    with pytest.raises(InputError) as e:
        gguf.inspect(path)
    assert time.monotonic() - started < 5  # was 20 s on 2 cores for the 160 MB file below
    assert e.value.parameter == "model" and "\n" not in str(e.value)
    return e.value.message


def test_a_string_array_claiming_more_than_the_cap_is_refused_before_it_is_walked(tmp_path):
    # 160 MB of zeros holds 2*10^7 empty strings: the size alone does not refuse the claim.
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string("tokenizer.ggml.tokens")
    path = _sparse(tmp_path / "vocab.gguf", header + struct.pack("<IIQ", 9, 8, 20_000_000), 160 * 2**20)
    message = _refused_quickly(path)
    assert "metadata tokenizer.ggml.tokens claims 20000000 items" in message and "damaged" in message


def test_a_count_the_rest_of_the_file_cannot_hold_is_refused_naming_it(tmp_path):
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string("tokenizer.ggml.merges")
    path = _sparse(tmp_path / "merges.gguf", header + struct.pack("<IIQ", 9, 8, 1_000_000), 2**20)
    message = _refused_quickly(path)
    assert "metadata tokenizer.ggml.merges claims 1000000 items" in message and "bytes left" in message


@pytest.mark.parametrize(("n_tensors", "n_kv", "named"), [(0, 10_000_000, "metadata key count"),
                                                           (4_000_000, 0, "tensor count")])  # fmt: skip
def test_absurd_key_and_tensor_counts_are_refused_before_any_entry_is_read(tmp_path, n_tensors, n_kv, named):
    # 160 MB holds 10^7 minimal metadata entries (13 bytes each) and 4*10^6 minimal tensor entries.
    path = _sparse(tmp_path / "counts.gguf", b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv), 160 * 2**20)
    assert f"the {named} claims" in _refused_quickly(path)


def test_nested_arrays_count_against_the_same_cap(tmp_path, monkeypatch):
    # With the cap at 1,000 items: an array of 600 empty arrays is walked, then a second array's
    # 600 strings would pass the cap and are refused before they are read.
    monkeypatch.setattr(gguf, "MAX_HEADER_ITEMS", 1_000)
    entry = _string("a") + struct.pack("<IIQ", 9, 9, 600)
    inner = struct.pack("<IQ", 0, 0) * 600  # each: item type uint8, count 0
    second = _string("b") + struct.pack("<IIQ", 9, 8, 600)
    path = _sparse(tmp_path / "nested.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + entry + inner + second, 2**20)
    assert "metadata b claims 600 items, more than the 400 this reader walks" in _refused_quickly(path)
