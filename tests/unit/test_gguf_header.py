"""GGUF header checks that need no model file of real size."""

from __future__ import annotations

import pytest

from phi3mlflow.errors import InputError


def test_an_old_gguf_version_is_named_not_called_damaged(tmp_path):
    import struct

    from phi3mlflow import gguf

    old = tmp_path / "old.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<I", 1) + b"\0" * 64)
    with pytest.raises(InputError) as e:
        gguf.inspect(old)
    assert "GGUF version 1" in str(e.value) and "damaged" not in str(e.value)
