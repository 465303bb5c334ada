"""Benchmark fixtures. Run with ``pytest bench/`` (the test run does not collect this folder).

Speed numbers come from here (pytest-benchmark), never from unit tests. Every benchmark records the device,
torch / triton versions and the sizes in ``benchmark.extra_info`` so a saved run carries its own context.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DDFM_SHARED", REPO.parent / "shared"))


def device_info() -> dict:
    """Where a number was measured: device name, versions, thread count."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = "cpu"
    return info


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"{SHARED} is absent (set DDFM_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The golden folder, found as the gpu suite finds it (``DDFM_REFERENCE``, ``../shared/reference``,
    ``.gpu-reference/``): ``ddfm_fast.gpu_check.find_reference``."""
    from ddfm_fast.gpu_check import find_reference

    lookup = find_reference()
    if lookup.path is None:
        pytest.skip(lookup.describe())
    return lookup.path


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
