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
from tqdm import tqdm

from ddfm_fast import cli_options as opts
from ddfm_fast import evaluation as ev
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
    base = out.with_suffix("") if out.suffix.lower() in (".csv", ".json") else out
    return base.with_name(base.name + ".csv"), base.with_name(base.name + ".json")


def _bar(desc: str, show: bool = True) -> Any:
    return lambda items: tqdm(items, desc=desc, unit="img", file=sys.stderr, disable=None if show else True,
                              leave=False)


# ----------------------------------------------------------------------------------------------------- eval


@click.command("eval")
@click.option("--fused", "fused_dir", type=_DIR, required=True, help="Folder of fused images.")
@click.option("--ir-dir", type=_DIR, help="IVF: folder of infrared images (A).")
@click.option("--vis-dir", type=_DIR, help="IVF: folder of visible images (B).")
@click.option("--func-dir", type=_DIR, help="MIF: folder of CT / PET / SPECT images (A).")
@click.option("--mri-dir", type=_DIR, help="MIF: folder of MRI images (B).")
@click.option("--mode", type=click.Choice(["ivf", "mif"]), default=None,
              help="ivf (A = infrared, B = visible) or mif (A = functional: CT/PET/SPECT, B = MRI); "
                   "inferred from the folder options when omitted.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output prefix: '-o results' writes results.csv and results.json "
                   "(a .csv or .json suffix is dropped first).")
@click.option("--variant", type=click.Choice(sorted(VARIANTS)), default="cddfuse", show_default=True,
              help="Metric definitions: cddfuse is the evaluator behind the published numbers.")
@click.option("--crop-sources", is_flag=True,
              help="Crop A and B top-left to a smaller fused image (DDFM crops its inputs to multiples of 32).")
def eval_command(fused_dir: Path, ir_dir: Optional[Path], vis_dir: Optional[Path], func_dir: Optional[Path],
                 mri_dir: Optional[Path], mode: Optional[str], out: Optional[Path], variant: str,
                 crop_sources: bool) -> None:
    """Score fused images against their sources with the 12 fusion metrics.

    Images pair by file stem across the three folders (extensions may differ). Each is read as the CDDFuse
    evaluator reads it (8-bit, grey Y = 0.299 R + 0.587 G + 0.114 B, rounded). Prints a table per image and
    the mean; unreadable files, missing partners and size mismatches are listed on stderr and skipped.
    Exit code 1 if no image could be scored.
    """
    mode, a_dir, b_dir = opts.mode_and_folders(mode, dict(ir_dir=ir_dir, vis_dir=vis_dir, func_dir=func_dir,
                                                          mri_dir=mri_dir))
    opts.require_both(mode, a_dir, b_dir, what=f"eval --mode {mode}")
    try:
        pairing = ev.pair_for_eval(fused_dir, a_dir, b_dir, mode)
    except InputError as exc:
        raise click.ClickException(str(exc)) from exc
    dctx = _eval_session()  # distributed hook: under torchrun each rank scores a shard (None otherwise)
    work = pairing.pairs
    if dctx is not None:
        from ddfm_fast import distributed

        costs = [distributed.image_pixels(p.files["fused"], multiple=1) for p in work]
        work = [work[i] for i in distributed.lpt_shards([p.stem for p in work], costs, dctx.world_size)[dctx.rank]]
    rows, not_scored = ev.score_pairs(work, variant, crop_sources,
                                      wrap=_bar("eval", dctx is None or dctx.is_main))
    if dctx is not None:  # distributed hook: rank 0 gathers rows (in stem order, as one process scores them)
        from ddfm_fast import distributed

        gathered = distributed.finish_eval(dctx, rows, not_scored)
        if gathered is None:  # not rank 0: wait for rank 0's files and exit with its code
            _end_eval_session(dctx, None)
        all_rows, not_scored = gathered
        rows = {p.stem: all_rows[p.stem] for p in pairing.pairs if p.stem in all_rows}
    skipped = sorted(ev.skipped_of(pairing) + not_scored, key=lambda s: s.image)
    scores = ev.Scores(rows, ev.mean_of(rows), skipped, not_fused=pairing.undriven)
    _print_eval(scores, mode, variant)
    if out is not None:
        csv_path, json_path = _out_paths(out)
        ev.write_text(csv_path, ev.eval_csv(scores.rows, scores.mean))
        folders = {"fused": fused_dir, "A": a_dir, "B": b_dir}
        ev.write_text(json_path, ev.dump_json(ev.eval_doc(scores, mode, variant, folders)))
        click.echo(f"wrote {csv_path} and {json_path}", err=True)
    if dctx is not None:  # distributed hook: rank 0 tells the others its exit code, then all exit together
        _end_eval_session(dctx, 0 if rows else 1)
    if not rows:
        raise SystemExit(1)


def _print_eval(scores: ev.Scores, mode: str, variant: str) -> None:
    r = roles(mode)
    if scores.rows:
        click.echo(ev.format_table([*scores.rows.items(), ("mean", scores.mean)], METRIC_NAMES))
    report_skipped(scores.skipped)
    if scores.not_fused:
        shown = ", ".join(scores.not_fused[:10]) + (", ..." if len(scores.not_fused) > 10 else "")
        click.echo(f"not fused (source stems without a fused image, not scored): {len(scores.not_fused)}: {shown}",
                   err=True)
    click.echo(f"scored {len(scores.rows)} image(s), skipped {len(scores.skipped)}; mode {mode} "
               f"(A = {r.ir_name}, B = {r.vis_name}), metrics {variant}", err=True)


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
def compare_command(dir1: Path, dir2: Path, out: Optional[Path]) -> None:
    """Compare two output sets paired by stem: PSNR, SSIM, max-abs.

    Both are read as grey levels 0..255 (read as the evaluator does, so colour differences that cancel in
    Y are not seen). PSNR uses peak 255 and is inf for identical images; SSIM is a single SSIM(x, y) with
    data range 255 (not the evaluator's sum of two with range 2). The mean row's PSNR is computed from the
    mean MSE, so identical images do not make it infinite; the worst image is the one with the largest MSE.
    Exit code 1 if no pair could be compared.
    """
    try:
        pairing = pair_by_stem({"DIR1": dir1, "DIR2": dir2})
    except InputError as exc:
        raise click.ClickException(str(exc)) from exc
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
    if out is not None:
        ev.write_text(out, ev.dump_json(doc))
        click.echo(f"wrote {out}", err=True)
    if not rows:
        raise SystemExit(1)

