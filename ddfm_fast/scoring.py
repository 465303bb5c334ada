"""Fuse a dataset folder and score it against the paper's reported numbers (``ddfm-fast score``).

A dataset folder holds ``ir/`` + ``vi/`` (infrared-visible fusion, IVF) or ``MRI/`` + one of ``CT/``, ``PET/``,
``SPECT/`` (medical image fusion, MIF), as ``shared/data`` lays them out (``ivf/MSRS``, ``mif/MRI_PET``); the
folder names are the roles' (``ddfm_fast.pairing.ROLES``). :func:`score_dataset` fuses it with the folder runner
of ``ddfm-fast fuse`` (:func:`ddfm_fast.runner.run_folder`: resumable, a bad pair is recorded and skipped) into
``OUT/fused/``, then scores every fused image as ``ddfm-fast eval`` does (:mod:`ddfm_fast.evaluation`), and
returns the per-image rows, their mean, and the paper's row for that dataset (docs/METRICS.md) with the
difference, and says what was compared (:class:`Comparison`: pairs, sizes, steps, prior) against the paper's
protocol, so that a few downscaled pairs at a few steps are never read as a reproduction of the paper's table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ddfm_fast.config import PAPER_STEPS
from ddfm_fast.evaluation import (
    Scores,
    Skipped,
    dump_json,
    eval_csv,
    eval_doc,
    jsonable,
    mean_of,
    pair_for_eval,
    score_pairs,
    skipped_of,
    std_of,
    write_text,
)
from ddfm_fast.metrics import METRIC_NAMES
from ddfm_fast.pairing import ROLES, InputError, Pairing, pair_sources
from ddfm_fast.tables import SummaryRow, summary_csv

if TYPE_CHECKING:  # torch, the runner and the summary load when a dataset is fused, not on import
    import torch
    from torch import nn

    from ddfm_fast.plan import ExecutionPlan
    from ddfm_fast.progress import BarFactory
    from ddfm_fast.runner import RunConfig
    from ddfm_fast.summary import RunSummary

# The six metrics the DDFM paper reports, in its column order.
PAPER_METRICS: tuple[str, ...] = ("EN", "SD", "MI", "VIF", "Qabf", "SSIM")

# DDFM (ICCV 2023) reported numbers, exactly as docs/METRICS.md lists them ("The paper's reported numbers").
PAPER_NUMBERS: dict[str, dict[str, float]] = {
    "MSRS": {"EN": 6.88, "SD": 40.75, "MI": 2.35, "VIF": 0.81, "Qabf": 0.58, "SSIM": 0.94},
    "M3FD": {"EN": 6.86, "SD": 38.95, "MI": 2.52, "VIF": 0.80, "Qabf": 0.49, "SSIM": 0.95},
    "RoadScene": {"EN": 7.41, "SD": 52.61, "MI": 2.35, "VIF": 0.75, "Qabf": 0.65, "SSIM": 0.98},
    "TNO": {"EN": 7.06, "SD": 51.42, "MI": 2.21, "VIF": 0.81, "Qabf": 0.49, "SSIM": 0.95},
    "Harvard": {"EN": 4.64, "SD": 63.11, "MI": 1.99, "VIF": 0.76, "Qabf": 0.60, "SSIM": 1.41},
    # Ablation I: RoadScene, EM only, no diffusion prior.
    "RoadScene-EM-only": {"EN": 7.19, "SD": 41.82, "MI": 2.11, "VIF": 0.60, "Qabf": 0.42, "SSIM": 0.92},
}

# What the paper's table calls each row (for messages and the JSON).
PAPER_LABELS: dict[str, str] = {
    "MSRS": "MSRS",
    "M3FD": "M3FD",
    "RoadScene": "RoadScene",
    "TNO": "TNO",
    "Harvard": "Harvard (MIF)",
    "RoadScene-EM-only": "RoadScene, EM only, no diffusion prior (ablation I)",
}

PAPER_MODES: dict[str, str] = {"MSRS": "ivf", "M3FD": "ivf", "RoadScene": "ivf", "TNO": "ivf", "Harvard": "mif",
                               "RoadScene-EM-only": "ivf"}

FUSED_DIR = "fused"
SCORES_CSV = "scores.csv"
SCORES_SUMMARY_CSV = "scores_summary.csv"
SCORES_JSON = "scores.json"

# The protocol behind the paper's rows: its whole test set of each dataset at full resolution, the official
# top-left crop to /32, 100 DDIM steps of guided-diffusion's 256x256 unconditional ADM (552.8 M parameters).
PAPER_PRIOR = "adm256-uncond"
PAPER_SIZE_POLICY = "crop"
# Image sizes (W, H) of the datasets whose images all share one size (MSRS 640x480, M3FD 1024x768, the Harvard
# atlas slices 256x256, as in shared/data); RoadScene and TNO images vary in size.
FULL_SIZES: dict[str, tuple[int, int]] = {"MSRS": (640, 480), "M3FD": (1024, 768), "Harvard": (256, 256)}

_IVF_A, _IVF_B = ROLES["ivf"].ir_folders, ROLES["ivf"].vis_folders  # infrared (A, the ir side), visible (B)
_MIF_A, _MIF_B = ROLES["mif"].ir_folders, ROLES["mif"].vis_folders  # functional CT/PET/SPECT (A), MRI (B)


class DatasetError(ValueError):
    """The folder is not a dataset folder (or the dataset name is unknown); the message says what was expected."""


class DatasetNameError(DatasetError):
    """The dataset name (``--dataset``) is unknown or does not fit the folder's layout."""


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_ALIASES: dict[str, str] = {_norm(k): k for k in PAPER_NUMBERS}
_ALIASES.update({_norm("Harvard (MIF)"): "Harvard", "mif": "Harvard", "harvardmedical": "Harvard",
                 _norm("RoadScene EM only"): "RoadScene-EM-only", "roadsceneemonlyablationi": "RoadScene-EM-only",
                 "emonly": "RoadScene-EM-only"})


def paper_key(name: str) -> Optional[str]:
    """The :data:`PAPER_NUMBERS` key for a dataset name (case, spaces and punctuation ignored), or None."""
    return _ALIASES.get(_norm(name))


@dataclass(frozen=True)
class DatasetLayout:
    """A dataset folder: its name (a :data:`PAPER_NUMBERS` key when the paper reports it), mode and source folders.

    ``a_dir`` is the infrared (ivf) or functional CT/PET/SPECT (mif) folder, the fuse runner's ``ir`` side and
    the evaluator's A; ``b_dir`` is the visible (ivf) or MRI (mif) folder, the ``vis`` side and B.
    """

    name: str
    mode: str
    root: Path
    a_dir: Path
    b_dir: Path
    paper_key: Optional[str]
    subset: Optional[str] = None  # mif: "MRI_PET" etc.
    named_by: Optional[str] = None  # the --dataset name when the data set was named by it, not by the folder

    @property
    def paper(self) -> Optional[dict[str, float]]:
        return dict(PAPER_NUMBERS[self.paper_key]) if self.paper_key else None


def _subdirs(folder: Path) -> dict[str, Path]:
    """Subfolders by lower-cased name; two that differ only in case (``ir/`` and ``IR/``) are an error, since
    which one a case-insensitive match would take is a guess."""
    subs: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            twin = subs.setdefault(p.name.lower(), p)
            if twin != p:
                raise DatasetError(f"{folder}: holds both {twin.name}/ and {p.name}/; folder names are matched "
                                   "regardless of case, so keep one of them")
    return subs


def _find(subs: dict[str, Path], names: tuple[str, ...]) -> list[Path]:
    return [subs[n.lower()] for n in names if n.lower() in subs]


def dataset_layout(folder: str | Path, dataset: Optional[str] = None) -> DatasetLayout:
    """Detect a dataset folder's mode and name.

    ``ir/`` + ``vi/`` is ivf; ``MRI/`` + exactly one of ``CT/``, ``PET/``, ``SPECT/`` is mif (folder names are
    matched case-insensitively). The name comes from ``dataset`` when given (a :data:`PAPER_NUMBERS` key or
    alias, else :class:`DatasetError`), otherwise from the folder: mif folders are the Harvard set; an ivf folder
    named like a paper dataset (``.../ivf/MSRS``) is that dataset; any other ivf folder keeps its own name and
    has no paper row. Raises :class:`DatasetError` for a folder that is not a dataset folder.
    """
    root = Path(folder)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; give a dataset folder holding ir/ + vi/ or MRI/ + CT|PET|SPECT/")
    subs = _subdirs(root)
    ivf_a, ivf_b = _find(subs, _IVF_A), _find(subs, _IVF_B)
    mif_a, mif_b = _find(subs, _MIF_A), _find(subs, _MIF_B)
    is_ivf = bool(ivf_a and ivf_b)
    is_mif = bool(mif_a and mif_b)
    if is_ivf and is_mif:
        raise DatasetError(f"{root}: holds both an infrared-visible layout (ir/, vi/) and a medical one (MRI/, "
                           f"{'/, '.join(p.name for p in mif_a)}/); keep one of them")
    if not is_ivf and not is_mif:
        found = ", ".join(f"{p.name}/" for p in subs.values()) or "no subfolders"
        hint = ""
        nested = [p.name for p in subs.values() if _looks_like_dataset(p)]
        if nested:
            hint = f"; it holds dataset folders ({', '.join(nested)}): pass one of them"
        raise DatasetError(
            f"{root}: not a dataset folder: expected ir/ + vi/ (infrared-visible fusion) or MRI/ + one of CT/, "
            f"PET/, SPECT/ (medical fusion); found {found}{hint}"
        )
    if is_ivf and len(ivf_b) > 1:
        raise DatasetError(f"{root}: holds both vi/ and vis/; keep one visible folder")
    if is_mif and len(mif_a) > 1:
        raise DatasetError(f"{root}: holds several functional folders ({', '.join(p.name + '/' for p in mif_a)}) "
                           "beside MRI/; a dataset folder pairs MRI/ with one of CT/, PET/, SPECT/ "
                           "(as mif/MRI_CT, mif/MRI_PET, mif/MRI_SPECT)")
    mode = "ivf" if is_ivf else "mif"
    a_dir, b_dir = (ivf_a[0], ivf_b[0]) if is_ivf else (mif_a[0], mif_b[0])
    subset = f"{b_dir.name}_{a_dir.name}" if mode == "mif" else None

    if dataset is not None:
        key = paper_key(dataset)
        if key is None:
            known = ", ".join(PAPER_NUMBERS)
            raise DatasetNameError(f"unknown dataset name {dataset!r}; the paper reports: {known}")
        if PAPER_MODES[key] != mode:
            raise DatasetNameError(f"dataset {key} is {PAPER_MODES[key]} fusion but {root} has a {mode} layout")
        return DatasetLayout(key, mode, root, a_dir, b_dir, key, subset, named_by=dataset)
    if mode == "mif":
        return DatasetLayout("Harvard", mode, root, a_dir, b_dir, "Harvard", subset)
    key = paper_key(root.name)
    if key is not None and PAPER_MODES[key] == "ivf":
        return DatasetLayout(key, mode, root, a_dir, b_dir, key)
    return DatasetLayout(root.name, mode, root, a_dir, b_dir, None)


def _looks_like_dataset(folder: Path) -> bool:
    try:
        subs = _subdirs(folder)
    except OSError:
        return False
    return bool((_find(subs, _IVF_A) and _find(subs, _IVF_B)) or (_find(subs, _MIF_A) and _find(subs, _MIF_B)))


def detect_dataset(folder: str | Path, dataset: Optional[str] = None) -> tuple[str, str]:
    """(name, mode) of a dataset folder: ``.../ivf/MSRS`` -> ("MSRS", "ivf"), ``.../mif/MRI_PET`` ->
    ("Harvard", "mif"); ``dataset`` overrides the name. See :func:`dataset_layout`."""
    layout = dataset_layout(folder, dataset)
    return layout.name, layout.mode


# --------------------------------------------------------------------------------------------------- scoring


@dataclass
class ScoreResult:
    """What :func:`score_dataset` did: the fusion run's summary and the scores."""

    layout: DatasetLayout
    fused_dir: Path
    summary: RunSummary
    rows: dict[str, dict[str, float]]  # stem -> the 12 metrics
    mean: dict[str, float]  # the 12 metrics averaged over ``rows`` (empty when nothing was scored)
    paper: Optional[dict[str, float]]  # the paper's six numbers for the dataset, None when it reports none
    delta: Optional[dict[str, float]]  # mean - paper over the six
    skipped: list[Skipped] = field(default_factory=list)  # pairs not scored (fusion failed, unreadable, ...)
    variant: str = "cddfuse"
    std: dict[str, float] = field(default_factory=dict)  # population std of the 12 metrics over ``rows``
    comparison: Optional["Comparison"] = None  # what was compared, against the paper's protocol

    @property
    def count(self) -> int:
        return len(self.rows)

    def summary_rows(self) -> list[SummaryRow]:
        """mean ± std, and the paper's row and the delta when the paper reports the dataset (not ranked)."""
        rows = [SummaryRow("mean", self.mean, self.std, count=self.count)] if self.rows else []
        if rows and self.paper is not None and self.delta is not None:
            rows += [SummaryRow(f"paper {self.layout.paper_key}", self.paper, ranked=False),
                     SummaryRow("delta", self.delta, ranked=False)]
        return rows


@dataclass(frozen=True)
class Comparison:
    """What a score run compared, and how that differs from the protocol behind the paper's row.

    ``differences`` is empty only for a run of the paper's protocol (its prior, 100 steps, the crop policy, images
    of the dataset's full size where that is known); ``limited`` says that fewer pairs than the folder holds
    were scored.
    """

    dataset: str
    pairs: int
    folder_pairs: int
    sizes: tuple[str, ...]  # the scored images' sizes, "WxH", most frequent first
    steps: int  # DDIM steps, or EM iterations when ``prior`` is "none"
    prior: str
    size_policy: str
    paper_row: Optional[str]
    differences: tuple[str, ...]

    @property
    def limited(self) -> bool:
        return self.pairs < self.folder_pairs

    def lines(self) -> list[str]:
        """Two or three lines for the terminal: this run, the paper's protocol, and the differences."""
        sizes = ", ".join(self.sizes[:4]) + (f" and {len(self.sizes) - 4} more sizes" if len(self.sizes) > 4 else "")
        of = f" of the folder's {self.folder_pairs}" if self.limited else ""
        steps = f"EM only, {self.steps} iterations" if self.prior == "none" else f"{self.steps} steps of {self.prior}"
        out = [f"compared: {self.pairs} pair(s){of} of {self.dataset}, {sizes or 'no image'}, {steps}, "
               f"size policy {self.size_policy}"]
        if self.paper_row is not None:
            full = FULL_SIZES.get(self.paper_row.split(",")[0].split(" (")[0])
            at = f" ({full[0]}x{full[1]})" if full else ""
            how = "EM only (no diffusion prior)" if self.prior_is_em_row else f"{PAPER_STEPS} steps of {PAPER_PRIOR}"
            out.append(f"the paper's row: its whole {self.paper_row} test set at full resolution{at}, {how}, "
                       f"size policy {PAPER_SIZE_POLICY}")
            if self.differences:
                out.append("not the paper's protocol: " + "; ".join(self.differences)
                           + ": read the delta as a sanity check, not as a reproduction")
        return out

    @property
    def prior_is_em_row(self) -> bool:
        return bool(self.paper_row and "EM only" in self.paper_row)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "pairs": self.pairs, "folder_pairs": self.folder_pairs,
                "sizes": list(self.sizes), "steps": self.steps, "prior": self.prior,
                "size_policy": self.size_policy, "paper_row": self.paper_row,
                "paper_protocol": {"steps": PAPER_STEPS, "prior": PAPER_PRIOR, "size_policy": PAPER_SIZE_POLICY,
                                   "pairs": "the whole test set", "full_size": FULL_SIZES.get(self.dataset)},
                "differences": list(self.differences)}


def _image_sizes(paths: list[Path]) -> tuple[str, ...]:
    """The "WxH" sizes of image files from their headers, most frequent first (unreadable files left out)."""
    from collections import Counter

    from PIL import Image

    counts: Counter[str] = Counter()
    for path in paths:
        try:
            with Image.open(path) as im:
                counts[f"{im.width}x{im.height}"] += 1
        except (OSError, ValueError):
            continue
    return tuple(size for size, _ in counts.most_common())


def compare_with_paper(layout: DatasetLayout, run: RunConfig, pairs: int, folder_pairs: int,
                       sizes: tuple[str, ...]) -> Comparison:
    """How a score run (``run`` with its steps resolved) differs from the protocol of the paper's row."""
    sampler = run.sampler
    prior = "none" if sampler.prior == "none" else _prior_name(run.checkpoint)
    steps = sampler.num_steps()  # DDIM steps, or EM iterations for prior "none"
    paper_row = PAPER_LABELS.get(layout.paper_key) if layout.paper_key else None
    diffs: list[str] = []
    if paper_row is not None:
        em_row = layout.paper_key == "RoadScene-EM-only"
        if prior == "none" and not em_row:
            diffs.append(f"EM only, no diffusion prior (the paper: {PAPER_PRIOR})")
        elif prior != "none" and em_row:
            diffs.append(f"prior {prior} (the paper's ablation I uses none: EM only)")
        elif prior != "none" and prior != PAPER_PRIOR:
            diffs.append(f"prior {prior} (the paper: {PAPER_PRIOR}, 552.8 M parameters)")
        if prior != "none" and steps is not None and steps != PAPER_STEPS:
            diffs.append(f"{steps} steps (the paper: {PAPER_STEPS})")
        if prior == "none" and em_row and steps is not None and steps != PAPER_STEPS:
            diffs.append(f"{steps} EM iterations (the paper's loop: {PAPER_STEPS})")
        if layout.named_by is not None:
            wanted = _base_dataset(layout.paper_key)
            found = "Harvard" if layout.mode == "mif" else _base_dataset(paper_key(layout.root.name))
            if found != wanted:
                diffs.append(f"the folder {layout.root.name}/ is {found}, not {wanted} (named by --dataset)"
                             if found is not None else
                             f"the folder's name ({layout.root.name}) does not say it is {wanted}; the data set "
                             "was named by --dataset, not recognised")
        if pairs < folder_pairs:
            diffs.append(f"a subset: {pairs} of the folder's {folder_pairs} pairs")
        full = FULL_SIZES.get(layout.paper_key or "")
        if full is not None:
            small = [s for s in sizes if tuple(int(v) for v in s.split("x")) != full]
            if small:
                diffs.append(f"images {', '.join(small[:3])}, not the dataset's {full[0]}x{full[1]} "
                             "(downscaled or cropped)")
        if sampler.size_policy != PAPER_SIZE_POLICY:
            diffs.append(f"size policy {sampler.size_policy} (the paper crops to /32)")
    return Comparison(layout.name, pairs, folder_pairs, sizes, steps, prior, sampler.size_policy, paper_row,
                      tuple(diffs))


def _base_dataset(key: Optional[str]) -> Optional[str]:
    """The data set a paper row is measured on (the ablation row is RoadScene's)."""
    return "RoadScene" if key == "RoadScene-EM-only" else key


def _prior_name(checkpoint: Optional[str]) -> str:
    """A checkpoint as a short name: a preset's name, a file's name; None is the shipped prior."""
    from ddfm_fast.config import DEFAULT_PRIOR

    if checkpoint is None:
        return DEFAULT_PRIOR
    path = Path(checkpoint).expanduser()
    return path.name if path.is_file() else checkpoint


def dataset_pairs(layout: DatasetLayout, limit: Optional[int] = None) -> Pairing:
    """The source pairs of a dataset folder (the first ``limit``); raises :class:`InputError` when there are
    none (a folder without images, or no stem in both)."""
    pairing = pair_sources(layout.a_dir, layout.b_dir, layout.mode).limit(limit)
    if not pairing.pairs and not pairing.ambiguous:
        raise InputError(f"no pairs: no file stem appears in both {layout.a_dir} and {layout.b_dir} "
                         f"({len(pairing.unpaired)} unpaired images); files are paired by their name without "
                         "extension")
    return pairing


def score_dataset(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    model: Optional[nn.Module],
    run: RunConfig,
    device: torch.device,
    plan: Optional[ExecutionPlan] = None,
    dataset: Optional[str] = None,
    limit: Optional[int] = None,
    overwrite: bool = False,
    extra_settings: Optional[dict[str, Any]] = None,
    bar: Optional[BarFactory] = None,
    step_bar: Optional[BarFactory] = None,
    layout: Optional[DatasetLayout] = None,
    pairing: Optional[Pairing] = None,
) -> ScoreResult:
    """Fuse a dataset folder into ``out_dir/fused/`` and score the fused images.

    Fusion is :func:`ddfm_fast.runner.run_folder` (existing outputs are kept unless ``overwrite``: resume, after
    its settings check; it writes ``out_dir/fused/ddfm_summary.json``); ``run.mode`` is set to the detected mode
    and the output must be the official gray PNG. Scoring is ``ddfm-fast eval``'s (the ``cddfuse`` metrics; with
    the crop size policy the sources are cropped top-left to the fused size, as the paper does). Only the pairs
    of this run (the first ``limit``) are scored, also when ``fused/`` holds more outputs of an earlier run.
    ``layout`` / ``pairing`` skip the detection and pairing when the caller did them already. Raises
    :class:`DatasetError` for a folder that is not a dataset, :class:`~ddfm_fast.pairing.InputError` for empty
    source folders or outputs of other settings.
    """
    from ddfm_fast.runner import run_folder

    if layout is None:
        layout = dataset_layout(dataset_dir, dataset)
    if run.output != "gray":
        raise ValueError(f"scores are computed on the official gray output, not {run.output!r}")
    if run.mode != layout.mode:
        run = dataclasses.replace(run, mode=layout.mode)
    pairing = dataset_pairs(layout, limit) if pairing is None else pairing.limit(limit)
    r = run.roles
    fused_dir = Path(out_dir) / FUSED_DIR
    summary = run_folder(model, pairing, fused_dir, run, device=device, plan=plan, overwrite=overwrite,
                         extra_settings=extra_settings, inputs={r.ir: str(layout.a_dir), r.vis: str(layout.b_dir)},
                         bar=bar, step_bar=step_bar)

    wanted = {p.stem for p in pairing.pairs}
    failed = {rec["stem"]: rec["reason"] for rec in summary.failed}
    skipped = [Skipped(stem, f"not fused: {reason}") for stem, reason in failed.items()]
    fused = pair_for_eval(fused_dir, layout.a_dir, layout.b_dir, layout.mode) if summary.done or summary.skipped \
        else Pairing([])
    skipped += [s for s in skipped_of(fused) if s.image in wanted and s.image not in failed]
    todo = [p for p in fused.pairs if p.stem in wanted and p.stem not in failed]
    rows, not_scored = score_pairs(todo, "cddfuse", crop_sources=run.sampler.size_policy == "crop")
    skipped += not_scored
    seen = set(rows) | {s.image for s in skipped}
    skipped += [Skipped(stem, "no fused image") for stem in sorted(wanted - seen)]
    skipped.sort(key=lambda s: s.image)

    mean = mean_of(rows)
    paper = layout.paper
    delta = {k: mean[k] - paper[k] for k in PAPER_METRICS} if (paper and mean) else None
    scored = [p.files["fused"] for p in todo if p.stem in rows]
    folder_pairs = len(pair_sources(layout.a_dir, layout.b_dir, layout.mode).pairs)
    comparison = compare_with_paper(layout, run.for_model(model), len(rows), max(folder_pairs, len(rows)),
                                    _image_sizes(scored))
    return ScoreResult(layout, fused_dir, summary, rows, mean, paper, delta, skipped, std=std_of(rows),
                       comparison=comparison)


# --------------------------------------------------------------------------------------------------- outputs


def summary_name() -> str:
    """The folder run's summary file name (``ddfm_fast.summary.SUMMARY_NAME``)."""
    from ddfm_fast.summary import SUMMARY_NAME

    return SUMMARY_NAME


def scores_csv(result: ScoreResult) -> str:
    """``ddfm-fast eval``'s per-image CSV: one row per image, no summary rows (see :func:`scores_summary_csv`)."""
    return eval_csv(result.rows)


def scores_summary_csv(result: ScoreResult) -> str:
    """The summary in full precision: "mean" (with the std columns and the count), then "paper <set>" and
    "delta" when the paper reports the dataset (empty cells for the metrics it does not report)."""
    return summary_csv(result.summary_rows(), METRIC_NAMES)


def scores_json(result: ScoreResult) -> str:
    """``ddfm-fast eval``'s JSON document, plus the dataset, the paper's row, the delta and the fusion counts."""
    lay = result.layout
    scores = Scores(result.rows, result.mean, result.skipped, not_fused=[rec["stem"] for rec in result.summary.failed])
    doc = eval_doc(scores, lay.mode, result.variant, {"fused": result.fused_dir, "A": lay.a_dir, "B": lay.b_dir})
    s = result.summary.to_dict()
    doc = {
        "dataset": lay.name,
        "dataset_dir": str(lay.root),
        "subset": lay.subset,
        "paper_row": PAPER_LABELS.get(lay.paper_key) if lay.paper_key else None,
        "paper_metrics": list(PAPER_METRICS),
        "paper": result.paper,
        "delta": None if result.delta is None else {k: jsonable(v) for k, v in result.delta.items()},
        "compared": None if result.comparison is None else result.comparison.to_dict(),
        "guide": "docs/METRICS.md",
        **doc,
        "std": {k: jsonable(v) for k, v in result.std.items()},
        "fusion": {"summary": str(result.fused_dir / summary_name()), "counts": s["counts"],
                   "timing": s["timing"], "settings": s["settings"], "plan": s["plan"], "failed": s["failed"]},
    }
    return dump_json(doc)


def write_scores(result: ScoreResult, out_dir: str | Path) -> tuple[Path, Path, Path]:
    """Write ``out_dir/scores.csv`` (per image), ``scores_summary.csv`` and ``scores.json`` atomically; returns
    their paths."""
    out = Path(out_dir)
    csv_path, summary_path, json_path = out / SCORES_CSV, out / SCORES_SUMMARY_CSV, out / SCORES_JSON
    write_text(csv_path, scores_csv(result))
    write_text(summary_path, scores_summary_csv(result))
    write_text(json_path, scores_json(result))
    return csv_path, summary_path, json_path
