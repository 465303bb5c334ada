"""Summary tables of fusion scores as papers print them: mean ± std per method, best per column marked.

One table, five formats (:data:`FORMATS`): ``text`` (fixed width, for a terminal), ``csv``, ``json``, ``markdown``
and ``latex`` (booktabs). Numbers are rounded to ``decimals`` (papers print 2) except in ``json``, which keeps
full precision. The best value of each column is marked among the rows that compete (:attr:`SummaryRow.ranked`;
a paper's reference row or a difference row does not) when at least two do: bold in markdown and LaTeX, a
trailing ``*`` in text, not at all in csv and json (``json`` lists the winners under ``"best"``). Best means the
highest value, except for the metrics of :data:`LOWER_IS_BETTER` (MSE: an error). Values are compared as
printed, so two methods that agree to the printed digits are both marked, as a reader would see a tie.

Pure Python: importing this module imports neither numpy nor torch.
"""

from __future__ import annotations

import csv
import io as _stringio
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

FORMATS: tuple[str, ...] = ("text", "csv", "json", "markdown", "latex")
# Metrics where a smaller value is better. MSE is the mean squared error against the sources; every other metric
# of the twelve rewards more information, contrast, detail or agreement with the sources.
LOWER_IS_BETTER: frozenset[str] = frozenset({"MSE"})


@dataclass(frozen=True)
class SummaryRow:
    """One line of a summary table: a method's mean (and spread) over ``count`` images.

    ``std`` is None for rows without a spread (a paper's reported numbers); ``ranked=False`` keeps a row out of
    the best-per-column marks (reference and difference rows). Metrics missing from ``mean`` print empty.
    """

    name: str
    mean: Mapping[str, float]
    std: Optional[Mapping[str, float]] = None
    count: Optional[int] = None
    ranked: bool = True


def _rounded(x: float, decimals: int) -> float:
    return x if not math.isfinite(x) else round(x, decimals)


def best_marks(rows: Sequence[SummaryRow], metrics: Sequence[str], decimals: int) -> dict[str, list[str]]:
    """For each metric, the names of the ranked rows holding its best value as printed (empty lists when fewer
    than two rows compete). Higher is better except for :data:`LOWER_IS_BETTER`; NaN never wins."""
    ranked = [r for r in rows if r.ranked]
    out: dict[str, list[str]] = {m: [] for m in metrics}
    if len(ranked) < 2:
        return out
    for m in metrics:
        vals = {r.name: _rounded(float(r.mean[m]), decimals) for r in ranked
                if m in r.mean and not math.isnan(float(r.mean[m]))}
        if not vals:
            continue
        best = min(vals.values()) if m in LOWER_IS_BETTER else max(vals.values())
        out[m] = [name for name, v in vals.items() if v == best]
    return out


def format_number(x: float, decimals: int, infinity: tuple[str, str] = ("inf", "-inf")) -> str:
    """``x`` to ``decimals`` places; NaN as ``nan``, infinities as the format spells them (``infinity``)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return infinity[0] if x > 0 else infinity[1]
    return f"{x:.{decimals}f}"


def _latex_num(x: float, decimals: int) -> str:
    return format_number(x, decimals, ("$\\infty$", "$-\\infty$"))


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """``text`` safe inside a LaTeX table cell."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _markdown_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _legend(metrics: Sequence[str], how: str) -> str:
    lower = [m for m in metrics if m in LOWER_IS_BETTER]
    tail = f"; {', '.join(lower)}: lowest" if lower else ""
    return f"{how}: best per column (highest{tail})"


def format_summary(rows: Sequence[SummaryRow], metrics: Sequence[str], fmt: str = "text", decimals: int = 2,
                   show_std: bool = True) -> str:
    """The table of ``rows`` over ``metrics`` in format ``fmt`` (one of :data:`FORMATS`), ending with a newline.

    ``show_std`` prints ``mean ± std`` cells (text, markdown, latex) or ``<metric>_std`` columns (csv) for the
    rows that have a spread. See the module docstring for rounding and marks.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 12:
        raise ValueError(f"decimals must be an int in 0..12, got {decimals!r}")
    metrics = list(metrics)
    best = best_marks(rows, metrics, decimals)
    if fmt == "json":
        return _json(rows, metrics, best)
    if fmt == "csv":
        return _csv(rows, metrics, decimals, show_std)
    with_count = any(r.count is not None for r in rows)
    marked = any(best[m] for m in metrics)

    def cell(r: SummaryRow, m: str, style: str) -> str:
        if m not in r.mean:
            return ""
        num = _latex_num if style == "latex" else format_number
        text = num(float(r.mean[m]), decimals)
        if r.name in best[m]:
            text = {"text": f"{text}*", "markdown": f"**{text}**", "latex": f"\\textbf{{{text}}}"}[style]
        if show_std and r.std is not None and m in r.std:
            pm = {"text": " ± ", "markdown": " ± ", "latex": " $\\pm$ "}[style]
            text += pm + num(float(r.std[m]), decimals)
        return text

    head = ["method", *(["n"] if with_count else []), *metrics]
    body = [[r.name, *([str(r.count) if r.count is not None else ""] if with_count else []),
             *(cell(r, m, fmt) for m in metrics)] for r in rows]
    if fmt == "text":
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                 for line in [head, *body]]
        if marked:
            lines.append(_legend(metrics, "*"))
        return "\n".join(lines) + "\n"
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
        lines += ["| " + " | ".join([_markdown_escape(line[0]), *line[1:]]) + " |" for line in body]
        if marked:
            lines += ["", _legend(metrics, "Bold")]
        return "\n".join(lines) + "\n"
    # latex (booktabs)
    lines = [f"\\begin{{tabular}}{{l{'r' * (len(head) - 1)}}}", "\\toprule",
             " & ".join(latex_escape(h) for h in head) + " \\\\", "\\midrule"]
    lines += [" & ".join([latex_escape(line[0]), *line[1:]]) + " \\\\" for line in body]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if marked:
        lines.append("% " + _legend(metrics, "bold"))
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[SummaryRow], metrics: list[str], decimals: Optional[int], show_std: bool) -> str:
    """method, count, then each metric and (``show_std``) its std; ``decimals=None`` writes full precision."""
    buf = _stringio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = [c for m in metrics for c in ([m, f"{m}_std"] if show_std else [m])]
    w.writerow(["method", "count", *cols])

    def num(x: float) -> str:
        return repr(float(x)) if decimals is None else format_number(float(x), decimals)

    for r in rows:
        cells = []
        for m in metrics:
            cells.append(num(r.mean[m]) if m in r.mean else "")
            if show_std:
                cells.append(num(r.std[m]) if r.std is not None and m in r.std else "")
        w.writerow([r.name, "" if r.count is None else r.count, *cells])
    return buf.getvalue()


def summary_csv(rows: Sequence[SummaryRow], metrics: Sequence[str]) -> str:
    """The summary as a CSV file in full precision (``repr``; inf as "inf"): method, count, metric, metric_std..."""
    return _csv(rows, list(metrics), None, True)


def jsonable(x: float) -> float | str:
    """Strict JSON has no NaN/Infinity: non-finite numbers are written as the strings "inf", "-inf", "nan"."""
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _json(rows: Sequence[SummaryRow], metrics: list[str], best: dict[str, list[str]]) -> str:
    doc = {
        "metrics": metrics,
        "lower_is_better": sorted(LOWER_IS_BETTER & set(metrics)),
        "rows": [{"method": r.name, "count": r.count, "ranked": r.ranked,
                  "mean": {m: jsonable(float(r.mean[m])) for m in metrics if m in r.mean},
                  "std": None if r.std is None else {m: jsonable(float(r.std[m])) for m in metrics if m in r.std}}
                 for r in rows],
        "best": best,
    }
    return json.dumps(doc, indent=1, allow_nan=False, ensure_ascii=False) + "\n"
