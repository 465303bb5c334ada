"""``ddfm-fast report`` and ``score --html`` / ``--montage`` (``ddfm_fast.report``): one self-contained HTML page.

The page is checked as text (self-contained: every image a ``data:`` URI, nothing fetched; the table's numbers
and marks) and opened in a real headless browser: Debian's Chromium driven by Playwright, as tests/test_serve.py
does (Playwright's own browser download is not used). The browser test skips, saying what is missing, when
Playwright or Chromium is absent. Inputs are small synthetic folders (three 72x80 triples, two "methods"), and a
score run of EM only on two 96x96 MSRS crops, so nothing here needs a model.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from browser import chromium  # noqa: E402 (tests/browser.py)
from ddfm_fast import io
from ddfm_fast.cli_eval import eval_command
from ddfm_fast.cli_report import report_command
from ddfm_fast.cli_score import score_command
from ddfm_fast.report import PLOT_MISSING, build_html, load_results



@click.group()
def cli() -> None:
    """A local group holding the commands under test (cli.py registers them itself)."""


for _command in (eval_command, report_command, score_command):
    cli.add_command(_command)


def run(args: list) -> "click.testing.Result":
    return CliRunner().invoke(cli, [str(a) for a in args])


def _img(seed: int, shape=(72, 80)) -> np.ndarray:
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = (x * (2 + seed) + y * (3 + 2 * seed)) % 256
    return np.clip(base + np.random.default_rng(seed).integers(0, 40, shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """eval's results.json over two methods (average and maximum fusion) of three synthetic pairs."""
    root = tmp_path_factory.mktemp("report")
    for k, stem in enumerate(["a01", "a02", "a03"]):
        ir, vi = _img(2 * k), _img(2 * k + 1)
        io.save_png(ir, root / "ir" / f"{stem}.png")
        io.save_png(vi, root / "vi" / f"{stem}.png")
        io.save_png(((ir.astype(np.uint16) + vi) // 2).astype(np.uint8), root / "avg" / f"{stem}.png")
        io.save_png(np.maximum(ir, vi), root / "max" / f"{stem}.png")
    res = run(["eval", "--fused", f"average={root / 'avg'}", "--fused", f"maximum={root / 'max'}",
               "--ir-dir", root / "ir", "--vis-dir", root / "vi", "-o", root / "results"])
    assert res.exit_code == 0, res.output
    return root / "results.json"


def _data_uris(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def test_page_is_self_contained_with_table_montages_and_plot(results: Path, tmp_path: Path):
    pytest.importorskip("matplotlib", reason="the report extra (matplotlib) draws the plot")
    dest = tmp_path / "r.html"
    res = run(["report", results, "-o", dest])
    assert res.exit_code == 0, res.output
    page = dest.read_text()
    srcs = _data_uris(page)
    assert len(srcs) == 3 + 1  # a montage per pair and the plot
    assert all(s.startswith("data:image/") for s in srcs)
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    doc = json.loads(results.read_text())
    # The summary table: both methods, their means as printed (2 decimals), the best in <strong>.
    table = page.split('<table id="summary">', 1)[1].split("</table>", 1)[0]
    for name, m in doc["methods"].items():
        assert f"<th>{name}</th><td>3</td>" in table
    for metric, winners in doc["best"].items():
        for name in winners:
            assert f"<strong>{doc['methods'][name]['mean'][metric]:.2f}</strong>" in table
    assert "MSE ↓" in table and PLOT_MISSING not in page


def test_page_without_matplotlib_says_so(results: Path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ImportError
    page = build_html(load_results(results))
    assert f'<p id="plot-missing">{PLOT_MISSING.replace(chr(39), "&#x27;")}</p>' in page
    assert len(_data_uris(page)) == 3  # the montages are still there


def test_report_errors(tmp_path: Path):
    res = run(["report", tmp_path, "-o", tmp_path / "x.html"])
    assert res.exit_code == 1 and "scores.json: no such file" in res.output
    (tmp_path / "bad.json").write_text("{")
    res = run(["report", tmp_path / "bad.json", "-o", tmp_path / "x.html"])
    assert res.exit_code == 1 and "cannot be read as JSON" in res.output
    (tmp_path / "other.json").write_text('{"a": 1}')
    res = run(["report", tmp_path / "other.json", "-o", tmp_path / "x.html"])
    assert res.exit_code == 1 and "neither an eval results file" in res.output
    assert not (tmp_path / "x.html").exists()


def test_score_html_and_montage(tmp_path: Path, data_dir: Path):
    ds = tmp_path / "MSRS"
    for stem in ("00004N", "00055D"):
        for role in ("ir", "vi"):
            (ds / role).mkdir(parents=True, exist_ok=True)
            Image.open(data_dir / "ivf/MSRS" / role / f"{stem}.png").crop((200, 150, 296, 246)).save(
                ds / role / f"{stem}.png")
    out = tmp_path / "out"
    res = run(["score", ds, "-o", out, "--prior", "none", "--steps", "3", "--no-progress-bar", "--html", "--montage"])
    assert res.exit_code == 0, res.output
    page = (out / "report.html").read_text()
    assert "ddfm-fast score: MSRS" in page and "not the paper&#x27;s protocol" in page
    assert "<th>paper: MSRS</th>" in page  # the paper's row under the run's
    assert len([s for s in _data_uris(page) if s.startswith("data:image/jpeg")]) == 2  # one montage per pair
    grid = Image.open(out / "montage.png")
    assert grid.height > 2 * 160  # two labelled rows of 160 px panels under a title
    assert f"montage: {out / 'montage.png'}" in res.output and f"report: {out / 'report.html'}" in res.output


# --------------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def test_report_renders_in_chromium(browser, results: Path, tmp_path: Path):
    dest = tmp_path / "r.html"
    res = run(["report", results, "-o", dest])
    assert res.exit_code == 0, res.output
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(dest.as_uri())
        page.wait_for_load_state("load")
        # The table: a header row and one row per method, with the numbers as written.
        rows = page.eval_on_selector_all("#summary tbody tr", "rs => rs.map(r => r.innerText)")
        assert len(rows) == 2 and rows[0].startswith("average") and rows[1].startswith("maximum")
        assert page.eval_on_selector_all("#summary strong", "s => s.length") >= 12  # a winner per column
        # Every image decoded and laid out: complete, a natural size, visible on the page.
        images = page.eval_on_selector_all(
            "img", "is => is.map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])")
        assert len(images) >= 3
        for complete, w, h, shown in images:
            assert complete and w > 100 and h > 50 and shown > 0
        has_plot = page.eval_on_selector_all("#plot img", "is => is.length") == 1
        assert has_plot or page.inner_text("#plot-missing").startswith("The plot of the metrics per image needs")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        assert Image.open(tmp_path / "report.png").height > 900  # the page is longer than one screen
    finally:
        page.close()


def _loaded_after(imports: str) -> list[str]:
    import subprocess

    code = f"import sys; {imports}; print(','.join(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def test_eval_and_report_modules_import_without_torch():
    """`eval`, `compare`, `report` and `score --help` load these modules: none may pull in torch (or matplotlib)
    when imported, so their help and the scoring of folders start at once."""
    mods = ["ddfm_fast.tables", "ddfm_fast.montage", "ddfm_fast.report", "ddfm_fast.evaluation", "ddfm_fast.scoring",
            "ddfm_fast.progress", "ddfm_fast.cli_report"]
    assert _loaded_after(f"import {', '.join(mods)}") == []
    # The eval and score commands also import the shared option module (ddfm_fast.cli_options) and fuse's
    # command module: they may add nothing heavy beyond what those two load themselves.
    base = _loaded_after("import ddfm_fast.cli_options, ddfm_fast.cli_fuse")
    assert _loaded_after("import ddfm_fast.cli_eval, ddfm_fast.cli_score, ddfm_fast.cli_report") == base
