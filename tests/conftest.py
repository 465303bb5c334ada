"""Shared test fixtures.

TRITON_INTERPRET must be set before anything imports triton, so that Triton kernels run on CPU in CI.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DDFM_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (set DDFM_SHARED to the folder that holds reference/ and data/)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(REFERENCE)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def em_golden(reference_dir: Path):
    return dict(np.load(reference_dir / "em_onestep.npz"))


@pytest.fixture(scope="session")
def sampler_golden(reference_dir: Path):
    return dict(np.load(reference_dir / "sampler_tiny.npz"))
