"""The packaging promise for a regular (non-editable) install: `pip install .` installs only `ddfm_fast`, with
the kernels, the CLI, the web page's files, the shipped weights and the sample pairs inside it, and the installed
copy fuses the sample pair from a folder that is not the checkout.

The editable install that CI uses resolves files from the checkout, so it cannot show a file missing from the
wheel; this builds the wheel from a copy of the checkout (setuptools writes build/ into its source tree) and
installs it with --target, without dependencies (they are the test environment's own).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the checkout has that a wheel must not carry or that a copy does not need.
_SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                               ".benchmarks", ".gpu-reference", "tests", "bench")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_SKIP)
    out = work / "dist"
    # Build isolation fetches setuptools from the package index when this environment has none of its own.
    isolation = ["--no-build-isolation"] if _has_setuptools() else []
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(src),
                           "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("ddfm_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _has_setuptools() -> bool:
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return False
    return True


def test_wheel_holds_only_ddfm_fast_and_everything_it_needs(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ddfm_fast"}, top
    # Every kernel module and the CLI (a symlink in the checkout) arrive as files inside the package.
    kernels = sorted(p.name for p in (REPO / "kernels").glob("*.py"))
    assert kernels, "the checkout has no kernels/*.py"
    for name in kernels:
        assert f"ddfm_fast/kernels/{name}" in names, name
    assert "ddfm_fast/cli.py" in names
    # Every data file the package reads at run time: the web page, the shipped weights, the sample pairs.
    for folder, pattern in (("web/static", "*"), ("weights", "*.safetensors"), ("samples", "*.png")):
        files = sorted((REPO / "ddfm_fast" / folder).glob(pattern))
        assert files, f"ddfm_fast/{folder} has no {pattern}"
        for path in files:
            if path.is_file():
                assert f"ddfm_fast/{folder}/{path.name}" in names, path
    # Every module of the package itself.
    for path in (REPO / "ddfm_fast").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if "__pycache__" not in rel:
            assert rel in names, rel


@pytest.mark.slow
def test_installed_wheel_fuses_the_sample_pair_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    # The installed copy, not the checkout's editable one, must be the one imported.
    probe = subprocess.run([sys.executable, "-c", "import ddfm_fast, ddfm_fast.kernels, ddfm_fast.web.app; "
                            "print(ddfm_fast.__file__)"], cwd=run_dir, env=env, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert Path(probe.stdout.strip()).is_relative_to(target), probe.stdout
    out = run_dir / "fused.png"
    proc = subprocess.run([sys.executable, "-m", "ddfm_fast", "fuse", "--example", "-o", str(out), "--quiet"],
                          cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (640, 480)
        lo, hi = img.convert("L").getextrema()
    assert hi > lo, "the fused sample is flat"
