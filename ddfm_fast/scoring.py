"""Fuse a dataset folder and score it against the paper's reported numbers (``ddfm-fast score``).

A dataset folder holds ``ir/`` + ``vi/`` (infrared-visible fusion, IVF) or ``MRI/`` + one of ``CT/``, ``PET/``,
``SPECT/`` (medical image fusion, MIF), as ``shared/data`` lays them out (``ivf/MSRS``, ``mif/MRI_PET``); the
folder names are the roles' (``ddfm_fast.pairing.ROLES``). :func:`score_dataset` fuses it with the folder runner
of ``ddfm-fast fuse`` (:func:`ddfm_fast.runner.run_folder`: resumable, a bad pair is recorded and skipped) into
``OUT/fused/``, then scores every fused image as ``ddfm-fast eval`` does (:mod:`ddfm_fast.evaluation`), and
returns the per-image rows, their mean, and the paper's row for that dataset (METRICS.md) with the difference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

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
    write_text,
)
from ddfm_fast.metrics import METRIC_NAMES
from ddfm_fast.pairing import ROLES, InputError, Pairing, pair_sources
from ddfm_fast.plan import ExecutionPlan
from ddfm_fast.progress import BarFactory
from ddfm_fast.runner import RunConfig, run_folder
from ddfm_fast.summary import SUMMARY_NAME, RunSummary

# The six metrics the DDFM paper reports, in its column order.
PAPER_METRICS: tuple[str, ...] = ("EN", "SD", "MI", "VIF", "Qabf", "SSIM")

# DDFM (ICCV 2023) reported numbers, exactly as METRICS.md (shared/docs) lists them ("The paper's reported numbers").
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
SCORES_JSON = "scores.json"

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

    @property
    def paper(self) -> Optional[dict[str, float]]:
        return dict(PAPER_NUMBERS[self.paper_key]) if self.paper_key else None


def _subdirs(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}


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
        return DatasetLayout(key, mode, root, a_dir, b_dir, key, subset)
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

    @property
    def count(self) -> int:
        return len(self.rows)


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
    return ScoreResult(layout, fused_dir, summary, rows, mean, paper, delta, skipped)


# --------------------------------------------------------------------------------------------------- outputs


def scores_csv(result: ScoreResult) -> str:
    """``ddfm-fast eval``'s CSV (one row per image, then "mean"), plus the rows "paper" and "delta" when the
    paper reports the dataset (empty cells for the metrics it does not report)."""
    text = eval_csv(result.rows, result.mean)
    if result.paper is not None and result.delta is not None and result.rows:
        for name, row in (("paper", result.paper), ("delta", result.delta)):
            cells = [repr(float(row[k])) if k in row else "" for k in METRIC_NAMES]
            text += ",".join([name, *cells]) + "\n"
    return text


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
        **doc,
        "fusion": {"summary": str(result.fused_dir / SUMMARY_NAME), "counts": s["counts"],
                   "timing": s["timing"], "settings": s["settings"], "plan": s["plan"], "failed": s["failed"]},
    }
    return dump_json(doc)


def write_scores(result: ScoreResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/scores.csv`` and ``out_dir/scores.json`` atomically; returns their paths."""
    out = Path(out_dir)
    csv_path, json_path = out / SCORES_CSV, out / SCORES_JSON
    write_text(csv_path, scores_csv(result))
    write_text(json_path, scores_json(result))
    return csv_path, json_path
