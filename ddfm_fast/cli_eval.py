"""``ddfm-fast eval`` and ``ddfm-fast compare``: thin click commands over :mod:`ddfm_fast.evaluation`.

Both commands pair images by file stem (``01.png`` pairs with ``01.jpg``) and keep going past problem images:
unreadable files, missing partners and size mismatches are listed, not fatal. The exit code is 1 only when
nothing could be scored. Under torchrun, ``eval`` scores a shard per rank and rank 0 writes the results.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import click
import numpy as np
from tqdm import tqdm

from ddfm_fast import cli_options as opts
from ddfm_fast import evaluation as ev
from ddfm_fast import tables
from ddfm_fast.metrics import METRIC_NAMES, VARIANTS
from ddfm_fast.pairing import InputError, pair_by_stem, roles

_DIR = click.Path(exists=True, file_okay=False, dir_okay=True, path_type=Path)


def report_skipped(skipped: list[ev.Skipped]) -> None:
    """The images not scored, with reasons, on stderr."""
    if skipped:
        click.echo(f"skipped {len(skipped)}:", err=True)
        for s in skipped:
            click.echo(f"  {s.image}: {s.reason}", err=True)


def _out_paths(out: Path) -> tuple[Path, Path]:
    """-o results / results.csv / results.json -> (results.csv, results.json)."""
    base = out.with_suffix("") if out.suffix.lower() in _OUT_SUFFIXES else out
    return base.with_name(base.name + ".csv"), base.with_name(base.name + ".json")


_OUT_SUFFIXES = (".csv", ".json", ".md", ".tex")
_TABLE_SUFFIX = {"markdown": ".md", "latex": ".tex"}


def _bar(desc: str, show: bool = True) -> Any:
    return lambda items: tqdm(items, desc=desc, unit="img", file=sys.stderr, disable=None if show else True,
                              leave=False)


def metric_list(text: Optional[str]) -> list[str]:
    """``--metrics EN,SD,Qabf`` (case-insensitive) in the given order; all twelve when omitted."""
    if not text:
        return list(METRIC_NAMES)
    by_lower = {m.lower(): m for m in METRIC_NAMES}
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown or not names:
        raise click.BadParameter(f"unknown metric(s) {', '.join(unknown) or repr(text)}; choose from "
                                 + ", ".join(METRIC_NAMES), param_hint="--metrics")
    return list(dict.fromkeys(by_lower[n.lower()] for n in names))


# ----------------------------------------------------------------------------------------------------- eval

_EVAL_HELP = f"""Score fused images against their sources with the 12 fusion metrics, for one or several methods.

\b
  ddfm-fast eval --fused fused --ir-dir MSRS/ir --vis-dir MSRS/vi
  ddfm-fast eval --fused DDFM=runs/ddfm --fused EM=runs/em --ir-dir A --vis-dir B \\
                 --format markdown -o results

Each --fused is one method: NAME=DIR, or a bare DIR named after its folder. Images pair by file stem across the
folders (extensions may differ). Each is read as the CDDFuse evaluator reads it (8-bit, grey Y = 0.299 R +
0.587 G + 0.114 B, rounded). Prints one summary line per method: the mean and the standard deviation over its
images (population, ddof 0), rounded to --decimals, the best value of each column marked (the highest; for MSE
the lowest). --per-image also prints every image's scores. Unreadable files, missing partners and size
mismatches are listed on stderr and skipped. Exit code 1 if no image could be scored.

\b
With -o results it writes results.csv (one row per method and image, no
summary rows), results_summary.csv (per method: count, mean and std of each
metric) and results.json (everything), all in full precision, plus
results_summary.md or .tex with --format markdown / latex.

What each metric rewards, why SSIM (a sum of two SSIMs) can exceed 1, and how the --variant choices differ:
{ev.GUIDE} in the ddfm-fast repository.
"""


@click.command("eval", help=_EVAL_HELP, context_settings={"max_content_width": 100})
@click.option("--fused", "fused_specs", multiple=True, required=True, metavar="[NAME=]DIR",
              help="A method's folder of fused images; repeat for several methods.")
@click.option("--ir-dir", type=_DIR, help="IVF: folder of infrared images (A).")
@click.option("--vis-dir", type=_DIR, help="IVF: folder of visible images (B).")
@click.option("--func-dir", type=_DIR, help="MIF: folder of CT / PET / SPECT images (A).")
@click.option("--mri-dir", type=_DIR, help="MIF: folder of MRI images (B).")
@click.option("--mode", type=click.Choice(["ivf", "mif"]), default=None,
              help="ivf (A = infrared, B = visible) or mif (A = functional: CT/PET/SPECT, B = MRI); "
                   "inferred from the folder options when omitted.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output prefix: '-o results' writes results.csv, results_summary.csv and results.json "
                   "(a .csv, .json, .md or .tex suffix is dropped first).")
@click.option("--format", "fmt", type=click.Choice(tables.FORMATS), default="text", show_default=True,
              help="Format of the printed summary table (json keeps full precision).")
@click.option("--decimals", type=click.IntRange(0, 12), default=2, show_default=True,
              help="Decimals of the printed summary (papers print 2).")
@click.option("--metrics", "metric_names", metavar="EN,SD,...",
              help="Columns of the summary table, in this order (default: all 12).")
@click.option("--no-std", is_flag=True, help="Print the means alone, without the standard deviation.")
@click.option("--per-image", is_flag=True, help="Also print every image's scores (text tables).")
@click.option("--variant", type=click.Choice(sorted(VARIANTS)), default="cddfuse", show_default=True,
              help=f"Metric definitions: cddfuse is the evaluator behind the published numbers ({ev.GUIDE}).")
@click.option("--crop-sources", is_flag=True,
              help="Crop A and B top-left to a smaller fused image (DDFM crops its inputs to multiples of 32).")
@opts.friendly_errors
def eval_command(fused_specs: tuple[str, ...], ir_dir: Optional[Path], vis_dir: Optional[Path],
                 func_dir: Optional[Path], mri_dir: Optional[Path], mode: Optional[str], out: Optional[Path],
                 fmt: str, decimals: int, metric_names: Optional[str], no_std: bool, per_image: bool, variant: str,
                 crop_sources: bool) -> None:
    if out is not None:  # before any scoring: a path that cannot be written fails now, in one line
        for path in _out_paths(out):
            opts.check_writable(path, "-o/--out")
    mode, a_dir, b_dir = opts.mode_and_folders(mode, dict(ir_dir=ir_dir, vis_dir=vis_dir, func_dir=func_dir,
                                                          mri_dir=mri_dir))
    opts.require_both(mode, a_dir, b_dir, what=f"eval --mode {mode}")
    shown = metric_list(metric_names)
    try:
        methods = ev.parse_methods(fused_specs)
    except ev.MethodSpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--fused") from exc
    try:
        pairings = {m.name: ev.pair_for_eval(m.folder, a_dir, b_dir, mode) for m in methods}
    except InputError as exc:
        raise click.ClickException(str(exc)) from exc
    work: list[ev.Work] = [(m.name, p) for m in methods for p in pairings[m.name].pairs]
    dctx = _eval_session()  # distributed hook: under torchrun each rank scores a shard (None otherwise)
    if dctx is not None:
        from ddfm_fast import distributed

        costs = [distributed.image_pixels(p.files["fused"], multiple=1) for _, p in work]
        keys = [f"{name}/{p.stem}" for name, p in work]
        work = [work[i] for i in distributed.lpt_shards(keys, costs, dctx.world_size)[dctx.rank]]
    rows, not_scored = ev.score_methods(work, variant, crop_sources, wrap=_bar("eval", dctx is None or dctx.is_main))
    if dctx is not None:  # distributed hook: rank 0 gathers rows (keyed by method and stem)
        from ddfm_fast import distributed

        gathered = distributed.finish_eval(dctx, rows, not_scored)
        if gathered is None:  # not rank 0: wait for rank 0's files and exit with its code
            _end_eval_session(dctx, None)
        rows, not_scored = gathered
    results = ev.collect_methods(methods, pairings, rows, not_scored)
    summary = [res.summary_row() for res in results if res.scores.rows]
    _print_eval(results, summary, shown, fmt, decimals, not no_std, per_image, mode, variant)
    scored = any(res.scores.rows for res in results)
    if out is not None and scored:
        _write_eval(out, results, summary, shown, fmt, decimals, not no_std, mode, variant, a_dir, b_dir)
    elif out is not None:
        click.echo(f"no image was scored: nothing written to {out} (files there are left as they were)", err=True)
    if dctx is not None:  # distributed hook: rank 0 tells the others its exit code, then all exit together
        _end_eval_session(dctx, 0 if scored else 1)
    if not scored:
        raise SystemExit(1)


def _print_eval(results: list[ev.MethodScores], summary: list[tables.SummaryRow], shown: list[str], fmt: str,
                decimals: int, show_std: bool, per_image: bool, mode: str, variant: str) -> None:
    r = roles(mode)
    many = len(results) > 1
    for res in results:
        prefix = f"{res.name}: " if many else ""
        if per_image and res.scores.rows:
            if many:
                click.echo(f"{res.name}:")
            click.echo(ev.format_table(list(res.scores.rows.items()), shown))
        flat = ev.flat_images(res.scores.rows)
        if flat:
            click.echo(f"{prefix}warning: {len(flat)} fused image(s) are one grey level, so their metrics are "
                       f"degenerate (PSNR -inf for black) and they pull the means: {', '.join(flat[:10])}"
                       + (", ..." if len(flat) > 10 else ""), err=True)
        if res.scores.skipped:
            click.echo(f"{prefix}skipped {len(res.scores.skipped)}:", err=True)
            for s in res.scores.skipped:
                click.echo(f"  {s.image}: {s.reason}", err=True)
        if res.scores.not_fused:
            nf = res.scores.not_fused
            shown_nf = ", ".join(nf[:10]) + (", ..." if len(nf) > 10 else "")
            click.echo(f"{prefix}not fused (source stems without a fused image, not scored): {len(nf)}: {shown_nf}",
                       err=True)
    if summary:
        click.echo(tables.format_summary(summary, shown, fmt, decimals, show_std), nl=False)
    counts = ", ".join(f"{res.name} {len(res.scores.rows)}" for res in results) if many else \
        f"{len(results[0].scores.rows)} image(s)"
    skipped = sum(len(res.scores.skipped) for res in results)
    click.echo(f"scored {counts}, skipped {skipped}; mode {mode} (A = {r.ir_name}, B = {r.vis_name}), metrics "
               f"{variant}; what the metrics mean: {ev.GUIDE} in the ddfm-fast repository", err=True)


def _write_eval(out: Path, results: list[ev.MethodScores], summary: list[tables.SummaryRow], shown: list[str],
                fmt: str, decimals: int, show_std: bool, mode: str, variant: str, a_dir: Path, b_dir: Path) -> None:
    csv_path, json_path = _out_paths(out)
    summary_path = csv_path.with_name(csv_path.stem + "_summary.csv")
    best = tables.best_marks(summary, METRIC_NAMES, decimals)
    files = {csv_path: ev.per_image_csv(results), summary_path: tables.summary_csv(summary, METRIC_NAMES),
             json_path: ev.dump_json(ev.methods_doc(results, mode, variant, a_dir, b_dir, best))}
    if fmt in _TABLE_SUFFIX:
        table_path = csv_path.with_name(csv_path.stem + "_summary" + _TABLE_SUFFIX[fmt])
        files[table_path] = tables.format_summary(summary, shown, fmt, decimals, show_std)
    written = ev.write_texts(files)  # one set: a full disk leaves the earlier results as they were
    click.echo("wrote " + ", ".join(map(str, written)), err=True)


def _eval_session() -> Any:
    """The process group of a torchrun eval (gloo, CPU), or None for a single-process run."""
    import torch

    from ddfm_fast import distributed

    try:
        env = distributed.env_from_environ()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if env is None:
        return None
    return distributed.init(env, torch.device("cpu"))  # closed by _end_eval_session


def _end_eval_session(ctx: Any, code: Optional[int]) -> None:
    """All ranks take rank 0's exit code (``code``), meet at a barrier, tear the group down and exit."""
    from ddfm_fast import distributed

    try:
        code = distributed.agree_exit(ctx, 0 if code is None else code)
    finally:
        ctx.close()
    raise SystemExit(code)


# -------------------------------------------------------------------------------------------------- compare


@click.command("compare")
@click.argument("dir1", type=_DIR)
@click.argument("dir2", type=_DIR)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write per-image results, the mean and the worst image to this JSON file.")
@click.option("--diff-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write a difference picture for each of the --worst pairs into this folder: DIR1 | DIR2 | "
                   "|DIR1 - DIR2| stretched so that the largest difference is white, labelled.")
@click.option("--worst", "worst_count", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the most different pairs --diff-dir shows.")
@opts.friendly_errors
def compare_command(dir1: Path, dir2: Path, out: Optional[Path], diff_dir: Optional[Path], worst_count: int) -> None:
    """Compare two output sets paired by stem: PSNR, SSIM, max-abs.

    Both are read as grey levels 0..255 (read as the evaluator does, so colour differences that cancel in
    Y are not seen). PSNR uses peak 255 and is inf for identical images; SSIM is a single SSIM(x, y) with
    data range 255 (not the evaluator's sum of two with range 2). The mean row's PSNR is computed from the
    mean MSE, so identical images do not make it infinite; the worst image is the one with the largest MSE.
    Exit code 1 if no pair could be compared.
    """
    if out is not None:
        opts.check_writable(out, "-o/--out")
    if diff_dir is not None:
        opts.check_writable(diff_dir, "--diff-dir", folder=True)
    try:
        pairing = pair_by_stem({"DIR1": dir1, "DIR2": dir2})
    except InputError as exc:
        raise click.ClickException(str(exc)) from exc
    compared = [f for p in pairing.pairs for f in p.files.values()]
    if out is not None:
        opts.check_not_input([out], compared, "-o/--out")
    if diff_dir is not None:  # a difference picture is <stem>.png, for some of the pairs
        opts.check_not_input([diff_dir / f"{p.stem}.png" for p in pairing.pairs], compared, "--diff-dir")
    rows, not_compared = ev.measure(pairing.pairs, lambda f: ev.compare_images(f["DIR1"], f["DIR2"]),
                                    wrap=_bar("compare"))
    skipped = sorted(ev.skipped_of(pairing) + not_compared, key=lambda s: s.image)
    doc = ev.compare_doc((dir1, dir2), rows, skipped)
    if rows:
        mean = ev.compare_summary(rows)["mean"]
        click.echo(ev.format_table([*rows.items(), ("mean", mean)], ("PSNR", "SSIM", "max_abs")))
        worst = doc["worst"]
        click.echo(f"worst: {worst} (PSNR {rows[worst]['PSNR']:.4f} dB, max-abs {rows[worst]['max_abs']:g})"
                   if worst else "worst: none, all images are identical")
    report_skipped(skipped)
    click.echo(f"compared {len(rows)} pair(s), skipped {len(skipped)}", err=True)
    if diff_dir is not None and rows:
        _difference_pictures(pairing, rows, (dir1, dir2), diff_dir, worst_count)
    if out is not None:
        ev.write_text(out, ev.dump_json(doc))
        click.echo(f"wrote {out}", err=True)
    if not rows:
        raise SystemExit(1)


def _difference_pictures(pairing: Any, rows: ev.Rows, dirs: tuple[Path, Path], diff_dir: Path, worst: int) -> None:
    """``compare --diff-dir``: DIR1 | DIR2 | stretched |difference| for the most different pairs."""
    from ddfm_fast.metrics import read_gray_eval
    from ddfm_fast.montage import difference_image, montage_row, save_image

    files = {p.stem: p.files for p in pairing.pairs}
    stems = ev.worst_pairs(rows, worst)
    if not stems:
        click.echo(f"no difference pictures: every pair is identical (nothing written to {diff_dir})", err=True)
        return
    for stem in stems:
        a, b = files[stem]["DIR1"], files[stem]["DIR2"]
        # The grey levels compare measured (the evaluator's reading), so the picture's peak is max-abs.
        diff, gain = difference_image(read_gray_eval(a).astype(np.uint8), read_gray_eval(b).astype(np.uint8))
        r = rows[stem]
        label = (f"|difference| x{gain:.3g}: max {r['max_abs']:g} levels, PSNR {r['PSNR']:.2f} dB, "
                 f"SSIM {r['SSIM']:.4f}")
        # At the images' own size: a difference of one pixel must stay one pixel.
        pic = montage_row([(a, f"{dirs[0].name}/{a.name}"), (b, f"{dirs[1].name}/{b.name}"), (diff, label)],
                          height=diff.height)
        save_image(pic, diff_dir / f"{stem}.png")
    click.echo(f"difference pictures of the {len(stems)} most different pair(s) ({', '.join(stems)}) in "
               f"{diff_dir}", err=True)

