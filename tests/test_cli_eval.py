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
              "--vis-dir", str(ivf_set / "vi"), "-o", str(out), "--per-image"])
    assert r.exit_code == 0, r.output
    for stem in ("a01", "a02", "a03"):
        assert stem in r.stdout
    assert "orphan: no A (infrared) file orphan.*" in r.stderr and "no B (visible) file orphan.*" in r.stderr
    assert "big: size mismatch: fused 80x72, A 90x90, B 90x90" in r.stderr
    assert "not fused" in r.stderr and "unfused" in r.stderr
    assert "docs/METRICS.md" in r.stderr

    expected = {}
    for stem in ("a01", "a02", "a03"):
        vi = ivf_set / "vi" / (f"{stem}.jpg" if stem == "a02" else f"{stem}.png")
        expected[stem] = evaluate(read_gray_eval(ivf_set / "fused" / f"{stem}.png"),
                                  read_gray_eval(ivf_set / "ir" / f"{stem}.png"), read_gray_eval(vi))
    mean = {k: float(np.mean([e[k] for e in expected.values()])) for k in METRIC_NAMES}
    std = {k: float(np.std([e[k] for e in expected.values()])) for k in METRIC_NAMES}

    # The printed summary: one line for the one method (named after its folder), mean ± std with 2 decimals.
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("fused "))
    assert line.split()[1] == "3" and f"{mean['EN']:.2f} ± {std['EN']:.2f}" in line
    assert "*" not in line  # nothing to mark with one method

    # Per-image CSV: images only, no summary row mixed in.
    with open(out.with_suffix(".csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(row["method"], row["image"]) for row in rows] == [("fused", "a01"), ("fused", "a02"), ("fused", "a03")]
    for row in rows:
        assert {k: float(row[k]) for k in METRIC_NAMES} == expected[row["image"]]  # written with repr: exact
    # The summary CSV: mean and std per metric, full precision.
    with open(out.with_name("results_summary.csv"), newline="") as fh:
        (summary,) = list(csv.DictReader(fh))
    assert summary["method"] == "fused" and summary["count"] == "3"
    assert {k: float(summary[k]) for k in METRIC_NAMES} == mean
    assert {k: float(summary[f"{k}_std"]) for k in METRIC_NAMES} == std

    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["mode"] == "ivf" and doc["variant"] == "cddfuse" and doc["guide"] == "docs/METRICS.md"
    m = doc["methods"]["fused"]
    assert m["count"] == 3 and m["images"] == expected and m["mean"] == pytest.approx(mean, rel=1e-12)
    assert m["std"] == pytest.approx(std, rel=1e-12, abs=1e-12)
    assert {s["image"] for s in m["skipped"]} == {"orphan", "big"}
    assert m["not_fused"] == ["unfused"]
    assert not list(out.parent.glob(".*"))  # no temporary files left behind


def _method_dirs(ivf_set: Path) -> dict[str, Path]:
    """Two more 'methods' over the fixture's sources: the pixel-wise max and the infrared image itself."""
    dirs = {"avg": ivf_set / "fused", "max": ivf_set / "max", "ir_only": ivf_set / "ir_only"}
    for stem in ("a01", "a02", "a03"):
        ir = np.asarray(Image.open(ivf_set / "ir" / f"{stem}.png"))
        vi_path = ivf_set / "vi" / (f"{stem}.jpg" if stem == "a02" else f"{stem}.png")
        vi = read_gray_eval(vi_path).astype(np.uint8)
        _save(dirs["max"] / f"{stem}.png", np.maximum(ir, vi))
        _save(dirs["ir_only"] / f"{stem}.png", ir)
    return dirs


def _bold_columns(markdown: str, method: str) -> list[str]:
    """The metric columns in which ``method``'s markdown row is bold."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:] if ln.startswith(f"| {method} "))
    return [h for h, c in zip(head, row) if c.startswith("**")]


def test_eval_many_methods_markdown_best_marked(ivf_set: Path, tmp_path: Path):
    dirs = _method_dirs(ivf_set)
    out = tmp_path / "cmp"
    args = ["eval", "--fused", f"avg={dirs['avg']}", "--fused", f"max={dirs['max']}", "--fused", str(dirs["ir_only"]),
            "--ir-dir", str(ivf_set / "ir"), "--vis-dir", str(ivf_set / "vi"), "--format", "markdown",
            "--decimals", "3", "-o", str(out)]
    r = _run(args)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.with_suffix(".json").read_text())
    assert list(doc["methods"]) == ["avg", "max", "ir_only"]  # a bare folder is named after it
    means = {name: m["mean"] for name, m in doc["methods"].items()}
    # The expected winners, from the JSON's full-precision means rounded as printed (3 decimals); MSE is an error,
    # so the lowest wins there, the highest everywhere else. (PSNR stays finite: its MSE is taken against both A
    # and B, which no method here matches at once.)
    for name in means:
        want = []
        for k in METRIC_NAMES:
            vals = {n: round(float(means[n][k]), 3) for n in means}
            best = min(vals.values()) if k == "MSE" else max(vals.values())
            if vals[name] == best:
                want.append(k)
        assert _bold_columns(r.stdout, name) == want, name
    assert doc["best"]["MSE"] == [min(means, key=lambda n: means[n]["MSE"])]
    assert "Bold: best per column (highest; MSE: lowest)" in r.stdout
    # The markdown table is also written beside the CSVs, exactly as printed.
    assert out.with_name("cmp_summary.md").read_text() == r.stdout
    with open(out.with_suffix(".csv"), newline="") as fh:
        per_image = list(csv.DictReader(fh))
    assert [row["method"] for row in per_image] == ["avg"] * 3 + ["max"] * 3 + ["ir_only"] * 3
    assert "mean" not in {row["image"] for row in per_image}

    # LaTeX: booktabs, bold as \textbf, the spread as $\pm$, names escaped.
    r = _run([*args[:-6], "--ir-dir", str(ivf_set / "ir"), "--vis-dir", str(ivf_set / "vi"), "--format", "latex",
              "--metrics", "en,MSE", "--no-std"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "\\begin{tabular}{lrrr}" and "method & n & EN & MSE \\\\" in lines
    assert any(ln.startswith("ir\\_only & 3 & ") for ln in lines) and "$\\pm$" not in r.stdout
    assert r.stdout.count("\\textbf{") == 2  # one winner per column: these three do not tie on EN or MSE

    # JSON on stdout: full precision, the same means.
    r = _run([*args[:-6], "--ir-dir", str(ivf_set / "ir"), "--vis-dir", str(ivf_set / "vi"), "--format", "json"])
    table = json.loads(r.stdout)
    assert [row["method"] for row in table["rows"]] == ["avg", "max", "ir_only"]
    assert table["rows"][1]["mean"] == doc["methods"]["max"]["mean"]


def test_eval_fused_spec_errors(ivf_set: Path, tmp_path: Path):
    src = ["--ir-dir", str(ivf_set / "ir"), "--vis-dir", str(ivf_set / "vi")]
    cases = [
        (["--fused", str(ivf_set / "fused"), "--fused", f"fused={ivf_set / 'ir'}"], "two methods are named 'fused'"),
        (["--fused", f"=({ivf_set / 'fused'})"], "the name before '=' is empty"),
        (["--fused", f"x={tmp_path / 'nope'}"], "no such folder"),
        (["--fused", str(tmp_path / "nope")], "no such folder"),
        (["--fused", str(ivf_set / "fused"), "--metrics", "EN,FOO"], "unknown metric(s) FOO"),
    ]
    for extra, message in cases:
        r = CliRunner().invoke(main, ["eval", *extra, *src])
        assert r.exit_code == 2 and message in " ".join(r.output.split()), (extra, r.output)


def test_eval_out_suffix_and_crop(ivf_set: Path, tmp_path: Path):
    # -o x.csv writes x.csv and x.json; --crop-sources scores 'big' on the sources' top-left 72x80.
    r = _run(["eval", "--fused", str(ivf_set / "fused"), "--ir-dir", str(ivf_set / "ir"),
              "--vis-dir", str(ivf_set / "vi"), "--crop-sources", "-o", str(tmp_path / "x.csv")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "x.json").read_text())["methods"]["fused"]
    assert (tmp_path / "x.csv").exists() and (tmp_path / "x_summary.csv").exists() and "big" in doc["images"]
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
    assert doc["mode"] == "mif" and doc["variant"] == "tang_matlab" and doc["methods"]["fused"]["count"] == 2
    f, a, b = (read_gray_eval(tmp_path / d / "11.png") for d in ("fused", "PET", "MRI"))
    assert doc["methods"]["fused"]["images"]["11"] == evaluate(f, a, b, variant="tang_matlab")


def test_eval_usage_errors(ivf_set: Path):
    d = str(ivf_set / "ir")
    r = CliRunner().invoke(main, ["eval", "--fused", d, "--ir-dir", d, "--mri-dir", d])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(main, ["eval", "--fused", d, "--mode", "mif", "--func-dir", d])
    assert r.exit_code == 2 and "--mri-dir" in r.output
    r = CliRunner().invoke(main, ["eval", "--fused", d, "--ir-dir", d])
    assert r.exit_code == 2 and "--vis-dir" in r.output
    r = CliRunner().invoke(main, ["eval", "--help"])
    text = " ".join(r.output.split())  # unwrap
    assert r.exit_code == 0 and "results.csv, results_summary.csv and results.json" in text
    assert "docs/METRICS.md" in text


def test_eval_nothing_scored_exits_nonzero(tmp_path: Path):
    _save(tmp_path / "fused" / "x.png", _img(1))
    _save(tmp_path / "ir" / "x.png", _img(2, (70, 70)))
    _save(tmp_path / "vi" / "x.png", _img(3, (70, 70)))
    (tmp_path / "fused" / "y.png").write_bytes(b"broken")
    _save(tmp_path / "ir" / "y.png", _img(2))
    _save(tmp_path / "vi" / "y.png", _img(3))
    (tmp_path / "r.json").write_text('{"earlier": "results"}')  # a good result of an earlier run stays
    r = _run(["eval", "--fused", str(tmp_path / "fused"), "--ir-dir", str(tmp_path / "ir"),
              "--vis-dir", str(tmp_path / "vi"), "-o", str(tmp_path / "r")])
    assert r.exit_code == 1
    assert "x: size mismatch" in r.stderr and "y:" in r.stderr and "y.png" in r.stderr
    assert "nothing written" in r.stderr
    assert json.loads((tmp_path / "r.json").read_text()) == {"earlier": "results"}
    assert not (tmp_path / "r.csv").exists() and not (tmp_path / "r_summary.csv").exists()


def test_eval_results_are_written_as_one_set(tmp_path: Path, monkeypatch):
    """A failure writing any of the result files (a full disk) changes none of them, and names the file."""
    import errno

    fused, ir, vi = tmp_path / "fused", tmp_path / "ir", tmp_path / "vi"
    for d, seed in ((fused, 1), (ir, 2), (vi, 3)):
        _save(d / "x.png", _img(seed))
    for name in ("r.csv", "r_summary.csv", "r.json"):
        (tmp_path / name).write_text("earlier")
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.name.startswith(".r.") and self.name.endswith(".json.part"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    r = _run(["eval", "--fused", str(fused), "--ir-dir", str(ir), "--vis-dir", str(vi), "-o", str(tmp_path / "r")])
    assert r.exit_code == 1 and "r.json: No space left on device" in r.stderr, r.stderr
    for name in ("r.csv", "r_summary.csv", "r.json"):
        assert (tmp_path / name).read_text() == "earlier", name
    assert not list(tmp_path.glob(".*.part"))


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


@pytest.mark.parametrize("command", ["eval", "compare", "score"])
def test_an_output_that_cannot_be_written_fails_before_any_work(ivf_set: Path, tmp_path: Path, command: str):
    """-o under a regular file: one line naming the option and the path, exit 1, nothing computed or written."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = {
        "eval": ["eval", "--fused", str(ivf_set / "fused"), "--ir-dir", str(ivf_set / "ir"), "--vis-dir",
                 str(ivf_set / "vi"), "-o", str(blocker / "res")],
        "compare": ["compare", str(ivf_set / "fused"), str(ivf_set / "fused"), "-o", str(blocker / "x.json")],
        "score": ["score", str(ivf_set), "-o", str(blocker / "sc"), "--prior", "none", "--steps", "2"],
    }[command]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "-o/--out" in lines[0] and "is a file, not a folder" in lines[0], res.output
    assert blocker.read_text() == "not a folder"
