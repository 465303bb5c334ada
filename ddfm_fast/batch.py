"""Runs over many pairs: pairing by file stem, per-pair preparation and outputs, resume, and the run summary.

Shared by ``ddfm-fast fuse`` and any other driver (a torchrun launcher, a notebook): nothing here knows about
click. A run is: :func:`pair_folders` (or one :class:`Pair`), a loaded model, one :class:`RunSettings`, then
:func:`run_folder` (or :func:`run_single`). A bad pair never stops a folder run: its reason goes to the summary.

Roles (``DESIGN.md``): the ``ir`` side of a pair is the infrared image (IVF) or the functional CT/PET/SPECT image
(MIF) and becomes the EM step's ``V``; the ``vis`` side is the visible image (IVF) or the MRI image (MIF) and
becomes ``I``. Colour output takes the chroma of the visible image (IVF) or of the functional image (MIF).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ddfm_fast import api, io
from ddfm_fast.config import DTYPE_NAMES, AccelConfig, SamplerConfig
from ddfm_fast.sampler import StepOutput
from ddfm_fast.schedule import NUM_TRAIN_TIMESTEPS, Respacing, space_timesteps

OutputKind = Literal["gray", "color", "png16", "npy"]
OUTPUT_KINDS: tuple[str, ...] = ("gray", "color", "png16", "npy")
SUMMARY_NAME = "ddfm_summary.json"
SUMMARY_SCHEMA = 1
PROGRESS_GIF = "diffusion.gif"
_PROGRESS_FRAME = re.compile(r"^x_\d{4,}\.png$")


class InputError(ValueError):
    """A folder or file given to a run cannot be used (missing, empty, no pairs); the message names it."""


class PairError(ValueError):
    """One pair cannot be fused (unreadable file, size mismatch, too small); the message names the files."""


# --------------------------------------------------------------------------------------------------- roles


@dataclass(frozen=True)
class Roles:
    """What the two sides of a pair are called in a fusion mode, and which side gives the colour."""

    mode: str
    ir: str  # the side that becomes V: infrared / functional
    vis: str  # the side that becomes I: visible / MRI
    ir_long: str
    vis_long: str
    color_side: Literal["ir", "vis"]


ROLES: dict[str, Roles] = {
    "ivf": Roles("ivf", "ir", "vis", "infrared image", "visible image", color_side="vis"),
    "mif": Roles("mif", "func", "mri", "functional (CT/PET/SPECT) image", "MRI image", color_side="ir"),
}


def roles(mode: str) -> Roles:
    if mode not in ROLES:
        raise ValueError(f"mode must be one of {', '.join(ROLES)}, got {mode!r}")
    return ROLES[mode]


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RunSettings:
    """Everything that decides what a run writes (the summary stores it; resume compares it).

    ``resize``: ``None`` (a size mismatch is an error), ``"ir"`` (resize the vis side to the ir side's size) or
    ``"vis"`` (resize the ir side to the vis side's size), with Pillow's LANCZOS filter.
    """

    mode: str = "ivf"
    steps: Optional[Respacing] = None
    seed: int = 3407
    size_policy: io.SizePolicy = "pad"
    lamb: float = 0.5
    rho: float = 0.001
    backend: str = "auto"
    output: OutputKind = "gray"
    resize: Optional[Literal["ir", "vis"]] = None
    batch_size: int = 1
    prior: str = "diffusion"
    tv_prox: str = "shrink"
    tv_threshold: Optional[float] = None
    # Accelerations (ddfm_fast.fast.FastOptions); all off is the faithful fp32 sampler.
    dtype: str = "fp32"
    compile: bool = False
    compile_mode: str = "default"
    cuda_graphs: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        roles(self.mode)
        if self.prior not in ("diffusion", "none"):
            raise ValueError(f"prior must be 'diffusion' or 'none', got {self.prior!r}")
        self.fast_options()  # validates dtype and compile_mode
        if self.output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {', '.join(OUTPUT_KINDS)}, got {self.output!r}")
        if self.resize not in (None, "ir", "vis"):
            raise ValueError(f"resize must be None, 'ir' or 'vis', got {self.resize!r}")
        if self.size_policy not in ("pad", "crop"):
            raise ValueError(f"size_policy must be 'pad' or 'crop', got {self.size_policy!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    @property
    def roles(self) -> Roles:
        return roles(self.mode)

    @property
    def suffix(self) -> str:
        """The output file suffix: ``.npy`` for raw npy output, else ``.png``."""
        return ".npy" if self.output == "npy" else ".png"

    def fast_options(self) -> AccelConfig:
        """The accelerations asked for."""
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        return AccelConfig(dtype=self.dtype, channels_last=self.channels_last, compile=self.compile,
                           compile_mode=self.compile_mode, cuda_graphs=self.cuda_graphs, backend=self.backend)

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(prior=self.prior, steps=self.steps, seed=self.seed, lamb=self.lamb, rho=self.rho,
                             tv_prox=self.tv_prox, tv_threshold=self.tv_threshold, size_policy=self.size_policy)

    def fuse_kwargs(self) -> dict[str, Any]:
        return dict(config=self.sampler_config(), accel=self.fast_options())

    def num_steps(self, model: nn.Module) -> int:
        """How many steps a run makes with ``model`` (``steps=None`` means the model's default)."""
        return self.sampler_config().for_model(getattr(model, "default_steps", None)).num_steps()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = self.steps if isinstance(self.steps, (int, str, type(None))) else list(self.steps)
        return d


# --------------------------------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class Pair:
    """One pair of source files; ``stem`` names the output (``<stem>.png``)."""

    stem: str
    ir: Path
    vis: Path


@dataclass
class Pairing:
    """The pairs found in two folders, sorted by stem, and what could not be paired (with reasons)."""

    pairs: list[Pair]
    unpaired: list[dict[str, str]] = field(default_factory=list)
    ambiguous: list[dict[str, str]] = field(default_factory=list)  # a stem held by two files of one folder
    ignored: list[str] = field(default_factory=list)  # files that are not images by their suffix


def _list_folder(folder: Path, label: str) -> tuple[dict[str, list[Path]], list[str]]:
    if not folder.exists():
        raise InputError(f"{label} folder {folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{label} folder {folder}: not a folder")
    by_stem: dict[str, list[Path]] = {}
    ignored: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue  # hidden files (.DS_Store, our own .part files) and subfolders
        if path.suffix.lower() in io.IMAGE_SUFFIXES:
            by_stem.setdefault(path.stem, []).append(path)
        else:
            ignored.append(str(path))
    if not by_stem:
        kinds = ", ".join(io.IMAGE_SUFFIXES)
        raise InputError(f"{label} folder {folder}: holds no images ({kinds})")
    return by_stem, ignored


def pair_folders(ir_dir: Path, vis_dir: Path, mode: str = "ivf") -> Pairing:
    """Pair the images of two folders by file stem (the extension may differ, e.g. ``a.png`` with ``a.jpg``).

    Raises :class:`InputError` for a missing or empty folder. Files without a partner are listed in
    ``unpaired``; a stem that two files of one folder share (``a.png`` and ``a.jpg``) is listed in ``ambiguous``.
    """
    r = roles(mode)
    ir_files, ir_ignored = _list_folder(Path(ir_dir), r.ir)
    vis_files, vis_ignored = _list_folder(Path(vis_dir), r.vis)
    pairing = Pairing(pairs=[], ignored=ir_ignored + vis_ignored)
    for stem in sorted(set(ir_files) | set(vis_files)):
        a, b = ir_files.get(stem, []), vis_files.get(stem, [])
        if not a or not b:
            other, folder = (r.vis, vis_dir) if a else (r.ir, ir_dir)
            for path in a or b:
                pairing.unpaired.append({"file": str(path),
                                         "reason": f"no {other} image with stem '{stem}' in {folder}"})
            continue
        if len(a) > 1 or len(b) > 1:
            many = a if len(a) > 1 else b
            pairing.ambiguous.append({
                "stem": stem,
                "reason": f"{len(many)} files share the stem '{stem}': {', '.join(p.name for p in many)}; "
                          "keep one of them",
            })
            continue
        pairing.pairs.append(Pair(stem, a[0], b[0]))
    return pairing


# --------------------------------------------------------------------------------------------------- one pair


@dataclass
class Prepared:
    """A pair read, checked and resized: what :func:`api.fuse` and the output writer need."""

    pair: Pair
    ir: np.ndarray  # (H, W) float32 gray in [0, 1]
    vis: np.ndarray
    color_source: Optional[np.ndarray]  # (H, W, 3) uint8, only for colour output
    out_hw: tuple[int, int]  # the output size after the size policy
    model_hw: tuple[int, int]  # the size the model sees (pairs of equal model_hw can share a batch)
    resized: Optional[str] = None  # which side was resized, with the sizes, for the summary


def _size(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}"


def output_size(hw: tuple[int, int], size_policy: io.SizePolicy, multiple: int = io.SIZE_MULTIPLE) -> tuple[int, int]:
    """(H, W) of the output for an input of ``hw``: unchanged for ``pad``, floored to ``multiple`` for ``crop``."""
    h, w = hw
    if size_policy == "crop":
        return h - h % multiple, w - w % multiple
    return h, w


def prepare(pair: Pair, settings: RunSettings) -> Prepared:
    """Read a pair, check it, resize if asked; raises :class:`PairError` naming the files and the problem."""
    r = settings.roles
    try:
        ir = io.read_gray(pair.ir)
        vis = io.read_gray(pair.vis)
        color = None
        if settings.output == "color":
            color = io.read_rgb8(pair.vis if r.color_side == "vis" else pair.ir)
    except io.ImageReadError as exc:
        raise PairError(str(exc)) from exc
    resized = None
    if ir.shape != vis.shape:
        if settings.resize is None:
            raise PairError(
                f"the two images differ in size: {r.ir} {pair.ir} is {_size(ir)}, {r.vis} {pair.vis} is "
                f"{_size(vis)} (width x height); resize one to the other (--resize-to-{r.ir} / "
                f"--resize-to-{r.vis}, resize='ir'|'vis' in the API) or fix the inputs"
            )
        if settings.resize == "ir":  # the vis side takes the ir side's size
            resized = f"{r.vis} {_size(vis)} -> {_size(ir)}"
            vis = io.resize_gray(vis, ir.shape)
            if color is not None and r.color_side == "vis":
                color = io.resize_rgb8(color, ir.shape)
        else:
            resized = f"{r.ir} {_size(ir)} -> {_size(vis)}"
            ir = io.resize_gray(ir, vis.shape)
            if color is not None and r.color_side == "ir":
                color = io.resize_rgb8(color, vis.shape)
    h, w = ir.shape
    m = io.SIZE_MULTIPLE
    if settings.size_policy == "crop" and (h < m or w < m):
        raise PairError(f"{pair.ir}, {pair.vis}: {w}x{h} is smaller than {m} px on a side; use size policy 'pad'")
    out_hw = output_size((h, w), settings.size_policy)
    model_hw = out_hw if settings.size_policy == "crop" else (h + (-h) % m, w + (-w) % m)
    return Prepared(pair, ir, vis, color, out_hw, model_hw, resized)


def output_array(result: api.FusionResult, prepared: Prepared, output: OutputKind) -> np.ndarray:
    """The array an output file holds: 8-bit gray (official), 8-bit RGB, 16-bit raw luminance, or float32."""
    if output == "gray":
        return result.fused
    if output == "color":
        h, w = result.size
        assert prepared.color_source is not None, "colour output needs the colour source (prepare with output='color')"
        return io.colorize(result.fused, prepared.color_source[:h, :w])
    if output == "png16":
        return io.luma_to_uint16(result.luma)
    if output == "npy":
        return io.luma_to_unit(result.luma)
    raise ValueError(f"unknown output kind {output!r}")


def write_output(array: np.ndarray, dest: Path, output: OutputKind) -> Path:
    """Write one output atomically (temporary file + rename)."""
    return io.save_npy(array, dest) if output == "npy" else io.save_png(array, dest)


def fuse_prepared(
    model: nn.Module, batch: Sequence[Prepared], settings: RunSettings, device: torch.device,
    callback: Optional[Callable[[StepOutput], None]] = None,
) -> list[api.FusionResult]:
    """Fuse prepared pairs through :func:`api.fuse` (one batch per model size, one EM tau per image)."""
    results = api.fuse([p.ir for p in batch], [p.vis for p in batch], model=model, device=device,
                       callback=callback, **settings.fuse_kwargs())
    return list(results)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- progress images


class ProgressRecorder:
    """The official ``record=True`` images of one pair: per step, Y of x0' min-max scaled and truncated to uint8,
    written as ``x_<idx:04d>.png`` (idx = N-1 ... 0, as the official driver names them), then one looping
    ``diffusion.gif`` of all steps. Frames are cropped to the output size first (no padding in the images).
    """

    def __init__(self, folder: Path, out_hw: tuple[int, int]) -> None:
        self.folder = Path(folder)
        self.out_hw = out_hw
        self.frames: list[np.ndarray] = []
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"progress folder {self.folder}: exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.iterdir():  # frames of an earlier run (maybe with more steps) would mix in
            if _PROGRESS_FRAME.match(old.name) or old.name == PROGRESS_GIF:
                old.unlink()

    def __call__(self, out: StepOutput) -> None:
        h, w = self.out_hw
        frame = io.to_uint8_truncated(io.sample_luma(out.pred_xstart[0:1, :, :h, :w]))
        io.save_png(frame, self.folder / f"x_{out.idx:04d}.png")
        self.frames.append(frame)

    def finish(self) -> Path:
        return io.save_gif(self.frames, self.folder / PROGRESS_GIF)


# --------------------------------------------------------------------------------------------------- summary


def versions() -> dict[str, Optional[str]]:
    """Versions of ddfm-fast and what it runs on (triton: None when it is not installed)."""
    import ddfm_fast

    def dist(name: str) -> Optional[str]:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    triton = dist("triton") if importlib.util.find_spec("triton") is not None else None
    return {
        "ddfm_fast": ddfm_fast.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": dist("pillow"),
        "platform": platform.platform(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunSummary:
    """What a folder run did; written as ``OUTDIR/ddfm_summary.json``."""

    settings: dict[str, Any]
    inputs: dict[str, str]
    output_dir: str
    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    unpaired: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: str = field(default_factory=_now)
    finished: Optional[str] = None
    complete: bool = False
    wall_s: float = 0.0
    fusion_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no pair failed (unpaired files alone do not fail a run)."""
        return not self.failed

    @property
    def images_per_s(self) -> Optional[float]:
        return len(self.done) / self.fusion_s if self.done and self.fusion_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SUMMARY_SCHEMA,
            "complete": self.complete,
            "started": self.started,
            "finished": self.finished,
            "counts": {
                "pairs": len(self.done) + len(self.skipped) + len(self.failed),
                "done": len(self.done),
                "skipped": len(self.skipped),
                "failed": len(self.failed),
                "unpaired": len(self.unpaired),
                "ignored": len(self.ignored),
            },
            "timing": {
                "wall_s": round(self.wall_s, 3),
                "fusion_s": round(self.fusion_s, 3),
                "images_per_s": None if self.images_per_s is None else round(self.images_per_s, 4),
            },
            "inputs": self.inputs,
            "output_dir": self.output_dir,
            "settings": self.settings,
            "versions": versions(),
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "unpaired": self.unpaired,
            "ignored": self.ignored,
            "warnings": self.warnings,
        }

    def write(self, out_dir: Path) -> Path:
        return io.save_json(self.to_dict(), Path(out_dir) / SUMMARY_NAME)


# Settings whose change makes an existing output stale (device, backend and batch size change floats only).
_OUTPUT_SETTINGS = ("mode", "checkpoint", "model_config", "steps", "seed", "size_policy", "lamb", "rho", "output",
                    "resize")


def _stale_settings(out_dir: Path, settings: dict[str, Any]) -> Optional[str]:
    """The output-relevant settings that differ from the previous run's summary in ``out_dir``, if any."""
    try:
        old = json.loads((out_dir / SUMMARY_NAME).read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return None
    diffs = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in _OUTPUT_SETTINGS
             if k in settings and k in old and old.get(k) != settings.get(k)]
    return "; ".join(diffs) or None


# --------------------------------------------------------------------------------------------------- runners


ProgressFactory = Callable[..., Any]  # tqdm-like: factory(total=..., desc=..., unit=...) with update/close/write


class _NoBar:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(s: str) -> None:
        print(s, file=sys.stderr)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, (PairError, io.ImageReadError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _step_callback(recorder: Optional[ProgressRecorder], steps: Any) -> Optional[Callable[[StepOutput], None]]:
    """The per-step callback for progress images and/or a step bar; None when neither is wanted."""
    if recorder is None and steps is None:
        return None

    def callback(out: StepOutput) -> None:
        if recorder is not None:
            recorder(out)
        if steps is not None:
            steps.update(1)

    return callback


def _notes(prepared: Prepared, settings: RunSettings) -> dict[str, str]:
    notes = {}
    if prepared.resized:
        notes["resized"] = prepared.resized
    if settings.output == "color" and prepared.color_source is not None and not io.has_chroma(prepared.color_source):
        notes["note"] = "the colour source is gray, so the colour output is gray"
    return notes


def run_folder(
    model: nn.Module,
    pairing: Pairing,
    out_dir: Path,
    settings: RunSettings,
    *,
    device: torch.device,
    overwrite: bool = False,
    summary_settings: Optional[dict[str, Any]] = None,
    inputs: Optional[dict[str, str]] = None,
    bar: Optional[ProgressFactory] = None,
    step_bar: Optional[ProgressFactory] = None,
    progress_dir: Optional[Path] = None,
    shard: Optional[Callable[[list[Pair]], list[Pair]]] = None,
    write_summary: bool = True,
) -> RunSummary:
    """Fuse every pair of ``pairing`` into ``out_dir/<stem><suffix>`` and write ``out_dir/ddfm_summary.json``.

    Existing outputs are skipped unless ``overwrite`` (resume). A pair that fails (unreadable, size mismatch,
    error while fusing or writing) is recorded with its reason and the run goes on. Same-model-size pairs are
    fused ``settings.batch_size`` at a time. The summary is written even when the run is interrupted
    (``complete: false``). ``bar``/``step_bar`` are tqdm-like factories for the image and step progress bars.
    ``progress_dir`` (only for a pairing of exactly one pair) receives that pair's per-step images.

    Distributed hooks (``ddfm_fast.distributed``; both unused by a single-process run): ``shard`` receives the
    pending pairs (outputs missing, after the resume check) and returns the ones this process fuses;
    ``write_summary=False`` leaves the summary file to the caller (rank 0 writes the merged one).
    """
    out_dir = Path(out_dir)
    if progress_dir is not None and len(pairing.pairs) != 1:
        raise InputError(
            f"per-step progress images are written for one pair only, but the folders hold {len(pairing.pairs)} pairs"
        )
    t0 = time.perf_counter()
    summary = RunSummary(settings=dict(summary_settings or settings.to_dict()), inputs=dict(inputs or {}),
                         output_dir=str(out_dir), unpaired=list(pairing.unpaired), ignored=list(pairing.ignored))
    r = settings.roles
    for amb in pairing.ambiguous:
        summary.failed.append({"stem": amb["stem"], "reason": amb["reason"]})
    make_bar = bar or _NoBar
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output folder {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    todo: list[Pair] = []
    for pair in pairing.pairs:
        dest = out_dir / (pair.stem + settings.suffix)
        if dest.exists() and not overwrite:
            summary.skipped.append({"stem": pair.stem, "output": str(dest),
                                    "reason": "output exists (resume; --overwrite to redo)"})
        else:
            todo.append(pair)
    if shard is not None:  # distributed hook: this rank's share of the pending pairs (a collective call)
        todo = shard(todo)
    if summary.skipped:
        stale = _stale_settings(out_dir, summary.settings)
        if stale:
            summary.warnings.append(
                f"{len(summary.skipped)} existing output(s) were kept, but the previous run in {out_dir} used other "
                f"settings ({stale}); use --overwrite to redo them"
            )

    progress = make_bar(total=len(todo), desc="fuse", unit="img")
    for message in summary.warnings:
        progress.write(f"warning: {message}")

    def record_failure(pair: Pair, exc: BaseException) -> None:
        reason = _describe_error(exc)
        summary.failed.append({"stem": pair.stem, r.ir: str(pair.ir), r.vis: str(pair.vis), "reason": reason})
        progress.write(f"failed: {pair.stem}: {reason}")

    def run_batch(batch: list[Prepared]) -> None:
        t = time.perf_counter()
        steps = None
        if step_bar is not None:
            steps = step_bar(total=settings.num_steps(model), desc=f"steps ({len(batch)} img)", unit="step",
                             leave=False)
        recorder = ProgressRecorder(progress_dir, batch[0].out_hw) if progress_dir is not None else None
        callback = _step_callback(recorder, steps)
        try:
            results = fuse_prepared(model, batch, settings, device, callback)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a failing batch (e.g. out of memory) fails its pairs, not the run
            if steps is not None:
                steps.close()
                steps = None
            if len(batch) > 1:  # retry one by one: a single pair may fit, or only one of them is bad
                for p in batch:
                    run_batch([p])
                return
            record_failure(batch[0].pair, exc)
            progress.update(1)
            return
        finally:
            if steps is not None:
                steps.close()
        per_image = (time.perf_counter() - t) / len(batch)
        for p, res in zip(batch, results, strict=True):
            dest = out_dir / (p.pair.stem + settings.suffix)
            try:
                write_output(output_array(res, p, settings.output), dest, settings.output)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                record_failure(p.pair, exc)
                continue
            entry: dict[str, Any] = {"stem": p.pair.stem, r.ir: str(p.pair.ir), r.vis: str(p.pair.vis),
                                     "output": str(dest), "size": [res.size[1], res.size[0]],
                                     "seconds": round(per_image, 4)}
            entry.update(_notes(p, settings))
            if recorder is not None:
                entry["progress"] = str(recorder.finish())
            summary.done.append(entry)
        summary.fusion_s += time.perf_counter() - t
        progress.update(len(batch))

    buckets: dict[tuple[int, int], list[Prepared]] = {}
    try:
        for pair in todo:
            try:
                prepared = prepare(pair, settings)
            except PairError as exc:
                record_failure(pair, exc)
                progress.update(1)
                continue
            bucket = buckets.setdefault(prepared.model_hw, [])
            bucket.append(prepared)
            if len(bucket) >= settings.batch_size:
                run_batch(buckets.pop(prepared.model_hw))
        for key in list(buckets):
            run_batch(buckets.pop(key))
        summary.complete = True
    finally:
        progress.close()
        for records in (summary.done, summary.failed):
            records.sort(key=lambda rec: rec.get("stem", ""))
        summary.finished = _now()
        summary.wall_s = time.perf_counter() - t0
        if write_summary:  # distributed hook: False on every rank, rank 0 writes the merged summary
            summary.write(out_dir)
    return summary


def run_single(
    model: nn.Module,
    pair: Pair,
    dest: Path,
    settings: RunSettings,
    *,
    device: torch.device,
    progress_dir: Optional[Path] = None,
    step_bar: Optional[ProgressFactory] = None,
) -> dict[str, Any]:
    """Fuse one pair into ``dest`` (replacing it, atomically); optionally the per-step images in ``progress_dir``.

    Errors of the pair raise :class:`PairError`. Returns a record like a summary's ``done`` entry.
    """
    t = time.perf_counter()
    prepared = prepare(pair, settings)
    recorder = ProgressRecorder(progress_dir, prepared.out_hw) if progress_dir is not None else None
    steps = step_bar(total=settings.num_steps(model), desc="steps", unit="step") if step_bar is not None else None
    try:
        (res,) = fuse_prepared(model, [prepared], settings, device, _step_callback(recorder, steps))
    finally:
        if steps is not None:
            steps.close()
    write_output(output_array(res, prepared, settings.output), Path(dest), settings.output)
    r = settings.roles
    record: dict[str, Any] = {"stem": pair.stem, r.ir: str(pair.ir), r.vis: str(pair.vis), "output": str(dest),
                              "size": [res.size[1], res.size[0]], "seconds": round(time.perf_counter() - t, 4)}
    record.update(_notes(prepared, settings))
    if recorder is not None:
        record["progress"] = str(recorder.finish())
    return record
