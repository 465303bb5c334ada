"""``ddfm_fast.tables``: summary tables with the best value per column marked, in five formats."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ddfm_fast.tables import FORMATS, SummaryRow, best_marks, format_summary, latex_escape, summary_csv

ROWS = [
    SummaryRow("A", {"EN": 6.884, "MSE": 410.0, "SSIM": 0.9412}, {"EN": 0.1, "MSE": 20.0, "SSIM": 0.01}, count=3),
    SummaryRow("B_2", {"EN": 6.876, "MSE": 395.5, "SSIM": 0.9398}, {"EN": 0.2, "MSE": 30.0, "SSIM": 0.02}, count=3),
    SummaryRow("paper", {"EN": 7.5, "SSIM": 0.99}, ranked=False),
]
METRICS = ["EN", "MSE", "SSIM"]


def test_best_is_highest_but_lowest_for_mse_and_ties_at_printed_precision():
    # 6.884 and 6.876 both print as 6.88 at 2 decimals: a reader sees a tie, so both are marked; at 3 decimals
    # A wins. MSE: lower is better. The paper's row (not ranked) never wins, though its EN is highest.
    assert best_marks(ROWS, METRICS, 2) == {"EN": ["A", "B_2"], "MSE": ["B_2"], "SSIM": ["A", "B_2"]}
    assert best_marks(ROWS, METRICS, 3) == {"EN": ["A"], "MSE": ["B_2"], "SSIM": ["A"]}
    assert best_marks(ROWS[:1], METRICS, 2) == {m: [] for m in METRICS}  # one method: nothing to mark
    nan = SummaryRow("C", {"EN": math.nan, "MSE": 1.0, "SSIM": 0.0})
    assert best_marks([ROWS[0], nan], ["EN"], 2) == {"EN": ["A"]}


def test_markdown_and_latex_cells():
    md = format_summary(ROWS, METRICS, "markdown", 3)
    lines = md.splitlines()
    assert lines[0] == "| method | n | EN | MSE | SSIM |"
    assert lines[2] == "| A | 3 | **6.884** ± 0.100 | 410.000 ± 20.000 | **0.941** ± 0.010 |"
    assert lines[3] == "| B_2 | 3 | 6.876 ± 0.200 | **395.500** ± 30.000 | 0.940 ± 0.020 |"
    assert lines[4] == "| paper |  | 7.500 |  | 0.990 |"
    assert lines[-1] == "Bold: best per column (highest; MSE: lowest)"
    tex = format_summary(ROWS, METRICS, "latex", 2, show_std=False)
    assert "B\\_2 & 3 & \\textbf{6.88} & \\textbf{395.50} & \\textbf{0.94} \\\\" in tex.splitlines()
    assert tex.splitlines()[0] == "\\begin{tabular}{lrrrr}" and "\\bottomrule" in tex
    assert latex_escape("a_b&c%") == "a\\_b\\&c\\%"


def test_text_csv_json():
    text = format_summary(ROWS, METRICS, "text", 2)
    assert "6.88* ± 0.10" in text and text.splitlines()[-1].startswith("*: best per column")
    rows = list(csv.DictReader(io.StringIO(format_summary(ROWS, METRICS, "csv", 1))))
    assert rows[0] == {"method": "A", "count": "3", "EN": "6.9", "EN_std": "0.1", "MSE": "410.0", "MSE_std": "20.0",
                       "SSIM": "0.9", "SSIM_std": "0.0"}
    full = list(csv.DictReader(io.StringIO(summary_csv(ROWS, METRICS))))
    assert float(full[1]["EN"]) == 6.876 and full[2]["MSE"] == "" and full[2]["EN_std"] == ""
    doc = json.loads(format_summary(ROWS, METRICS, "json", 2))
    assert doc["rows"][0]["mean"]["EN"] == 6.884 and doc["best"]["MSE"] == ["B_2"]
    assert doc["lower_is_better"] == ["MSE"]
    inf = SummaryRow("same", {"EN": 1.0, "MSE": 0.0, "SSIM": math.inf})
    assert json.loads(format_summary([inf], METRICS, "json"))["rows"][0]["mean"]["SSIM"] == "inf"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown table format 'html'"):
        format_summary(ROWS, METRICS, "html")
    with pytest.raises(ValueError, match="decimals"):
        format_summary(ROWS, METRICS, "text", -1)
    assert set(FORMATS) == {"text", "csv", "json", "markdown", "latex"}


def test_pure_python_import():
    """The table module is on the --help path of eval: loading it must not pull in numpy or torch. It is loaded
    from its file, so that what is measured is this module, not the package's ``__init__``."""
    path = Path(__file__).resolve().parents[1] / "ddfm_fast" / "tables.py"
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('tables', {str(path)!r}); "
            "m = sys.modules['tables'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
