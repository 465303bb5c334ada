"""``ddfm-fast eval`` and ``ddfm-fast compare`` on small folders made in tmp_path."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddfm_fast.cli import main
from ddfm_fast.metrics import METRIC_NAMES, evaluate, read_gray_eval, structural_similarity

SIZE = (72, 80)  # H, W: above the 65x65 that VIF needs


def _img(seed: int, shape=SIZE) -> np.ndarray:
    """A deterministic 8-bit test image with smooth and textured parts."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = (x * (2 + seed) + y * (3 + 2 * seed)) % 256
    tex = np.random.default_rng(seed).integers(0, 40, shape)
    return np.clip(base + tex, 0, 255).astype(np.uint8)


def _save(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr if mode == "L" else np.stack([arr] * 3, -1), mode).save(path)


@pytest.fixture
def ivf_set(tmp_path: Path) -> Path:
    """3 good triples (mixed extensions), a fused image without sources, a size mismatch, a source-only pair."""
    root = tmp_path / "set"
    for i, stem in enumerate(["a01", "a02", "a03"]):
        ir, vi = _img(3 * i), _img(3 * i + 1)
        _save(root / "ir" / f"{stem}.png", ir)
        _save(root / "vi" / f"{stem}.jpg" if stem == "a02" else root / "vi" / f"{stem}.png", vi, "RGB")
        fused = ((ir.astype(np.uint16) + vi) // 2).astype(np.uint8)
        _save(root / "fused" / f"{stem}.png", fused)
    _save(root / "fused" / "orphan.png", _img(20))
    _save(root / "ir" / "big.png", _img(21, (90, 90)))
    _save(root / "vi" / "big.png", _img(22, (90, 90)))
    _save(root / "fused" / "big.png", _img(23))
    _save(root / "ir" / "unfused.png", _img(24))
    _save(root / "vi" / "unfused.png", _img(25))
    return root


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_eval_ivf(ivf_set: Path, tmp_path: Path):
    out = tmp_path / "res" / "results"
    r = _run(["eval", "--fused", str(ivf_set / "fused"), "--ir-dir", str(ivf_set / "ir"),
              "--vis-dir", str(ivf_set / "vi"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    for stem in ("a01", "a02", "a03", "mean"):
        assert stem in r.stdout
    assert "orphan: no A (infrared) file orphan.*" in r.stderr and "no B (visible) file orphan.*" in r.stderr
    assert "big: size mismatch: fused 80x72, A 90x90, B 90x90" in r.stderr
    assert "not fused" in r.stderr and "unfused" in r.stderr

    expected = {}
    for stem in ("a01", "a02", "a03"):
        vi = ivf_set / "vi" / (f"{stem}.jpg" if stem == "a02" else f"{stem}.png")
        expected[stem] = evaluate(read_gray_eval(ivf_set / "fused" / f"{stem}.png"),
                                  read_gray_eval(ivf_set / "ir" / f"{stem}.png"), read_gray_eval(vi))
    mean = {k: float(np.mean([e[k] for e in expected.values()])) for k in METRIC_NAMES}

    with open(out.with_suffix(".csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["image"] for row in rows] == ["a01", "a02", "a03", "mean"]
    for row in rows:
        want = mean if row["image"] == "mean" else expected[row["image"]]
        assert {k: float(row[k]) for k in METRIC_NAMES} == want  # written with repr: exact

    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["mode"] == "ivf" and doc["variant"] == "cddfuse" and doc["count"] == 3
    assert doc["images"] == expected and doc["mean"] == pytest.approx(mean, rel=1e-12)
    assert {s["image"] for s in doc["skipped"]} == {"orphan", "big"}
    assert doc["not_fused"] == ["unfused"]
    assert not list(out.parent.glob(".*"))  # no temporary files left behind


def test_eval_out_suffix_and_crop(ivf_set: Path, tmp_path: Path):
    # -o x.csv writes x.csv and x.json; --crop-sources scores 'big' on the sources' top-left 72x80.
    r = _run(["eval", "--fused", str(ivf_set / "fused"), "--ir-dir", str(ivf_set / "ir"),
              "--vis-dir", str(ivf_set / "vi"), "--crop-sources", "-o", str(tmp_path / "x.csv")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "x.json").read_text())
    assert (tmp_path / "x.csv").exists() and "big" in doc["images"]
    f = read_gray_eval(ivf_set / "fused" / "big.png")
    a = read_gray_eval(ivf_set / "ir" / "big.png")[:72, :80]
    b = read_gray_eval(ivf_set / "vi" / "big.png")[:72, :80]
    assert doc["images"]["big"] == evaluate(f, a, b)


def test_eval_mif_and_variant(tmp_path: Path):
    for stem in ("11", "12"):
        func, mri = _img(int(stem)), _img(int(stem) + 5)
        _save(tmp_path / "PET" / f"{stem}.png", func, "RGB")
        _save(tmp_path / "MRI" / f"{stem}.png", mri)
        _save(tmp_path / "fused" / f"{stem}.png", np.maximum(func, mri))
    r = _run(["eval", "--fused", str(tmp_path / "fused"), "--func-dir", str(tmp_path / "PET"),
              "--mri-dir", str(tmp_path / "MRI"), "--variant", "tang_matlab", "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["mode"] == "mif" and doc["variant"] == "tang_matlab" and doc["count"] == 2
    f, a, b = (read_gray_eval(tmp_path / d / "11.png") for d in ("fused", "PET", "MRI"))
    assert doc["images"]["11"] == evaluate(f, a, b, variant="tang_matlab")


def test_eval_usage_errors(ivf_set: Path):
    d = str(ivf_set / "ir")
    r = CliRunner().invoke(main, ["eval", "--fused", d, "--ir-dir", d, "--mri-dir", d])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(main, ["eval", "--fused", d, "--mode", "mif", "--func-dir", d])
    assert r.exit_code == 2 and "--mri-dir" in r.output
    r = CliRunner().invoke(main, ["eval", "--fused", d, "--ir-dir", d])
    assert r.exit_code == 2 and "--vis-dir" in r.output
    r = CliRunner().invoke(main, ["eval", "--help"])
    assert r.exit_code == 0 and "results.csv and results.json" in " ".join(r.output.split())  # unwrap


def test_eval_nothing_scored_exits_nonzero(tmp_path: Path):
    _save(tmp_path / "fused" / "x.png", _img(1))
    _save(tmp_path / "ir" / "x.png", _img(2, (70, 70)))
    _save(tmp_path / "vi" / "x.png", _img(3, (70, 70)))
    (tmp_path / "fused" / "y.png").write_bytes(b"broken")
    _save(tmp_path / "ir" / "y.png", _img(2))
    _save(tmp_path / "vi" / "y.png", _img(3))
    r = _run(["eval", "--fused", str(tmp_path / "fused"), "--ir-dir", str(tmp_path / "ir"),
              "--vis-dir", str(tmp_path / "vi"), "-o", str(tmp_path / "r")])
    assert r.exit_code == 1
    assert "x: size mismatch" in r.stderr and "y:" in r.stderr and "y.png" in r.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["count"] == 0 and len(doc["skipped"]) == 2


def _two_sets(tmp_path: Path) -> tuple[Path, Path]:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    for i, stem in enumerate(["p", "q", "r"]):
        _save(d1 / f"{stem}.png", _img(i))
        _save(d2 / f"{stem}.png", _img(i))
    return d1, d2


def test_compare_identical(tmp_path: Path):
    d1, d2 = _two_sets(tmp_path)
    r = _run(["compare", str(d1), str(d2), "-o", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["count"] == 3 and doc["worst"] is None and doc["max_abs"] == 0
    for row in doc["images"].values():
        assert row["PSNR"] == "inf" and row["max_abs"] == 0 and row["SSIM"] == 1.0
    assert doc["mean"]["PSNR"] == "inf"
    assert "all images are identical" in r.stdout


def test_compare_perturbed_named_worst(tmp_path: Path):
    d1, d2 = _two_sets(tmp_path)
    q = _img(1)
    q[10:14, 20:30] = 255 - q[10:14, 20:30]
    _save(d2 / "q.png", q)
    r2 = _img(2)
    r2[0, 0] ^= 1  # a one-level change: smaller MSE than q's
    _save(d2 / "r.png", r2)
    _save(d2 / "extra.png", _img(9))
    r = _run(["compare", str(d1), str(d2), "-o", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    assert "worst: q" in r.stdout and "extra: no DIR1 file" in r.stderr
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["worst"] == "q" and doc["count"] == 3
    x, y = _img(1).astype(np.float64), q.astype(np.float64)
    mse = float(np.mean((x - y) ** 2))
    assert doc["images"]["q"]["PSNR"] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-12)
    assert doc["images"]["q"]["max_abs"] == float(np.abs(x - y).max())
    assert doc["images"]["q"]["SSIM"] == structural_similarity(x, y, data_range=255)
    assert doc["images"]["r"]["max_abs"] == 1 and doc["images"]["p"]["PSNR"] == "inf"
    assert doc["max_abs"] == float(np.abs(x - y).max())


def test_compare_nothing_paired(tmp_path: Path):
    _save(tmp_path / "d1" / "a.png", _img(1))
    _save(tmp_path / "d2" / "b.png", _img(1))
    r = _run(["compare", str(tmp_path / "d1"), str(tmp_path / "d2")])
    assert r.exit_code == 1 and "a: no DIR2 file" in r.stderr
