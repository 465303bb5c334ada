"""``ddfm-fast report``: one self-contained HTML page of an ``eval`` or ``score`` result (:mod:`ddfm_fast.report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

_REPORT_HELP = """Write one self-contained HTML page of an eval or score result.

\b
  ddfm-fast eval --fused DDFM=runs/ddfm --fused EM=runs/em --ir-dir A --vis-dir B -o results
  ddfm-fast report results.json -o report.html
  ddfm-fast report runs/msrs -o msrs.html        (a score output folder)

RESULTS is eval's results.json or score's scores.json (or its output folder). The page holds the summary table
(mean ± std per method, the best value of each column in bold; for MSE the lowest), labelled montages of the
first --max-pairs pairs (A | B | each method's fusion), a plot of the metrics per image, and every image's
numbers. Images are inlined (base64), so the one file is the whole report. The plot needs matplotlib
(pip install 'ddfm-fast[report]'); without it the page says so in its place.
"""


@click.command("report", help=_REPORT_HELP, context_settings={"max_content_width": 100})
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HTML file to write.")
@click.option("--max-pairs", type=click.IntRange(min=0), default=12, show_default=True,
              help="Montages of at most this many pairs.")
@click.option("--decimals", type=click.IntRange(0, 12), default=2, show_default=True,
              help="Decimals of the tables.")
@click.option("--metrics", "metric_names", metavar="EN,SD,...", help="Columns of the summary (default: all 12).")
@click.option("--title", default=None, help="The page's title (default: the methods or the dataset).")
def report_command(results: Path, out: Path, max_pairs: int, decimals: int, metric_names: Optional[str],
                   title: Optional[str]) -> None:
    from ddfm_fast.cli_eval import metric_list
    from ddfm_fast.report import ReportError, has_matplotlib, load_results, write_report

    from ddfm_fast.cli_options import check_not_input, check_writable

    if out.suffix.lower() not in (".html", ".htm"):
        raise click.BadParameter(f"{out}: the report is an HTML page; name it .html", param_hint="-o/--output")
    check_writable(out)  # before the montages are drawn
    check_not_input([out], [results / "scores.json" if results.is_dir() else results], "-o/--output")
    shown = metric_list(metric_names)
    try:
        data = load_results(results)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from exc
    if title:
        data.title = title
    write_report(data, out, metrics=shown, decimals=decimals, max_pairs=max_pairs)
    if not has_matplotlib():
        click.echo("no plot: matplotlib is not installed (pip install 'ddfm-fast[report]'); the page says so",
                   err=True)
    click.echo(f"wrote {out}", err=True)
