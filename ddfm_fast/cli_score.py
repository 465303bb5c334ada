"""``ddfm-fast score``: fuse a dataset folder and score it next to the paper's reported numbers.

A thin click command over :func:`ddfm_fast.scoring.score_dataset`. Its sampler, acceleration, model and run flags
are ``fuse``'s own option groups, mapped by the same builder (:func:`ddfm_fast.cli_options.build_run`, the one
``--paper`` block); the table and the result files are ``eval``'s (:mod:`ddfm_fast.evaluation`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from ddfm_fast import cli_options as opts
from ddfm_fast.cli_eval import report_skipped
from ddfm_fast.cli_fuse import EXIT_PAIRS_FAILED
from ddfm_fast.evaluation import GUIDE, format_table
from ddfm_fast.metrics import METRIC_NAMES
from ddfm_fast.pairing import InputError
from ddfm_fast.tables import format_summary
from ddfm_fast.scoring import (
    FUSED_DIR,
    PAPER_LABELS,
    PAPER_METRICS,
    PAPER_NUMBERS,
    SCORES_JSON,
    DatasetError,
    DatasetNameError,
    DatasetLayout,
    ScoreResult,
    dataset_layout,
    dataset_pairs,
    score_dataset,
    write_scores,
)

_SCORE_HELP = """Fuse a dataset folder and score it next to the paper's numbers.

\b
  ddfm-fast score shared/data/ivf/MSRS -o runs/msrs --paper
  ddfm-fast score shared/data/mif/MRI_PET -o runs/pet --checkpoint ddfm-shrink

\b
DATASET_DIR holds ir/ + vi/ (infrared-visible fusion) or MRI/ + one of
CT/, PET/, SPECT/ (medical fusion, the Harvard set), paired by file stem.
The dataset is named after the folder (ivf/MSRS -> MSRS; any mif folder ->
Harvard) or by --dataset (MSRS, M3FD, RoadScene, TNO, Harvard,
RoadScene-EM-only); it picks the paper's row (docs/METRICS.md in the
repository lists them, and says what each metric rewards).

\b
The pairs are fused into OUTDIR/fused/ as `ddfm-fast fuse` does (resumable:
existing outputs are kept unless --overwrite, when OUTDIR/fused/ddfm_summary.json
shows the same output-affecting settings; otherwise the run stops and names
them), then every fused image is scored as `ddfm-fast eval` does (the CDDFuse
evaluator; with --size-policy crop the sources are cropped to the fused size).
Prints the mean and std of EN, SD, MI, VIF, Qabf, SSIM (per image with -v),
the paper's row and the difference, then what was compared (pairs, sizes,
steps, prior) against the paper's protocol (its whole test set at full
resolution, 100 steps of adm256-uncond), saying plainly when this run is not
that protocol. Writes OUTDIR/scores.csv (per image), scores_summary.csv and
scores.json (all twelve metrics, full precision, atomically).

\b
The sampler, model, run and acceleration flags are those of `ddfm-fast fuse`
(see its --help). --paper is the official protocol: top-left crop to /32, seed
3407, lamb 0.5, rho 0.001, and the paper's prior (preset adm256-uncond, 100
steps) unless --checkpoint / --steps say otherwise; contradicting flags are
rejected.

\b
Exit codes: 0 success, 1 error or nothing scored, 2 usage error, 3 scored,
but some pairs failed (listed on stderr and in scores.json).
"""


def format_scores(result: ScoreResult, verbose: bool = False, decimals: int = 2) -> str:
    """The text table over the paper's six metrics: per image (``verbose``), the mean and std, the paper's row and
    the delta; then the means of the other six metrics and what was compared."""
    lines: list[str] = []
    if verbose:
        lines.append(format_table(list(result.rows.items()), PAPER_METRICS, fmt=f"{{:.{decimals}f}}"))
    lines.append(format_summary(result.summary_rows(), PAPER_METRICS, "text", decimals).rstrip("\n"))
    others = [k for k in METRIC_NAMES if k not in PAPER_METRICS]
    lines.append("mean of the metrics the paper does not report: "
                 + ", ".join(f"{k} {result.mean[k]:.{decimals}f}" for k in others))
    if result.comparison is not None:
        lines += result.comparison.lines()
    return "\n".join(lines)


@click.command("score", help=_SCORE_HELP, context_settings={"max_content_width": 100})
@click.argument("dataset_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output folder: fused/ (the fused images), scores.csv, scores.json.")
@click.option("--dataset", "dataset", metavar="NAME",
              help="Which paper row to compare with: " + ", ".join(PAPER_NUMBERS) + " (default: from the folder).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Fuse and score only the first N pairs.")
@click.option("-v", "--verbose", is_flag=True, help="Print every image's scores, not only the mean.")
@click.option("--decimals", type=click.IntRange(0, 12), default=2, show_default=True,
              help="Decimals of the printed table (the files keep full precision).")
@click.option("--montage", is_flag=True,
              help="Also write OUTDIR/montage.png: one labelled row per scored pair (A | B | fused; the first "
                   "24 pairs).")
@click.option("--html", "html_report", is_flag=True,
              help="Also write OUTDIR/report.html: one self-contained page with the table, montages and a plot "
                   "of the metrics per image (the plot needs the report extra: matplotlib).")
@opts.model_options
@opts.sampler_options
@opts.run_options
@opts.accel_options
@click.pass_context
@opts.friendly_errors
def score_command(ctx: click.Context, dataset_dir: Path, out: Path, dataset: Optional[str], limit: Optional[int],
                  verbose: bool, decimals: int, montage: bool, html_report: bool, model: dict[str, Any], sampler: dict[str, Any], run: dict[str, Any],
                  accel: dict[str, Any]) -> None:
    from ddfm_fast.cli_fuse import _dist_env

    if _dist_env() is not None:
        raise click.UsageError("score runs in one process; under torchrun, fuse the folders (ddfm-fast fuse "
                               "--ir-dir A --vis-dir B -o OUT) and score them with ddfm-fast eval")
    layout = _layout(dataset_dir, dataset, out)
    # The files written beside the scores, checked now rather than after the fusion.
    for name, wanted in ((MONTAGE_NAME, montage), (REPORT_NAME, html_report), (SCORES_JSON, True)):
        if wanted:
            opts.check_writable(out / name, "--montage" if name == MONTAGE_NAME else
                                "--html" if name == REPORT_NAME else "-o/--output")
    cfg = opts.build_run(ctx, sampler=sampler, accel=accel, model=model, run=run, mode=layout.mode)
    try:
        pairing = dataset_pairs(layout, limit)  # the sources are checked before a model is loaded
        device = opts.resolve_device(run["device"])
        plan = opts.resolve_plan(cfg, device)
        net = opts.load_model(cfg, device)
        bar = opts.bar_factory(run["progress_bar"])
        click.echo(f"dataset {layout.name} ({layout.mode}{', ' + layout.subset if layout.subset else ''}): "
                   f"{len(pairing.pairs)} pair(s) from {layout.root}", err=True)
        extra = {"device": str(device), "paper": bool(model["paper"]), "overwrite": bool(run["overwrite"])}
        result = score_dataset(dataset_dir, out, model=net, run=cfg, device=device, plan=plan,
                               overwrite=run["overwrite"], extra_settings=extra, bar=bar, step_bar=bar,
                               layout=layout, pairing=pairing)
    except (InputError, DatasetError) as exc:
        raise click.ClickException(str(exc)) from exc
    code = _report(result, out, verbose, decimals)
    if montage and result.rows:
        _score_montage(result, out)
    if html_report and result.rows:
        from ddfm_fast.report import has_matplotlib, load_results, write_report

        dest = write_report(load_results(out / SCORES_JSON), out / REPORT_NAME, decimals=decimals)
        click.echo(f"report: {dest}" + ("" if has_matplotlib() else
                                        " (no plot: matplotlib is not installed; pip install 'ddfm-fast[report]')"),
                   err=True)
    ctx.exit(code)


def _score_montage(result: ScoreResult, out: Path) -> None:
    """``score --montage``: OUTDIR/montage.png, one row per scored pair (the first MAX_GRID_ROWS)."""
    from ddfm_fast.io import ImageReadError
    from ddfm_fast.montage import MAX_GRID_ROWS, method_label, montage_grid, save_image
    from ddfm_fast.pairing import roles
    from ddfm_fast.report import find_image

    lay, r = result.layout, roles(result.layout.mode)
    c = result.comparison
    method = "fused" if c is None else method_label("none" if c.prior == "none" else "diffusion", c.prior, c.steps)
    rows = []
    for stem in list(result.rows)[:MAX_GRID_ROWS]:
        a, b, f = (find_image(d, stem) for d in (lay.a_dir, lay.b_dir, result.fused_dir))
        if a is None or b is None or f is None:
            continue
        rows.append([(a, f"{r.ir_name}: {a.name}"), (b, f"{r.vis_name}: {b.name}"), (f, f"fused: {method}")])
    shown = f"{len(rows)} of {result.count} pairs" if result.count > len(rows) else f"{len(rows)} pairs"
    try:
        pic = montage_grid(rows, title=f"{lay.name}: {shown}, {method}")
    except (ImageReadError, ValueError, OSError) as exc:
        click.echo(f"montage not written: {exc}", err=True)
        return
    click.echo(f"montage: {save_image(pic, out / MONTAGE_NAME)}", err=True)


MONTAGE_NAME = "montage.png"  # score --montage
REPORT_NAME = "report.html"  # score --html


def _layout(dataset_dir: Path, dataset: Optional[str], out: Path) -> DatasetLayout:
    """The dataset folder's layout, and an output folder that is not one of its sources."""
    try:
        layout = dataset_layout(dataset_dir, dataset)
    except DatasetError as exc:
        hint = "--dataset" if isinstance(exc, DatasetNameError) else "DATASET_DIR"
        raise click.BadParameter(str(exc), param_hint=hint) from exc
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} is a file; give an output folder", param_hint="-o/--output")
    opts.check_writable(out, "-o/--output", folder=True)
    from ddfm_fast.outputs import same_path

    for src in (layout.a_dir, layout.b_dir):
        if same_path(out / FUSED_DIR, src):
            raise click.BadParameter(f"{out / FUSED_DIR} is a source folder; outputs would replace inputs",
                                     param_hint="-o/--output")
    return layout


def _report(result: ScoreResult, out: Path, verbose: bool, decimals: int = 2) -> int:
    """Print the fusion totals, the scores beside the paper's row, the skips; write the files; the exit code."""
    s = result.summary
    rate = s.images_per_s
    click.echo(f"{len(s.done)} fused, {len(s.skipped)} kept (output exists), {len(s.failed)} failed"
               + (f"; {rate:.3g} images/s" if rate else "") + f"; fused images in {result.fused_dir}", err=True)
    for fallback in (s.plan or {}).get("fallbacks", []):
        click.echo(f"fell back: {fallback}", err=True)
    if result.rows:
        click.echo(format_scores(result, verbose, decimals))
    if result.paper is None:
        click.echo(f"the paper reports no numbers for {result.layout.name}; --dataset NAME compares with one of: "
                   + ", ".join(PAPER_NUMBERS), err=True)
    else:
        click.echo(f"paper row: {PAPER_LABELS[result.layout.paper_key]} (DDFM, ICCV 2023, as {GUIDE} in the "
                   "ddfm-fast repository lists it, with what each metric rewards)", err=True)
    report_skipped(result.skipped)
    paths = write_scores(result, out)
    click.echo(f"scored {result.count} image(s), skipped {len(result.skipped)}; wrote "
               + ", ".join(map(str, paths)), err=True)
    if not result.rows:
        return 1
    return EXIT_PAIRS_FAILED if s.failed else 0
