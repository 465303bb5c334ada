"""``ddfm-fast eval`` and ``ddfm-fast compare``: score fused images, compare two output sets.

Both commands pair images by file stem (``01.png`` pairs with ``01.jpg``), read them the evaluator's way
(:func:`ddfm_fast.metrics.read_gray_eval`), and keep going past problem images: unreadable files, missing
partners and size mismatches are listed, not fatal. The exit code is 1 only when nothing could be scored.
Results files are written atomically (a temporary file beside the target, then one rename).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from ddfm_fast.io import atomic_path
from ddfm_fast.metrics import (
    METRIC_NAMES,
    VARIANTS,
    ImageReadError,
    evaluate,
    read_gray_eval,
    structural_similarity,
)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".gif"})

_DIR = click.Path(exists=True, file_okay=False, dir_okay=True, path_type=Path)
_ROLES = {"ivf": ("infrared", "visible"), "mif": ("functional", "MRI")}  # A, B


# ------------------------------------------------------------------------------------------------- pairing
@dataclass
class Skipped:
    """An image that was not scored, and why."""

    image: str
    reason: str


@dataclass
class Pairing:
    """Stems found in every folder (sorted) and the problems met while pairing."""

    stems: list[str]
    files: list[dict[str, Path]]  # one {folder label: path} per stem
    skipped: list[Skipped] = field(default_factory=list)
    undriven: list[str] = field(default_factory=list)  # stems of the other folders that the driver lacks


def _index(folder: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """stem -> image file in ``folder`` (not recursive), and the stems held by several files (ambiguous)."""
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(p.stem, []).append(p)
    unique = {s: ps[0] for s, ps in by_stem.items() if len(ps) == 1}
    return unique, {s: ps for s, ps in by_stem.items() if len(ps) > 1}


def pair_by_stem(folders: dict[str, Path], driver: str | None = None,
                 describe: dict[str, str] | None = None) -> Pairing:
    """Pair the image files of ``folders`` ({label: folder}) by stem.

    With a ``driver`` label, only that folder's stems are candidates and a stem missing from the other
    folders is a problem; stems only in the others are listed in ``undriven``. Without a driver every
    stem of every folder is a candidate. ``describe`` gives the labels' names in messages.
    """
    name = {label: (describe or {}).get(label, label) for label in folders}
    indexes = {label: _index(folder) for label, folder in folders.items()}
    if driver is None:
        candidates = set().union(*(set(u) | set(a) for u, a in indexes.values()))
    else:
        candidates = set(indexes[driver][0]) | set(indexes[driver][1])
    pairing = Pairing([], [])
    for stem in sorted(candidates):
        problems = []
        for label, (unique, ambiguous) in indexes.items():
            if stem in ambiguous:
                names = ", ".join(p.name for p in ambiguous[stem])
                problems.append(f"several {name[label]} files share the stem ({names})")
            elif stem not in unique:
                problems.append(f"no {name[label]} file {stem}.* in {folders[label]}")
        if problems:
            pairing.skipped.append(Skipped(stem, "; ".join(problems)))
        else:
            pairing.stems.append(stem)
            pairing.files.append({label: indexes[label][0][stem] for label in folders})
    if driver is not None:
        others = set().union(*(set(u) | set(a) for label, (u, a) in indexes.items() if label != driver))
        pairing.undriven = sorted(others - candidates)
    return pairing


# --------------------------------------------------------------------------------------------------- output
def _jsonable(x: float) -> float | str:
    """Strict JSON has no NaN/Infinity: non-finite numbers are written as the strings "inf", "-inf", "nan"."""
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _write_text(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def _out_paths(out: Path) -> tuple[Path, Path]:
    """-o results / results.csv / results.json -> (results.csv, results.json)."""
    base = out.with_suffix("") if out.suffix.lower() in (".csv", ".json") else out
    return base.with_name(base.name + ".csv"), base.with_name(base.name + ".json")


def _table(rows: list[tuple[str, dict[str, float]]], columns: Iterable[str], fmt: str = "{:.4f}") -> str:
    """Fixed-width text table, one line per (name, row)."""
    columns = list(columns)
    width = max([len("image")] + [len(name) for name, _ in rows])
    cells = [[fmt.format(r[c]) for c in columns] for _, r in rows]
    col_w = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(["image".ljust(width)] + [c.rjust(w) for c, w in zip(columns, col_w)])]
    for (name, _), line in zip(rows, cells):
        lines.append("  ".join([name.ljust(width)] + [v.rjust(w) for v, w in zip(line, col_w)]))
    return "\n".join(lines)


def _report_skipped(skipped: list[Skipped]) -> None:
    if skipped:
        click.echo(f"skipped {len(skipped)}:", err=True)
        for s in skipped:
            click.echo(f"  {s.image}: {s.reason}", err=True)


# ----------------------------------------------------------------------------------------------------- eval
def _resolve_mode(mode: str | None, ir: Path | None, vis: Path | None, func: Path | None, mri: Path | None):
    ivf_given, mif_given = (ir or vis) is not None, (func or mri) is not None
    if mode is None:
        if ivf_given and mif_given:
            raise click.UsageError("give either --ir-dir/--vis-dir (ivf) or --func-dir/--mri-dir (mif), not both")
        mode = "mif" if mif_given else "ivf"
    if mode == "ivf":
        if mif_given:
            raise click.UsageError("--func-dir/--mri-dir belong to --mode mif; use --ir-dir/--vis-dir with ivf")
        if ir is None or vis is None:
            raise click.UsageError("--mode ivf needs both --ir-dir (A) and --vis-dir (B)")
        return mode, ir, vis
    if ivf_given:
        raise click.UsageError("--ir-dir/--vis-dir belong to --mode ivf; use --func-dir/--mri-dir with mif")
    if func is None or mri is None:
        raise click.UsageError("--mode mif needs both --func-dir (A: CT/PET/SPECT) and --mri-dir (B: MRI)")
    return mode, func, mri


def _score_one(files: dict[str, Path], variant: str, crop_sources: bool) -> dict[str, float]:
    f, a, b = (read_gray_eval(files[k]) for k in ("fused", "A", "B"))
    if crop_sources and a.shape == b.shape and f.shape[0] <= a.shape[0] and f.shape[1] <= a.shape[1]:
        a, b = a[: f.shape[0], : f.shape[1]], b[: f.shape[0], : f.shape[1]]
    if not (f.shape == a.shape == b.shape):
        hint = "" if crop_sources else " (--crop-sources crops A and B to a smaller fused image)"
        raise ValueError(f"size mismatch: fused {f.shape[1]}x{f.shape[0]}, A {a.shape[1]}x{a.shape[0]}, "
                         f"B {b.shape[1]}x{b.shape[0]} (W x H){hint}")
    return evaluate(f, a, b, variant=variant)


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
def eval_command(fused_dir: Path, ir_dir: Path | None, vis_dir: Path | None, func_dir: Path | None,
                 mri_dir: Path | None, mode: str | None, out: Path | None, variant: str, crop_sources: bool) -> None:
    """Score fused images against their sources with the 12 fusion metrics.

    Images pair by file stem across the three folders (extensions may differ). Each is read as the CDDFuse
    evaluator reads it (8-bit, grey Y = 0.299 R + 0.587 G + 0.114 B, rounded). Prints a table per image and
    the mean; unreadable files, missing partners and size mismatches are listed on stderr and skipped.
    Exit code 1 if no image could be scored.
    """
    mode, a_dir, b_dir = _resolve_mode(mode, ir_dir, vis_dir, func_dir, mri_dir)
    role_a, role_b = _ROLES[mode]
    pairing = pair_by_stem({"fused": fused_dir, "A": a_dir, "B": b_dir}, driver="fused",
                           describe={"A": f"A ({role_a})", "B": f"B ({role_b})"})
    rows: dict[str, dict[str, float]] = {}
    work = list(zip(pairing.stems, pairing.files))
    dctx = _eval_session()  # distributed hook: under torchrun each rank scores a shard (None otherwise)
    if dctx is not None:
        from ddfm_fast import distributed

        costs = [distributed.image_pixels(files["fused"], multiple=1) for _, files in work]
        work = [work[i] for i in distributed.lpt_shards(pairing.stems, costs, dctx.world_size)[dctx.rank]]
    first_scoring_skip = len(pairing.skipped)
    for stem, files in tqdm(work, desc="eval", unit="img", file=sys.stderr,
                            disable=None if dctx is None or dctx.is_main else True, leave=False):
        try:
            rows[stem] = _score_one(files, variant, crop_sources)
        except (ImageReadError, ValueError) as e:
            pairing.skipped.append(Skipped(stem, str(e)))
    if dctx is not None:  # distributed hook: rank 0 gathers rows (in stem order, as one process scores them)
        gathered = distributed.finish_eval(dctx, rows, pairing.skipped[first_scoring_skip:])
        if gathered is None:  # not rank 0: wait for rank 0's files and exit with its code
            _end_eval_session(dctx, None)
        all_rows, scoring_skips = gathered
        rows = {stem: all_rows[stem] for stem in pairing.stems if stem in all_rows}
        pairing.skipped[first_scoring_skip:] = scoring_skips
    pairing.skipped.sort(key=lambda s: s.image)

    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in METRIC_NAMES} if rows else {}
    if rows:
        click.echo(_table([*rows.items(), ("mean", mean)], METRIC_NAMES))
    _report_skipped(pairing.skipped)
    if pairing.undriven:
        shown = ", ".join(pairing.undriven[:10]) + (", ..." if len(pairing.undriven) > 10 else "")
        click.echo(f"not fused (source stems without a fused image, not scored): {len(pairing.undriven)}: {shown}",
                   err=True)
    click.echo(f"scored {len(rows)} image(s), skipped {len(pairing.skipped)}; mode {mode} "
               f"(A = {role_a}, B = {role_b}), metrics {variant}", err=True)
    if out is not None:
        csv_path, json_path = _out_paths(out)
        _write_text(csv_path, _eval_csv(rows, mean))
        _write_text(json_path, _eval_json(rows, mean, pairing, mode, variant, fused_dir, a_dir, b_dir))
        click.echo(f"wrote {csv_path} and {json_path}", err=True)
    if dctx is not None:  # distributed hook: rank 0 tells the others its exit code, then all exit together
        _end_eval_session(dctx, 0 if rows else 1)
    if not rows:
        raise SystemExit(1)


def _eval_session():
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


def _end_eval_session(ctx, code: int | None) -> None:
    """All ranks take rank 0's exit code (``code``), meet at a barrier, tear the group down and exit."""
    from ddfm_fast import distributed

    try:
        code = distributed.agree_exit(ctx, 0 if code is None else code)
    finally:
        ctx.close()
    raise SystemExit(code)


def _eval_csv(rows: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    """One row per image and a last row "mean"; numbers in full precision (repr), inf as "inf"."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", *METRIC_NAMES])
    for name, r in [*rows.items(), ("mean", mean)] if rows else []:
        w.writerow([name, *(repr(float(r[k])) for k in METRIC_NAMES)])
    return buf.getvalue()


def _eval_json(rows, mean, pairing: Pairing, mode, variant, fused_dir, a_dir, b_dir) -> str:
    doc = {
        "mode": mode,
        "variant": variant,
        "folders": {"fused": str(fused_dir), "A": str(a_dir), "B": str(b_dir)},
        "metrics": list(METRIC_NAMES),
        "count": len(rows),
        "images": {n: {k: _jsonable(v) for k, v in r.items()} for n, r in rows.items()},
        "mean": {k: _jsonable(v) for k, v in mean.items()},
        "skipped": [{"image": s.image, "reason": s.reason} for s in pairing.skipped],
        "not_fused": pairing.undriven,
    }
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


# -------------------------------------------------------------------------------------------------- compare
def _compare_one(p1: Path, p2: Path) -> dict[str, float]:
    x, y = read_gray_eval(p1), read_gray_eval(p2)
    if x.shape != y.shape:
        raise ValueError(f"size mismatch: {x.shape[1]}x{x.shape[0]} vs {y.shape[1]}x{y.shape[0]} (W x H)")
    d = x.astype(np.float64) - y.astype(np.float64)
    m = float(np.mean(d * d))
    return {
        "PSNR": math.inf if m == 0 else 10 * math.log10(255.0**2 / m),
        "SSIM": structural_similarity(x, y, data_range=255.0),
        "max_abs": float(np.max(np.abs(d))),
        "MSE": m,
    }


@click.command("compare")
@click.argument("dir1", type=_DIR)
@click.argument("dir2", type=_DIR)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write per-image results, the mean and the worst image to this JSON file.")
def compare_command(dir1: Path, dir2: Path, out: Path | None) -> None:
    """Compare two output sets paired by stem: PSNR, SSIM, max-abs.

    Both are read as grey levels 0..255 (read as the evaluator does, so colour differences that cancel in
    Y are not seen). PSNR uses peak 255 and is inf for identical images; SSIM is a single SSIM(x, y) with
    data range 255 (not the evaluator's sum of two with range 2). The mean row's PSNR is computed from the
    mean MSE, so identical images do not make it infinite; the worst image is the one with the largest MSE.
    Exit code 1 if no pair could be compared.
    """
    pairing = pair_by_stem({"DIR1": dir1, "DIR2": dir2})
    rows: dict[str, dict[str, float]] = {}
    for stem, files in tqdm(list(zip(pairing.stems, pairing.files)), desc="compare", unit="img",
                            file=sys.stderr, disable=None, leave=False):
        try:
            rows[stem] = _compare_one(files["DIR1"], files["DIR2"])
        except (ImageReadError, ValueError) as e:
            pairing.skipped.append(Skipped(stem, str(e)))
    pairing.skipped.sort(key=lambda s: s.image)

    summary = _compare_summary(rows)
    if rows:
        click.echo(_table([*rows.items(), ("mean", summary["mean"])], ("PSNR", "SSIM", "max_abs")))
        worst = summary["worst"]
        click.echo(f"worst: {worst} (PSNR {rows[worst]['PSNR']:.4f} dB, max-abs {rows[worst]['max_abs']:g})"
                   if worst else "worst: none, all images are identical")
    _report_skipped(pairing.skipped)
    click.echo(f"compared {len(rows)} pair(s), skipped {len(pairing.skipped)}", err=True)
    if out is not None:
        doc = {
            "dirs": [str(dir1), str(dir2)],
            "count": len(rows),
            "images": {n: {k: _jsonable(v) for k, v in r.items()} for n, r in rows.items()},
            "mean": {k: _jsonable(v) for k, v in summary["mean"].items()},
            "max_abs": summary["max_abs"],
            "worst": summary["worst"],
            "skipped": [{"image": s.image, "reason": s.reason} for s in pairing.skipped],
        }
        _write_text(out, json.dumps(doc, indent=1, allow_nan=False) + "\n")
        click.echo(f"wrote {out}", err=True)
    if not rows:
        raise SystemExit(1)


def _compare_summary(rows: dict[str, dict[str, float]]) -> dict:
    if not rows:
        return {"mean": {}, "max_abs": None, "worst": None}
    mse_mean = float(np.mean([r["MSE"] for r in rows.values()]))
    mean = {
        "PSNR": math.inf if mse_mean == 0 else 10 * math.log10(255.0**2 / mse_mean),
        "SSIM": float(np.mean([r["SSIM"] for r in rows.values()])),
        "max_abs": float(np.mean([r["max_abs"] for r in rows.values()])),
        "MSE": mse_mean,
    }
    # Largest MSE, then largest max-abs; None when every pair is identical.
    worst = max(rows, key=lambda n: (rows[n]["MSE"], rows[n]["max_abs"]))
    if rows[worst]["MSE"] == 0:
        worst = None
    return {"mean": mean, "max_abs": max(r["max_abs"] for r in rows.values()), "worst": worst}
