"""Scoring fused images against their sources, and comparing two output sets: the library behind ``eval``,
``compare`` and ``score``.

Images pair by file stem (:func:`ddfm_fast.pairing.pair_by_stem`) and are read the evaluator's way
(:func:`ddfm_fast.metrics.read_gray_eval`). Problem images (unreadable, no partner, size mismatch) are
:class:`Skipped` with their reason, never fatal. Result files are written atomically.

Roles: A is the infrared (IVF) or functional CT / PET / SPECT (MIF) image, B the visible or MRI image
(``ddfm_fast.pairing.ROLES``), as the CDDFuse evaluator takes them.

Several methods at once: each :class:`Method` is a named folder of fused images scored against the same A and B
(:func:`score_methods`); :class:`MethodScores` holds one method's rows, mean and spread, and the result files
keep the per-image rows (:func:`per_image_csv`) apart from the summary (:func:`ddfm_fast.tables.summary_csv`).
What each metric rewards, and why SSIM can exceed 1, is in the repository's docs/METRICS.md (:data:`GUIDE`).
"""

from __future__ import annotations

import contextlib
import csv
import io as _stringio
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ddfm_fast.io import atomic_path
from ddfm_fast.metrics import METRIC_NAMES, ImageReadError, evaluate, read_gray_eval, structural_similarity
from ddfm_fast.pairing import Pair, Pairing, pair_by_stem, roles
from ddfm_fast.tables import SummaryRow, jsonable

Rows = dict[str, dict[str, float]]  # stem -> metric -> value

# The metrics guide, in the repository (not installed with the package); messages point at it.
GUIDE = "docs/METRICS.md"


@dataclass
class Skipped:
    """An image that was not scored, and why."""

    image: str
    reason: str


@dataclass
class Scores:
    """Per-image metrics (in stem order), their mean, and what was not scored."""

    rows: Rows
    mean: dict[str, float]
    skipped: list[Skipped] = field(default_factory=list)
    not_fused: list[str] = field(default_factory=list)  # source stems without a fused image


def skipped_of(pairing: Pairing) -> list[Skipped]:
    """The stems a pairing could not match, as skips."""
    return [Skipped(u.stem, u.reason) for u in pairing.unmatched]


def mean_of(rows: Rows, names: Iterable[str] = METRIC_NAMES) -> dict[str, float]:
    """The mean of each metric over the rows (empty when there are none)."""
    return {k: float(np.mean([r[k] for r in rows.values()])) for k in names} if rows else {}


def std_of(rows: Rows, names: Iterable[str] = METRIC_NAMES) -> dict[str, float]:
    """The spread of each metric over the rows: the population standard deviation (ddof = 0, numpy's default;
    0 for a single image), empty when there are no rows."""
    with np.errstate(invalid="ignore"):  # an infinite value (PSNR of a black image) has no spread: nan, silently
        return {k: float(np.std([r[k] for r in rows.values()])) for k in names} if rows else {}


def flat_images(rows: Rows) -> list[str]:
    """The images whose fused picture is a single grey level (SD 0): every metric of theirs is degenerate (the
    evaluator's PSNR of an all-black image is -inf), and a fusion that produced one is broken."""
    return [stem for stem, r in rows.items() if r.get("SD") == 0]


# ----------------------------------------------------------------------------------------------------- eval


def eval_labels(mode: str) -> dict[str, str]:
    """How messages name the evaluator's folders: ``fused``, ``A (infrared)``, ``B (visible)`` (or MIF's)."""
    r = roles(mode)
    return {"fused": "fused", "A": f"A ({r.ir_name})", "B": f"B ({r.vis_name})"}


def pair_for_eval(fused_dir: Path, a_dir: Path, b_dir: Path, mode: str) -> Pairing:
    """Fused images paired with their sources A and B by stem; the fused folder drives (``undriven``: sources
    without a fused image)."""
    return pair_by_stem({"fused": Path(fused_dir), "A": Path(a_dir), "B": Path(b_dir)}, driver="fused",
                        describe=eval_labels(mode))


def score_triple(files: Mapping[str, Path], variant: str = "cddfuse", crop_sources: bool = False) -> dict[str, float]:
    """The 12 metrics of ``files["fused"]`` against ``files["A"]`` and ``files["B"]``.

    ``crop_sources`` crops A and B top-left to a smaller fused image (the official driver crops its inputs to
    multiples of 32). Raises :class:`ImageReadError` or ``ValueError`` (size mismatch) naming the problem.
    """
    f, a, b = (read_gray_eval(files[k]) for k in ("fused", "A", "B"))
    if crop_sources and a.shape == b.shape and f.shape[0] <= a.shape[0] and f.shape[1] <= a.shape[1]:
        a, b = a[: f.shape[0], : f.shape[1]], b[: f.shape[0], : f.shape[1]]
    if not (f.shape == a.shape == b.shape):
        hint = "" if crop_sources else " (--crop-sources crops A and B to a smaller fused image)"
        raise ValueError(f"size mismatch: fused {f.shape[1]}x{f.shape[0]}, A {a.shape[1]}x{a.shape[0]}, "
                         f"B {b.shape[1]}x{b.shape[0]} (W x H){hint}")
    return evaluate(f, a, b, variant=variant)


def score_pairs(pairs: Iterable[Pair], variant: str = "cddfuse", crop_sources: bool = False,
                wrap: Callable[[list[Pair]], Iterable[Pair]] = list) -> tuple[Rows, list[Skipped]]:
    """:func:`score_triple` of each (fused, A, B) pair; ``wrap`` may put the list in a progress bar."""
    return measure(pairs, lambda files: score_triple(files, variant, crop_sources), wrap)


def measure(pairs: Iterable[Pair], fn: Callable[[Mapping[str, Path]], dict[str, float]],
            wrap: Callable[[list[Pair]], Iterable[Pair]] = list) -> tuple[Rows, list[Skipped]]:
    """``fn(pair.files)`` for each pair, by stem; a pair it cannot measure (unreadable, size mismatch) is skipped
    with its reason."""
    rows: Rows = {}
    skipped: list[Skipped] = []
    for pair in wrap(list(pairs)):
        try:
            rows[pair.stem] = fn(pair.files)
        except (ImageReadError, ValueError) as exc:
            skipped.append(Skipped(pair.stem, str(exc)))
    return rows, skipped


def eval_csv(rows: Rows) -> str:
    """One row per image (no summary row: that is a separate file); full precision (repr), inf as "inf"."""
    buf = _stringio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", *METRIC_NAMES])
    for name, r in rows.items():
        w.writerow([name, *(repr(float(r[k])) for k in METRIC_NAMES)])
    return buf.getvalue()


def eval_doc(scores: Scores, mode: str, variant: str, folders: Mapping[str, Path]) -> dict[str, Any]:
    """The JSON document of an evaluation (strict JSON: non-finite numbers as strings)."""
    return {
        "mode": mode,
        "variant": variant,
        "folders": {k: str(v) for k, v in folders.items()},
        "metrics": list(METRIC_NAMES),
        "count": len(scores.rows),
        "images": {n: {k: jsonable(v) for k, v in r.items()} for n, r in scores.rows.items()},
        "mean": {k: jsonable(v) for k, v in scores.mean.items()},
        "skipped": [{"image": s.image, "reason": s.reason} for s in scores.skipped],
        "not_fused": scores.not_fused,
    }


# -------------------------------------------------------------------------------------------- many methods


class MethodSpecError(ValueError):
    """A ``NAME=DIR`` method specification that cannot be used; the message names it and the problem."""


@dataclass(frozen=True)
class Method:
    """A fusion method to score: its name in the tables and the folder of its fused images."""

    name: str
    folder: Path


def parse_methods(specs: Iterable[str]) -> list[Method]:
    """``NAME=DIR`` or a bare ``DIR`` (named after its folder) per method, in the order given.

    A value that is an existing folder is taken whole (so a folder whose name holds ``=`` works bare); otherwise
    it is split at the first ``=``. Raises :class:`MethodSpecError` for a missing folder, an empty name or two
    methods of one name.
    """
    methods: list[Method] = []
    for spec in specs:
        path = Path(spec)
        if not spec.strip() or (spec.split("=", 1)[-1].strip() == "" and "=" in spec):
            # Path("") is the current folder: an empty folder part is a typo, never a request to score "."
            raise MethodSpecError(f"{spec!r}: no folder given; write NAME=DIR")
        if path.is_dir():
            name = path.resolve().name or str(path)
        elif "=" in spec:
            name, folder = spec.split("=", 1)
            name, path = name.strip(), Path(folder)
            if not name:
                raise MethodSpecError(f"{spec!r}: the name before '=' is empty; write NAME=DIR")
            if not path.is_dir():
                what = "no such folder" if not path.exists() else "not a folder"
                raise MethodSpecError(f"{spec!r}: {folder}: {what}")
        else:
            what = "no such folder" if not path.exists() else "not a folder"
            raise MethodSpecError(f"{spec}: {what} (give a folder of fused images, or NAME=DIR)")
        if any(m.name == name for m in methods):
            raise MethodSpecError(f"two methods are named {name!r}; name them apart with NAME=DIR")
        methods.append(Method(name, path))
    if not methods:
        raise MethodSpecError("no method given")
    return methods


@dataclass
class MethodScores:
    """One method's scores: per-image rows (stem order), mean and spread over them, and what was not scored."""

    method: Method
    scores: Scores
    std: dict[str, float]

    @property
    def name(self) -> str:
        return self.method.name

    def summary_row(self) -> SummaryRow:
        return SummaryRow(self.name, self.scores.mean, self.std, count=len(self.scores.rows))


Work = tuple[str, Pair]  # (method name, its pair)


def score_methods(work: Iterable[Work], variant: str = "cddfuse", crop_sources: bool = False,
                  wrap: Callable[[list[Work]], Iterable[Work]] = list
                  ) -> tuple[dict[tuple[str, str], dict[str, float]], list[tuple[str, Skipped]]]:
    """:func:`score_triple` of each (method, pair): rows keyed by (method, stem), and the pairs not scored."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    skipped: list[tuple[str, Skipped]] = []
    for name, pair in wrap(list(work)):
        try:
            rows[(name, pair.stem)] = score_triple(pair.files, variant, crop_sources)
        except (ImageReadError, ValueError) as exc:
            skipped.append((name, Skipped(pair.stem, str(exc))))
    return rows, skipped


def collect_methods(methods: list[Method], pairings: Mapping[str, Pairing],
                    rows: Mapping[tuple[str, str], dict[str, float]],
                    not_scored: Iterable[tuple[str, Skipped]]) -> list[MethodScores]:
    """Group :func:`score_methods`' results per method (rows in stem order) with the pairing's skips."""
    not_scored = list(not_scored)
    out = []
    for m in methods:
        pairing = pairings[m.name]
        mine = {p.stem: rows[(m.name, p.stem)] for p in pairing.pairs if (m.name, p.stem) in rows}
        skipped = sorted(skipped_of(pairing) + [s for n, s in not_scored if n == m.name], key=lambda s: s.image)
        out.append(MethodScores(m, Scores(mine, mean_of(mine), skipped, not_fused=pairing.undriven), std_of(mine)))
    return out


def per_image_csv(results: Iterable[MethodScores]) -> str:
    """Every scored image of every method, one row each (method, image, the 12 metrics), full precision; no
    summary rows (those are :func:`ddfm_fast.tables.summary_csv`'s)."""
    buf = _stringio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "image", *METRIC_NAMES])
    for res in results:
        for stem, r in res.scores.rows.items():
            w.writerow([res.name, stem, *(repr(float(r[k])) for k in METRIC_NAMES)])
    return buf.getvalue()


def methods_doc(results: list[MethodScores], mode: str, variant: str, a_dir: Path, b_dir: Path,
                best: Mapping[str, list[str]]) -> dict[str, Any]:
    """The JSON document of a many-method evaluation (strict JSON: non-finite numbers as strings)."""
    from ddfm_fast.tables import LOWER_IS_BETTER

    return {
        "mode": mode,
        "variant": variant,
        "guide": GUIDE,
        "folders": {"A": str(a_dir), "B": str(b_dir)},
        "metrics": list(METRIC_NAMES),
        "lower_is_better": sorted(LOWER_IS_BETTER),
        "std": "population standard deviation over the images (ddof = 0)",
        "methods": {
            res.name: {
                "folder": str(res.method.folder),
                "count": len(res.scores.rows),
                "mean": {k: jsonable(v) for k, v in res.scores.mean.items()},
                "std": {k: jsonable(v) for k, v in res.std.items()},
                "images": {n: {k: jsonable(v) for k, v in r.items()} for n, r in res.scores.rows.items()},
                "skipped": [{"image": s.image, "reason": s.reason} for s in res.scores.skipped],
                "not_fused": res.scores.not_fused,
            }
            for res in results
        },
        "best": dict(best),
    }


# -------------------------------------------------------------------------------------------------- compare


def compare_images(p1: Path, p2: Path) -> dict[str, float]:
    """PSNR (peak 255, inf when identical), SSIM (one SSIM, data range 255), max-abs and MSE of two images."""
    x, y = read_gray_eval(p1), read_gray_eval(p2)
    if x.shape != y.shape:
        raise ValueError(f"size mismatch: {x.shape[1]}x{x.shape[0]} vs {y.shape[1]}x{y.shape[0]} (W x H)")
    d = x.astype(np.float64) - y.astype(np.float64)
    m = float(np.mean(d * d))
    return {"PSNR": psnr_of_mse(m), "SSIM": structural_similarity(x, y, data_range=255.0),
            "max_abs": float(np.max(np.abs(d))), "MSE": m}


def psnr_of_mse(mse: float, peak: float = 255.0) -> float:
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def compare_summary(rows: Rows) -> dict[str, Any]:
    """The mean row (its PSNR from the mean MSE, so identical images do not make it infinite), the largest
    max-abs, and the worst image (largest MSE, then max-abs; None when every pair is identical)."""
    if not rows:
        return {"mean": {}, "max_abs": None, "worst": None}
    mse_mean = float(np.mean([r["MSE"] for r in rows.values()]))
    mean = {"PSNR": psnr_of_mse(mse_mean), "SSIM": float(np.mean([r["SSIM"] for r in rows.values()])),
            "max_abs": float(np.mean([r["max_abs"] for r in rows.values()])), "MSE": mse_mean}
    worst: Optional[str] = max(rows, key=lambda n: (rows[n]["MSE"], rows[n]["max_abs"]))
    if rows[worst]["MSE"] == 0:  # type: ignore[index]
        worst = None
    return {"mean": mean, "max_abs": max(r["max_abs"] for r in rows.values()), "worst": worst}


def worst_pairs(rows: Rows, k: int) -> list[str]:
    """The ``k`` stems that differ most (largest MSE, then max-abs, then stem), identical pairs left out."""
    differing = [n for n, r in rows.items() if r["MSE"] > 0]
    return sorted(differing, key=lambda n: (-rows[n]["MSE"], -rows[n]["max_abs"], n))[:k]


def compare_doc(dirs: tuple[Path, Path], rows: Rows, skipped: list[Skipped]) -> dict[str, Any]:
    summary = compare_summary(rows)
    return {
        "dirs": [str(d) for d in dirs],
        "count": len(rows),
        "images": {n: {k: jsonable(v) for k, v in r.items()} for n, r in rows.items()},
        "mean": {k: jsonable(v) for k, v in summary["mean"].items()},
        "max_abs": summary["max_abs"],
        "worst": summary["worst"],
        "skipped": [{"image": s.image, "reason": s.reason} for s in skipped],
    }


# --------------------------------------------------------------------------------------------------- output


def dump_json(doc: Any) -> str:
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def write_text(dest: Path, text: str) -> Path:
    """Write a text file atomically (temporary file beside it, then one rename)."""
    return write_texts({Path(dest): text})[0]


def write_texts(files: Mapping[Path, str]) -> list[Path]:
    """Write text files as one set: each to a temporary name beside it first, and only when all are written are
    they renamed, so a failure (a full disk) changes none of them. The ``OSError`` names the file, not its
    temporary name."""
    with contextlib.ExitStack() as stack:
        for dest, text in files.items():
            tmp = stack.enter_context(atomic_path(dest))
            try:
                tmp.write_text(text, encoding="utf-8", newline="")
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(dest)) from exc
    return [Path(d) for d in files]


def format_table(rows: list[tuple[str, dict[str, float]]], columns: Iterable[str], fmt: str = "{:.4f}") -> str:
    """Fixed-width text table, one line per (name, row)."""
    columns = list(columns)
    width = max([len("image")] + [len(name) for name, _ in rows])
    cells = [[fmt.format(r[c]) for c in columns] for _, r in rows]
    col_w = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(["image".ljust(width)] + [c.rjust(w) for c, w in zip(columns, col_w)])]
    for (name, _), line in zip(rows, cells):
        lines.append("  ".join([name.ljust(width)] + [v.rjust(w) for v, w in zip(line, col_w)]))
    return "\n".join(lines)
