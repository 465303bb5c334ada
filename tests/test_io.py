"""Atomic writes: the result replaces the destination in one rename, with ordinary file permissions."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ddfm_fast import io


def test_atomic_output_gets_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        out = io.save_png(np.zeros((4, 5), np.uint8), tmp_path / "a.png")
    finally:
        os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
