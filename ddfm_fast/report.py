"""One self-contained HTML page of an evaluation: the summary table, montages of the pairs, a plot per image.

Input is what ``ddfm-fast eval -o`` writes (``results.json``: one or several methods) or what ``ddfm-fast score``
writes (``scores.json``: one run, with the paper's row and what was compared); :func:`load_results` reads either
into :class:`ReportData`. :func:`build_html` makes the page: every image is inlined as a base64 ``data:`` URI,
the style sheet is in the page, and nothing is fetched when it is opened, so the one file can be mailed or
archived as it is.

* The summary table: mean ± std per method, the best value of each column in bold (the highest; for MSE the
  lowest, :data:`ddfm_fast.tables.LOWER_IS_BETTER`), the paper's row below when there is one.
* Montages (:mod:`ddfm_fast.montage`) of the first ``max_pairs`` pairs: A | B | each method's fusion, labelled.
* A plot of the metrics per image, one panel per metric and one line per method, drawn with matplotlib (the
  optional ``report`` extra). Without matplotlib the page is still written and says in its place that the plot
  needs it.
* Every image's numbers in a table at the end.
"""

from __future__ import annotations

import base64
import html
import io as _bytesio
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ddfm_fast.tables import LOWER_IS_BETTER, SummaryRow, best_marks, format_number

PAPER_SIX = ("EN", "SD", "MI", "VIF", "Qabf", "SSIM")
MAX_PAIRS = 12  # montages on one page: each is a few hundred kB of inlined JPEG
PLOT_MISSING = ("The plot of the metrics per image needs matplotlib, which is not installed "
                "(pip install 'ddfm-fast[report]'); the rest of this page does not.")


class ReportError(ValueError):
    """The results file cannot be turned into a report; the message names it and the problem."""


@dataclass
class ReportMethod:
    """One method of the page: its fused images' folder and its per-image rows (stem -> metric -> value)."""

    name: str
    folder: Path
    rows: dict[str, dict[str, float]]
    mean: dict[str, float]
    std: dict[str, float]

    def summary_row(self) -> SummaryRow:
        return SummaryRow(self.name, self.mean, self.std, count=len(self.rows))


@dataclass
class ReportData:
    """Everything the page shows."""

    title: str
    mode: str
    variant: str
    a_dir: Path
    b_dir: Path
    methods: list[ReportMethod]
    metrics: list[str]
    notes: list[str] = field(default_factory=list)  # lines said under the title (what was compared, ...)
    paper: Optional[SummaryRow] = None  # the paper's reported row (score), not ranked
    source: Optional[Path] = None  # the results file


def _number(v: Any) -> float:
    """A JSON number, or the strings "inf" / "-inf" / "nan" that strict JSON uses for non-finite ones."""
    return float(v)


def _rows(doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {stem: {k: _number(v) for k, v in r.items()} for stem, r in doc.items()}


def load_results(path: str | Path) -> ReportData:
    """An eval ``results.json``, a score ``scores.json``, or a score output folder (its ``scores.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "scores.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file (give eval's results.json, or score's output folder or "
                          "scores.json)") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot be read as JSON ({exc})") from None
    try:
        if isinstance(doc, dict) and "methods" in doc:
            data = from_eval_doc(doc)
        elif isinstance(doc, dict) and "dataset" in doc and "images" in doc:
            data = from_scores_doc(doc)
        else:
            raise ReportError(f"{path}: neither an eval results file (no 'methods') nor a score result "
                              "(no 'dataset')")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a field of the wrong JSON type
        if isinstance(exc, ReportError):
            raise
        raise ReportError(f"{path}: not a results file of this version of ddfm-fast ({type(exc).__name__}: "
                          f"{exc})") from None
    data.source = path
    return data


def from_eval_doc(doc: Mapping[str, Any]) -> ReportData:
    """:class:`ReportData` of ``ddfm-fast eval``'s JSON (``evaluation.methods_doc``)."""
    methods = [ReportMethod(name, Path(m["folder"]), _rows(m["images"]),
                            {k: _number(v) for k, v in m["mean"].items()},
                            {k: _number(v) for k, v in m["std"].items()})
               for name, m in doc["methods"].items()]
    names = ", ".join(m.name for m in methods)
    return ReportData(title=f"Fusion metrics: {names}", mode=doc["mode"], variant=doc["variant"],
                      a_dir=Path(doc["folders"]["A"]), b_dir=Path(doc["folders"]["B"]), methods=methods,
                      metrics=list(doc["metrics"]))


def from_scores_doc(doc: Mapping[str, Any]) -> ReportData:
    """:class:`ReportData` of ``ddfm-fast score``'s JSON (``scoring.scores_json``): one method, named after its
    prior and steps, the paper's row, and what was compared."""
    from ddfm_fast.montage import method_label

    compared = doc.get("compared") or {}
    prior = compared.get("prior")
    name = method_label("none" if prior == "none" else "diffusion", prior, compared.get("steps")) if compared \
        else "fused"
    method = ReportMethod(name, Path(doc["folders"]["fused"]), _rows(doc["images"]),
                          {k: _number(v) for k, v in doc["mean"].items()},
                          {k: _number(v) for k, v in (doc.get("std") or {}).items()})
    paper = None
    if doc.get("paper"):
        paper = SummaryRow(f"paper: {doc.get('paper_row') or doc['dataset']}",
                           {k: _number(v) for k, v in doc["paper"].items()}, ranked=False)
    notes = []
    if compared:
        from ddfm_fast.scoring import Comparison

        notes = Comparison(dataset=compared["dataset"], pairs=compared["pairs"],
                           folder_pairs=compared["folder_pairs"], sizes=tuple(compared["sizes"]),
                           steps=compared["steps"], prior=compared["prior"], size_policy=compared["size_policy"],
                           paper_row=compared["paper_row"], differences=tuple(compared["differences"])).lines()
    return ReportData(title=f"ddfm-fast score: {doc['dataset']}", mode=doc["mode"], variant=doc["variant"],
                      a_dir=Path(doc["folders"]["A"]), b_dir=Path(doc["folders"]["B"]), methods=[method],
                      metrics=list(doc["metrics"]), notes=notes, paper=paper)


# --------------------------------------------------------------------------------------------------- pieces


def _data_uri(img: Any, fmt: str = "JPEG") -> str:
    buf = _bytesio.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG", optimize=True)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(x: float, decimals: int) -> str:
    return format_number(x, decimals, ("∞", "−∞"))


def summary_table_html(rows: Sequence[SummaryRow], metrics: Sequence[str], decimals: int) -> str:
    """The summary as an HTML table (``id="summary"``): mean ± std, best per column in ``<strong>``."""
    best = best_marks(rows, metrics, decimals)
    head = "".join(f"<th>{html.escape(m)}{' ↓' if m in LOWER_IS_BETTER else ''}</th>" for m in metrics)
    out = [f'<table id="summary"><thead><tr><th>method</th><th>n</th>{head}</tr></thead><tbody>']
    for r in rows:
        cells = []
        for m in metrics:
            if m not in r.mean:
                cells.append("<td></td>")
                continue
            text = _fmt(float(r.mean[m]), decimals)
            if r.name in best[m]:
                text = f"<strong>{text}</strong>"
            if r.std is not None and m in r.std:
                text += f' <span class="std">± {_fmt(float(r.std[m]), decimals)}</span>'
            cells.append(f"<td>{text}</td>")
        cls = "" if r.ranked else ' class="reference"'
        count = "" if r.count is None else str(r.count)
        out.append(f"<tr{cls}><th>{html.escape(r.name)}</th><td>{count}</td>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _common_stems(methods: Sequence[ReportMethod]) -> list[str]:
    stems = set(methods[0].rows)
    for m in methods[1:]:
        stems &= set(m.rows)
    return sorted(stems)


def find_image(folder: Path, stem: str) -> Optional[Path]:
    """The image file of ``stem`` in ``folder`` (any suffix ddfm-fast reads, or a raw ``.npy``), or None."""
    from ddfm_fast.io import IMAGE_SUFFIXES

    for p in sorted(folder.glob(f"{stem}.*")):
        if p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy") and not p.name.startswith("."):
            return p
    return None


def montage_figures(data: ReportData, max_pairs: int, height: int = 192) -> tuple[list[str], list[str]]:
    """``<figure>`` elements with inlined montages of the first ``max_pairs`` pairs every method scored, and
    the pairs that could not be shown (with why)."""
    from ddfm_fast.io import ImageReadError
    from ddfm_fast.montage import montage_row
    from ddfm_fast.pairing import roles

    r = roles(data.mode)
    figures, missing = [], []
    for stem in _common_stems(data.methods)[:max_pairs]:
        files = [find_image(data.a_dir, stem), find_image(data.b_dir, stem),
                 *(find_image(m.folder, stem) for m in data.methods)]
        if any(f is None for f in files):
            missing.append(f"{stem}: an image file is no longer there")
            continue
        labels = [f"A, {r.ir_name}: {files[0].name}", f"B, {r.vis_name}: {files[1].name}",  # type: ignore[union-attr]
                  *(f"{m.name}" for m in data.methods)]
        try:
            pic = montage_row(list(zip(files, labels)), height=height)  # type: ignore[arg-type]
        except (ImageReadError, ValueError, OSError) as exc:
            missing.append(f"{stem}: {exc}")
            continue
        caption = "; ".join(f"{html.escape(m.name)}: " + ", ".join(
            f"{k} {_fmt(m.rows[stem][k], 2)}" for k in PAPER_SIX if k in m.rows[stem]) for m in data.methods)
        figures.append(f'<figure class="montage"><img alt="{html.escape(stem)}: sources and fusion" '
                       f'src="{_data_uri(pic)}"><figcaption><b>{html.escape(stem)}</b>: {caption}</figcaption>'
                       "</figure>")
    return figures, missing


def metrics_plot(data: ReportData, metrics: Sequence[str]) -> Optional[str]:
    """A PNG data URI of the metrics per image (one panel per metric, one line per method), or None when
    matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    stems = sorted({s for m in data.methods for s in m.rows})
    cols = 3 if len(metrics) > 4 else len(metrics)
    nrows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.6 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    x = list(range(len(stems)))
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, cols, k + 1)
        for m in data.methods:
            ys = [m.rows[s][metric] if s in m.rows else math.nan for s in stems]
            ax.plot(x, ys, marker="o", markersize=3, linewidth=1, label=m.name)
        ax.set_title(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=10)
        ax.set_xticks(x if len(x) <= 12 else x[:: max(1, len(x) // 12)])
        ax.set_xticklabels([stems[i] for i in ax.get_xticks().astype(int)], rotation=45, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3)
    if len(data.methods) > 1:
        fig.axes[0].legend(fontsize=8)
    buf = _bytesio.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _per_image_table(data: ReportData, decimals: int) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in data.metrics)
    out = [f'<table id="per-image"><thead><tr><th>method</th><th>image</th>{head}</tr></thead><tbody>']
    for m in data.methods:
        for stem, row in m.rows.items():
            cells = "".join(f"<td>{_fmt(row[k], decimals)}</td>" for k in data.metrics)
            out.append(f"<tr><td>{html.escape(m.name)}</td><td>{html.escape(stem)}</td>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 0.5em 0; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.reference { color: #555; font-style: italic; }
.std { color: #777; font-size: 0.85em; }
figure.montage { margin: 1em 0; } figure.montage img { max-width: 100%; display: block; }
figcaption { font-size: 0.85em; color: #444; margin-top: 0.3em; }
#plot img { max-width: 100%; } .note { color: #444; } .missing { color: #a40; }
details table { font-size: 0.85em; }
"""


def build_html(data: ReportData, *, metrics: Optional[Sequence[str]] = None, decimals: int = 2,
               max_pairs: int = MAX_PAIRS, plot: bool = True) -> str:
    """The whole page as one string (see the module docstring). ``metrics`` are the summary's columns (default:
    all of the results'); the plot shows the paper's six metrics and MSE where the results have them."""
    shown = list(metrics or data.metrics)
    rows = [m.summary_row() for m in data.methods if m.rows]
    if data.paper is not None:
        rows.append(data.paper)
    parts = [f"<h1>{html.escape(data.title)}</h1>"]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    src = f" from {html.escape(str(data.source))}" if data.source else ""
    parts.append(f'<p class="note">Made by ddfm-fast{src} on {when}. Mode {html.escape(data.mode)} (A = '
                 f"{html.escape(str(data.a_dir))}, B = {html.escape(str(data.b_dir))}); metric definitions "
                 f"{html.escape(data.variant)}. What each metric rewards, and why SSIM (a sum of two SSIMs) can "
                 "exceed 1: docs/METRICS.md in the ddfm-fast repository.</p>")
    parts += [f'<p class="note compared">{html.escape(line)}</p>' for line in data.notes]
    parts.append("<h2>Summary</h2>")
    parts.append(summary_table_html(rows, shown, decimals))
    parts.append(f'<p class="note">Mean ± standard deviation over the images (population, ddof 0), {decimals} '
                 "decimals; bold: the best value of each column (the highest; for MSE the lowest).</p>")
    figures, missing = montage_figures(data, max_pairs)
    total = len(_common_stems(data.methods))
    parts.append(f"<h2>Pairs ({len(figures)} of {total})</h2>")
    parts += figures
    parts += [f'<p class="missing">not shown: {html.escape(m)}</p>' for m in missing]
    parts.append('<h2>Metrics per image</h2><div id="plot">')
    plot_metrics = [k for k in (*PAPER_SIX, "MSE") if k in data.metrics]
    uri = metrics_plot(data, plot_metrics) if plot else None
    if uri is not None:
        parts.append(f'<img alt="metrics per image" src="{uri}">')
    else:
        text = PLOT_MISSING if plot else "The plot was left out (no plot asked for)."
        parts.append(f'<p id="plot-missing">{html.escape(text)}</p>')
    parts.append("</div>")
    parts.append(f"<details><summary>Every image's numbers</summary>{_per_image_table(data, decimals)}</details>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(data.title)}'
            f'</title><meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_report(data: ReportData, dest: str | Path, **options: Any) -> Path:
    """:func:`build_html` written atomically to ``dest``."""
    from ddfm_fast.evaluation import write_text

    return write_text(Path(dest), build_html(data, **options))


def has_matplotlib() -> bool:
    """True when the plot can be drawn (the ``report`` extra is installed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
