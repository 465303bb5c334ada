"""Shared test fixtures.

Triton's CPU interpreter: where no GPU is present, ``TRITON_INTERPRET=1`` is set (unless the variable is already
set) so that the Triton kernels run on the CPU, as in CI. It must be set before anything imports triton, which
is why it happens here, first, with only torch imported to ask whether CUDA is there (importing torch does not
import triton). On a CUDA machine the kernels are compiled for the GPU unless ``TRITON_INTERPRET=1`` is asked for.

The goldens: ``reference_dir`` is the folder :func:`ddfm_fast.gpu_check.find_reference` finds
(``$DDFM_REFERENCE``, ``$DDFM_SHARED/reference``, ``../shared/reference``, ``.gpu-reference/``). Tests whose
golden is missing skip, naming the file; with ``DDFM_REQUIRE_REFERENCE=1`` (what ``ddfm-fast bench --suite gpu``
sets) they fail instead.

Every test runs in true fp32: TF32 is off for cuDNN convolutions and cuBLAS matmuls (on a CPU the switches change
nothing), since the goldens were made in full float32 (``ddfm_fast.precision``).
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Inductor's compiled code goes to a cache of this test session's own (unless one is named): code that other runs
# left in the machine-wide default cache (other thread counts, CPU capabilities, concurrent writers) was seen to
# corrupt the heap when reused here, and a test must compile what it tests.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddfm-fast-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ddfm_fast import gpu_check, precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DDFM_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


def _require() -> bool:
    return os.environ.get(gpu_check.ENV_REQUIRE) == "1"


def _absent(what: str) -> None:
    if _require():
        pytest.fail(f"{what} ({gpu_check.ENV_REQUIRE}=1: a missing golden is a failure)", pytrace=False)
    pytest.skip(what)


def _need(path: Path, hint: str = "set DDFM_SHARED to the folder that holds reference/ and data/") -> Path:
    if not path.exists():
        _absent(f"{path} is absent ({hint})")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    lookup = gpu_check.find_reference(repo=REPO)
    if lookup.path is None:
        _absent(f"{lookup.describe()} (set {gpu_check.ENV_REFERENCE} to the golden folder)")
    return lookup.path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA)


def golden_file(reference_dir: Path, name: str) -> Path:
    """A golden file of ``reference_dir``: skips (or, required, fails) naming the file when it is absent."""
    return _need(reference_dir / name, f"copy the goldens into the folder, or set {gpu_check.ENV_REFERENCE}")


@pytest.fixture(scope="session")
def em_golden(reference_dir: Path):
    return dict(np.load(golden_file(reference_dir, "em_onestep.npz")))


@pytest.fixture(scope="session")
def sampler_golden(reference_dir: Path):
    return dict(np.load(golden_file(reference_dir, "sampler_tiny.npz")))


@pytest.fixture(scope="session")
def tiny_unet_files(reference_dir: Path) -> tuple[Path, Path]:
    """(weights, config) of the tiny reference UNet."""
    return golden_file(reference_dir, "tiny_unet.pt"), golden_file(reference_dir, "tiny_unet_config.json")


@pytest.fixture(autouse=True, scope="session")
def _true_fp32():
    with precision.tf32(False):
        yield
