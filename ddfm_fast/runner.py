"""Runs over pairs of files: one pair to one file, or two folders to an output folder, resumable.

A folder run is a few small steps, each a function here or in :mod:`ddfm_fast.resume`:

1. the output folder is locked (:class:`~ddfm_fast.resume.FolderLock`), stale ``.part`` temporaries are
   removed, and :func:`plan_resume` decides per pair: an existing output counts as done only when its record
   proves it (same output bytes, settings and input bytes; :func:`ddfm_fast.resume.classify`); outputs made with
   other settings stop the run before anything is written (:class:`StaleOutputsError`);
2. :func:`read_pair` reads and validates each pair once (:func:`ddfm_fast.io.open_image`, then
   :func:`ddfm_fast.api.prepare_arrays`) and fingerprints its inputs, and :func:`size_buckets` groups pairs of
   one model size into batches;
3. :func:`fuse_batch` hands a batch to :func:`ddfm_fast.api.fuse_prepared` (no second read), and
   :func:`write_result` writes each output atomically (:func:`ddfm_fast.outputs.write_output`), its record
   journaled before the output takes its name;
4. the :class:`~ddfm_fast.summary.RunSummary` records every pair (done, skipped, failed with its reason), every
   output of this and earlier runs with what made it, the settings (:meth:`RunConfig.to_dict`) and the plan
   that ran, run-time fallbacks included.

:func:`run_folder` strings them together. A bad pair (unreadable, sizes that differ, over the pixel cap, a
non-finite result, an output that cannot be written) is recorded with its reason and the run goes on; a full or
read-only disk stops it (no later pair could be written), keeping what was done. Ctrl-C and SIGTERM end it
with a summary that counts everything done so far (:class:`RunInterrupted`). Nothing here knows about click:
``ddfm-fast fuse``, ``ddfm-fast score`` and the torchrun launcher (``ddfm_fast.distributed``) all call it.
torch is imported by the functions that compute, so that the command line's ``--help`` stays light.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Protocol

from ddfm_fast import io, outputs, resume
from ddfm_fast.config import DEFAULT_PRIOR, AccelConfig, ConfigError, SamplerConfig
from ddfm_fast.pairing import MODES, InputError, Pair, Pairing, Roles, roles
from ddfm_fast.summary import SUMMARY_NAME, RunSummary, now

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from ddfm_fast.api import FusionResult, PreparedPair
    from ddfm_fast.plan import ExecutionPlan
    from ddfm_fast.progress import BarFactory
    from ddfm_fast.sampler import StepOutput

OutputKind = Literal["gray", "color", "png16", "npy"]
OUTPUT_KINDS: tuple[str, ...] = ("gray", "color", "png16", "npy")
RESIZES = (None, "ir", "vis")
# SamplerConfig fields EM-only fusion never reads: no noise, no x0 prediction to clip, no schedule.
EM_ONLY_UNREAD = ("seed", "clip", "train_timesteps")
FLOAT_ROUNDING_ONLY = {"affects_output": False}  # RunConfig field metadata: excluded from the resume check
Event = Callable[[dict[str, Any]], None]


class PairError(ValueError):
    """One pair cannot be fused (unreadable file, size mismatch, too small, a non-finite result, an output that
    cannot be written); the message names the files."""


class OutputWriteError(PairError):
    """An output could not be written; ``fatal`` when no other output could be either (disk full, read-only)."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class StaleOutputsError(InputError):
    """The output folder holds outputs of a run with other output-affecting settings; the message names them."""


class Interrupted(KeyboardInterrupt):
    """A signal ended the run: Ctrl-C (SIGINT), SIGTERM or SIGHUP (``signum``); the command line turns SIGTERM and
    SIGHUP into this exception, so cleanup and the summary run as for Ctrl-C."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "") -> None:
        super().__init__(message or signal_name(signum))
        self.signum = int(signum)


# Signals the command line turned into :class:`Interrupted` (:func:`note_signal`) that no run has seen yet. The
# handler raises at whatever bytecode runs when the signal arrives; if that is a finalizer (a file object closed by
# the garbage collector), Python prints the exception and drops it, and the run would go on as if nothing came. A
# folder run checks this between pairs, so a dropped interrupt still stops it there.
_PENDING_SIGNALS: list[int] = []


def note_signal(signum: int) -> None:
    """Record a signal that is about to be raised as :class:`Interrupted` (the CLI's handler calls this first)."""
    _PENDING_SIGNALS.append(int(signum))


def _raise_pending_signal() -> None:
    if _PENDING_SIGNALS:
        signum = _PENDING_SIGNALS[-1]
        _PENDING_SIGNALS.clear()
        raise Interrupted(signum)


class RunInterrupted(Interrupted):
    """A folder run was interrupted after writing its summary; ``message`` says what was done and how to resume."""

    def __init__(self, signum: int, message: str, summary: Optional[RunSummary] = None) -> None:
        super().__init__(signum, message)
        self.message = message
        self.summary = summary


def signal_name(signum: int) -> str:
    if signum == signal.SIGINT:
        return "Ctrl-C (SIGINT)"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunConfig:
    """One run: what is computed (:class:`SamplerConfig`), how fast (:class:`AccelConfig`), and the run's choices.

    Attributes:
        sampler, accel: the two option types, whole.
        mode: ``"ivf"`` (infrared + visible) or ``"mif"`` (functional + MRI): the roles (``ddfm_fast.pairing``).
        output: ``"gray"`` (the official 8-bit output), ``"color"`` (fused luminance with the colour side's
            chroma), ``"png16"`` (16-bit unstretched luminance, as PNG or TIFF) or ``"npy"`` (float32
            ``(Y + 1) / 2``).
        file_format: the file format of the outputs (:data:`ddfm_fast.outputs.FORMATS`: png, tiff, jpeg, bmp, npy);
            ``None`` is PNG (``.npy`` for the npy output). It must hold the output kind
            (:data:`ddfm_fast.outputs.KIND_FORMATS`).
        resize: ``None`` (a size mismatch fails the pair), ``"ir"`` (the vis side takes the ir side's size) or
            ``"vis"`` (the other way), with Pillow's LANCZOS filter.
        checkpoint, model_config: the model's identity as given (a path or a preset name; ``None`` is the shipped
            prior, or no model for ``prior="none"``). The caller loads the model; these name it in the summary.
        model_digest: what the loaded model computes (:func:`ddfm_fast.resume.model_digest`), filled in by a
            folder run (:meth:`for_model` with ``digest=True``): a name says where a model came from, this says
            which model it is.
        batch_size: how many pairs of one model size are fused at once. With ``tau_reduce="image"`` (one EM tau
            per image) outputs equal the single runs up to float rounding, so it is not part of
            :func:`output_identity`; with ``"batch"`` (the official mean over the batch) it is, and each output
            depends on the pairs fused beside it (a folder run says so).
    """

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    accel: AccelConfig = field(default_factory=AccelConfig)
    mode: str = "ivf"
    output: OutputKind = "gray"
    resize: Optional[Literal["ir", "vis"]] = None
    checkpoint: Optional[str] = None
    model_config: Optional[str] = None
    batch_size: int = field(default=1, metadata=FLOAT_ROUNDING_ONLY)
    file_format: Optional[str] = None
    model_digest: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.output not in OUTPUT_KINDS:
            raise ConfigError(f"output must be one of {', '.join(OUTPUT_KINDS)}, got {self.output!r}")
        if self.file_format is None:
            object.__setattr__(self, "file_format", "npy" if self.output == "npy" else "png")
        try:
            outputs.check_format(self.output, self.file_format)  # type: ignore[arg-type]
        except outputs.OutputFormatError as exc:
            raise ConfigError(f"file_format {self.file_format!r}: {exc}") from None
        if self.resize not in RESIZES:
            raise ConfigError(f"resize must be None, 'ir' or 'vis', got {self.resize!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.sampler.prior == "none" and self.checkpoint is not None:
            raise ConfigError("checkpoint is not used with prior='none': EM only (the paper's ablation I) has no model")
        if self.model_config is not None and self.checkpoint is None:
            raise ConfigError("model_config describes a checkpoint's architecture, but no checkpoint is given "
                              f"({'EM only has no model' if self.sampler.prior == 'none' else 'the shipped prior has no config'})")

    @property
    def roles(self) -> Roles:
        return roles(self.mode)

    @property
    def suffix(self) -> str:
        """The output file suffix of a folder run: ``.png``, ``.tif``, ``.jpg``, ``.bmp`` or ``.npy``."""
        return outputs.FORMATS[self.file_format]  # type: ignore[index]

    def for_model(self, model: Optional[nn.Module], *, digest: bool = False) -> "RunConfig":
        """This run with the sampler's ``steps`` filled in from ``model`` (its ``default_steps``) when unset; with
        ``digest``, also ``model_digest`` from ``model`` (``None`` for EM only, which uses no model). The digest
        reads every weight once (a folder run's resume needs it; nothing else does)."""
        sampler = self.sampler.for_model(getattr(model, "default_steps", None))
        model_digest = self.model_digest
        if digest:
            model_digest = None if model is None or self.sampler.prior == "none" else resume.model_digest(model)
        if sampler == self.sampler and model_digest == self.model_digest:
            return self
        return dataclasses.replace(self, sampler=sampler, model_digest=model_digest)

    def to_dict(self) -> dict[str, Any]:
        """``{"sampler": ..., "accel": ..., "run": ...}``: every field, JSON-able; model names made absolute."""
        run = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("sampler", "accel")}
        run["checkpoint"] = _model_name(self.checkpoint, self.sampler.prior)
        run["model_config"] = _model_name(self.model_config, self.sampler.prior, default=None)
        return {"sampler": self.sampler.to_dict(), "accel": self.accel.to_dict(), "run": run}

    def identity(self, plan: Optional[ExecutionPlan]) -> dict[str, Any]:
        """:func:`output_identity` of this run under ``plan``."""
        return output_identity(self.to_dict(), None if plan is None else plan.to_dict())


def _model_name(name: Optional[str], prior: str, default: Optional[str] = DEFAULT_PRIOR) -> Optional[str]:
    """A checkpoint or config as the summary records it: a file as its absolute path, a preset by its name."""
    if prior == "none":
        return None
    if name is None:
        return default
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_file() else str(name)


def output_identity(settings: dict[str, Any], plan: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What decides the written bytes, from a summary's ``settings`` (:meth:`RunConfig.to_dict`) and ``plan``.

    Every :class:`SamplerConfig` field (for EM only, those it reads); every :class:`RunConfig` run-level field
    except those marked as changing float rounding only (the batch size, unless ``tau_reduce="batch"`` shares one
    tau among the pairs of a batch): the mode, output kind, file format, resize and model; and the UNet
    dtype the plan chose (fp16 / bf16 change the numerics, not only their rounding order). Derived from the
    fields, so a new sampler option is covered by being a field. The device, the step backend, compile, CUDA
    graphs and channels_last change float rounding only.
    """
    sampler, run = dict(settings.get("sampler", {})), settings.get("run", {})
    counted = [f.name for f in dataclasses.fields(RunConfig)
               if f.name not in ("sampler", "accel") and f.metadata.get("affects_output", True)]
    identity = {**sampler, **{k: run.get(k) for k in counted}}
    if sampler.get("tau_reduce") == "batch" and (run.get("batch_size") or 1) > 1:
        # One tau over the batch (the official reduction): each output depends on the pairs fused beside it.
        # A batch of one is the per-image value, so identities of single-pair batches stay as they were.
        identity["batch_size"] = run.get("batch_size")
    if sampler.get("prior") == "none":
        # EM only has no noise and no x0 prediction: the seed, the clip and the schedule length change nothing.
        # They are recorded at their defaults, so that an EM-only output is kept whatever they were set to.
        defaults = SamplerConfig().to_dict()
        identity.update({k: defaults[k] for k in EM_ONLY_UNREAD})
    identity["unet_dtype"] = plan.get("dtype") if plan and sampler.get("prior") != "none" else None
    return json.loads(json.dumps(identity))  # the types a summary gives back (lists, not tuples)


# --------------------------------------------------------------------------------------------------- one pair


@dataclass
class ReadPair:
    """A pair read once and validated: the sampler's inputs, and what the output writer needs."""

    pair: Pair
    prepared: PreparedPair
    color_source: Optional[np.ndarray]  # (H, W, 3) uint8, only for colour output
    resized: Optional[str] = None  # which side was resized, with the sizes, for the summary
    inputs_sha256: dict[str, str] = field(default_factory=dict)  # role -> SHA-256 of the input file's bytes

    @property
    def model_hw(self) -> tuple[int, int]:
        """The size the model sees: pairs of one model size can share a batch."""
        return tuple(self.prepared.anchor.shape[-2:])  # type: ignore[return-value]


def _size(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}"


def read_pair(pair: Pair, run: RunConfig) -> ReadPair:
    """Read a pair (each file decoded once, within the pixel cap), resize if asked, apply the size policy, and
    fingerprint both files (SHA-256 of their bytes, for the output's record).

    Raises :class:`PairError` naming the files and the problem.
    """
    from ddfm_fast import api

    r = run.roles
    try:
        if run.resize is None:
            api.check_header_sizes(pair.ir, pair.vis)
    except ValueError as exc:  # an ImageReadError (a bad header) or the two sizes differ
        raise PairError(str(exc)) from exc
    try:
        ir_img, vis_img = io.open_image(pair.ir), io.open_image(pair.vis)
        ir, vis = io.read_gray(ir_img, name=str(pair.ir)), io.read_gray(vis_img, name=str(pair.vis))
        color = None
        if run.output == "color":
            side, img = (pair.vis, vis_img) if r.color_side == "vis" else (pair.ir, ir_img)
            color = io.read_rgb8(img, name=str(side))
    except io.ImageReadError as exc:
        raise PairError(str(exc)) from exc
    try:
        prepared = api.prepare_arrays(ir, vis, run.sampler.size_policy, ir_name=str(pair.ir), vis_name=str(pair.vis),
                                      resize=run.resize)
    except ValueError as exc:  # sizes differ (without resize), or too small for the crop policy
        raise PairError(str(exc) if str(pair.ir) in str(exc) else f"{pair.ir}, {pair.vis}: {exc}") from exc
    resized = None
    if ir.shape != vis.shape:  # prepare_arrays resized one side to prepared.in_hw
        side, before = (r.vis, vis) if run.resize == "ir" else (r.ir, ir)
        resized = f"{side} {_size(before)} -> {prepared.in_hw[1]}x{prepared.in_hw[0]}"
        if color is not None and color.shape[:2] != prepared.in_hw:
            color = io.resize_rgb8(color, prepared.in_hw)
    sha: dict[str, str] = {}
    for role, path in ((r.ir, pair.ir), (r.vis, pair.vis)):
        try:
            sha[role] = outputs.fingerprint(path).sha256
        except io.FileProblem as exc:
            raise PairError(f"{io.display_name(path)}: {exc.reason}") from exc
        except OSError as exc:
            raise PairError(f"{io.display_name(path)}: cannot be read ({exc.strerror})") from exc
    return ReadPair(pair, prepared, color, resized, sha)


def fuse_batch(model: Optional[nn.Module], batch: list[ReadPair], run: RunConfig, device: torch.device,
               callback: Optional[Callable[[StepOutput], None]] = None) -> list[FusionResult]:
    """Fuse read pairs of one model size as one batch (one EM tau per image): :func:`api.fuse_prepared`.

    A non-finite result raises :class:`PairError` saying which stage went non-finite (nothing is written).
    """
    from ddfm_fast import api
    from ddfm_fast.em_only import EMOnlyNonFiniteError
    from ddfm_fast.sampler import NonFiniteError

    try:
        return api.fuse_prepared([item.prepared for item in batch], run.sampler, run.accel, model, device,
                                 callback=callback)
    except (NonFiniteError, EMOnlyNonFiniteError) as exc:
        names = "; ".join(f"{item.pair.ir}, {item.pair.vis}" for item in batch)
        raise PairError(f"{names}: non-finite result: {exc}") from exc


def output_array(result: FusionResult, item: ReadPair, output: OutputKind) -> np.ndarray:
    """The array an output file holds: 8-bit gray (official), 8-bit RGB, 16-bit raw luminance, or float32."""
    if output == "gray":
        return result.fused
    if output == "color":
        h, w = result.size
        assert item.color_source is not None, "colour output needs the colour source (read with output='color')"
        return io.colorize(result.fused, item.color_source[:h, :w])
    if output == "png16":
        return io.luma_to_uint16(result.luma)
    if output == "npy":
        return io.luma_to_unit(result.luma)
    raise ValueError(f"unknown output kind {output!r}")


def write_result(result: FusionResult, item: ReadPair, dest: Path, run: RunConfig, seconds: float, *,
                 settings: Optional[str] = None, journal: Optional[resume.Journal] = None) -> dict[str, Any]:
    """Write one output atomically in ``run.file_format``; returns its record (what made it: the settings digest,
    the inputs' and the output's SHA-256), journaled before the output takes its name.

    A failed write raises :class:`OutputWriteError` naming the file (``fatal`` for a full or read-only disk).
    """
    import numpy as np

    if not bool(np.isfinite(result.luma).all()):  # the sampler checks its sample; this guards every output kind
        raise PairError(f"{item.pair.ir}, {item.pair.vis}: non-finite result (the fused luminance holds NaN or "
                        "inf); nothing was written")
    array = output_array(result, item, run.output)
    r = run.roles
    record: dict[str, Any] = {"stem": item.pair.stem, r.ir: str(Path(item.pair.ir).absolute()),
                              r.vis: str(Path(item.pair.vis).absolute()), "output": str(dest),
                              "size": [result.size[1], result.size[0]], "seconds": round(seconds, 4)}
    if item.resized:
        record["resized"] = item.resized
    notes = []
    if run.output == "color" and item.color_source is not None and not io.has_chroma(item.color_source):
        notes.append("the colour source is gray, so the colour output is gray")
    flat = io.flat_output_note(result.luma)
    if flat:
        notes.append(flat)
    if notes:
        record["note"] = "; ".join(notes)

    def commit(printed: outputs.Fingerprint) -> None:
        record.update(**({"settings": settings} if settings is not None else {}),
                      inputs_sha256=dict(item.inputs_sha256), output_sha256=printed.sha256,
                      output_bytes=printed.bytes, made=now())
        if journal is not None:
            journal.append(record)

    try:
        outputs.write_output(array, dest, run.file_format, before_commit=commit)  # type: ignore[arg-type]
    except OSError as exc:
        raise OutputWriteError(outputs.write_error(dest, exc),
                               fatal=exc.errno in outputs.FATAL_WRITE_ERRNOS) from exc
    return record


@dataclass
class SingleResult:
    """What :func:`run_single` wrote, and the plan that ran (None for EM only)."""

    record: dict[str, Any]
    plan: Optional[ExecutionPlan]


def _check_progress(progress_dir: Optional[Path], run: RunConfig) -> None:
    if progress_dir is not None and run.sampler.prior == "none":
        raise InputError("per-step progress images show the diffusion steps; EM only (prior='none') has none")


def run_single(model: Optional[nn.Module], pair: Pair, dest: Path, run: RunConfig, *, device: torch.device,
               progress_dir: Optional[Path] = None, step_bar: Optional[BarFactory] = None) -> SingleResult:
    """Fuse one pair into ``dest`` (replacing it, atomically); optionally its per-step images in ``progress_dir``.

    The format is ``run.file_format`` and must agree with ``dest``'s extension. Every problem of the pair
    (unreadable, sizes, non-finite, the write) raises :class:`PairError`; nothing is written then.
    """
    from ddfm_fast.progress import ProgressRecorder, step_callback

    fmt = outputs.format_of(dest)
    if fmt != run.file_format:
        raise ValueError(f"{dest}: the extension asks for {fmt} but the run writes {run.file_format}")
    _check_progress(progress_dir, run)
    t = time.perf_counter()
    run = run.for_model(model)
    item = read_pair(pair, run)
    recorder = ProgressRecorder(progress_dir, item.prepared.out_hw) if progress_dir is not None else None
    steps = step_bar(total=run.sampler.num_steps(), desc="steps", unit="step") if step_bar is not None else None
    try:
        (result,) = fuse_batch(model, [item], run, device, step_callback(recorder, steps))
    finally:
        if steps is not None:
            steps.close()
    record = write_result(result, item, Path(dest), run, time.perf_counter() - t)
    if recorder is not None:
        record["progress"] = str(recorder.finish())
    return SingleResult(record, result.plan)


# --------------------------------------------------------------------------------------------------- resume


@dataclass
class ResumePlan:
    """What :func:`plan_resume` decided for a folder's pairs."""

    todo: list[Pair]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # verified outputs, kept
    refused: list[dict[str, Any]] = field(default_factory=list)  # pairs that fail: a file in the way
    replaced: list[dict[str, Any]] = field(default_factory=list)  # existing files fused again, with why
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)  # output name -> record, every known output


REDO_HINT = "rerun with --overwrite to redo them with these settings, or write to another folder"


def plan_resume(pairs: Iterable[Pair], out_dir: Path, run: RunConfig, identity: dict[str, Any],
                records: resume.FolderRecords, *, overwrite: bool = False, fold_case: bool = False,
                equivalent: Iterable[str] = ()) -> ResumePlan:
    """Decide, per pair, what to do with its output path (:func:`ddfm_fast.resume.classify`).

    Raises :class:`StaleOutputsError` before anything is written when verified outputs were made with other
    settings (naming them), or when outputs exist but the summary that should vouch for them cannot be read.
    With ``fold_case`` (the output folder ignores case: macOS, Windows) a pair whose output name equals an
    earlier pair's but for case fails, naming both, instead of overwriting it. ``equivalent`` are the settings
    digests an earlier version recorded for this run's outputs (:func:`legacy_digests`); a record under one of
    them is kept relabelled with this run's digest.
    """
    equivalent = set(equivalent)
    out_dir = Path(out_dir)
    pairs = list(pairs)
    r = run.roles
    digest = resume.settings_digest(identity)
    dests = {p.stem: out_dir / (p.stem + run.suffix) for p in pairs}
    existing = [s for s, d in dests.items() if os.path.lexists(d)]
    if records.problem and existing and not overwrite:
        raise StaleOutputsError(f"{records.problem}, so the {len(existing)} existing output(s) cannot be checked "
                                f"against the settings and inputs; {REDO_HINT}")
    plan = ResumePlan(todo=[], kept=records.all_records())
    stale: list[dict[str, Any]] = []
    folded: dict[str, str] = {}
    for pair in pairs:
        dest = dests[pair.stem]
        twin = folded.setdefault(dest.name.casefold(), dest.name) if fold_case else dest.name
        if twin != dest.name:
            plan.refused.append({"stem": pair.stem, r.ir: str(pair.ir), r.vis: str(pair.vis),
                                 "reason": f"output {dest.name} and {twin} are one file in {out_dir}, whose file "
                                           "system ignores case; rename one of the two pairs' inputs"})
            continue
        if pair.stem not in existing:
            plan.todo.append(pair)
            plan.kept.pop(dest.name, None)  # a record of an output that is gone counts for nothing
            continue
        verdict = resume.classify(dest, {r.ir: pair.ir, r.vis: pair.vis}, records.candidates(dest.name), digest,
                                  run.file_format, overwrite=overwrite,  # type: ignore[arg-type]
                                  equivalent=equivalent)
        if verdict.status == "done":
            plan.skipped.append({"stem": pair.stem, "output": str(dest),
                                 "reason": "verified output of these settings and inputs (resume; --overwrite "
                                           "to redo)"})
            assert verdict.record is not None
            plan.kept[dest.name] = {**verdict.record, "settings": digest}
        elif verdict.status == "settings":
            stale.append(verdict.record or {})
        elif verdict.status == "refuse":
            plan.refused.append({"stem": pair.stem, r.ir: str(pair.ir), r.vis: str(pair.vis),
                                 "reason": verdict.reason})  # the file stays as it is, and so does its record
        else:  # new or redo
            plan.todo.append(pair)
            # The file on disk stays until its replacement is renamed over it, so its record stays too (the one
            # that matches its bytes, when one does): a redo that fails or is interrupted loses nothing. This
            # run's record replaces it when the new output is written (RunSummary.outputs).
            if verdict.status == "new":
                plan.kept.pop(dest.name, None)
            elif verdict.record is not None:
                plan.kept[dest.name] = verdict.record
            if verdict.status == "redo" and not overwrite:
                plan.replaced.append({"stem": pair.stem, "output": str(dest), "reason": verdict.reason})
    if stale:
        changes: list[str] = []
        for rec in stale:
            before = records.identities.get(str(rec.get("settings")))
            found = (resume.settings_changes(before, identity) if before is not None
                     else [f"settings digest {rec.get('settings')!r} -> {digest!r}"])
            if before is not None and "model_digest" not in before and identity.get("model_digest") is not None:
                found = [c for c in found if not c.startswith("model_digest ")] + [
                    "made by a version of ddfm-fast that did not record which model (weights) made them, so they "
                    "cannot be checked against this model"]
            changes += [c for c in found if c not in changes]
        raise StaleOutputsError(f"{out_dir} holds {len(stale)} output(s) made with other settings "
                                f"({'; '.join(changes)}); {REDO_HINT}")
    return plan


def legacy_digests(run: RunConfig, identity: dict[str, Any], model: Optional[nn.Module]) -> set[str]:
    """The settings digests ddfm-fast 0.1.0 recorded for the outputs this run makes alike, so that its folders
    resume: it recorded EM only's seed, clip and schedule length (which EM only does not read), and digested a
    model without its config (:func:`ddfm_fast.resume.model_digest` ``with_config=False``)."""
    found = set()
    if run.sampler.prior == "none":
        actual = run.sampler.to_dict()
        found.add(resume.settings_digest({**identity, **{k: actual[k] for k in EM_ONLY_UNREAD}}))
    elif model is not None and identity.get("model_digest") is not None and hasattr(model, "config"):
        found.add(resume.settings_digest({**identity, "model_digest": resume.model_digest(model, with_config=False)}))
    return found - {resume.settings_digest(identity)}


def size_buckets(items: Iterable[ReadPair], batch_size: int) -> Iterator[list[ReadPair]]:
    """Batches of up to ``batch_size`` pairs of one model size, each as soon as it is full, the rest at the end."""
    buckets: dict[tuple[int, int], list[ReadPair]] = {}
    for item in items:
        bucket = buckets.setdefault(item.model_hw, [])
        bucket.append(item)
        if len(bucket) >= batch_size:
            yield buckets.pop(item.model_hw)
    yield from buckets.values()


# --------------------------------------------------------------------------------------------------- folders


class Coordinator(Protocol):
    """How the processes of one folder run agree (``ddfm_fast.distributed`` has the torchrun one)."""

    rank: int
    world_size: int
    is_main: bool

    def agree(self, error: Optional[BaseException], todo: Optional[list[Pair]]) -> list[Pair]:
        """The main process's pending pairs on every process, or its error raised on every process."""

    def shard(self, todo: list[Pair]) -> list[Pair]:
        """This process's share of the pending pairs."""

    def gather(self, obj: Any) -> Optional[list[Any]]:
        """Every process's ``obj`` in rank order on the main process; ``None`` on the others."""


class Alone:
    """The coordinator of a single-process run."""

    rank, world_size, is_main = 0, 1, True

    def agree(self, error: Optional[BaseException], todo: Optional[list[Pair]]) -> list[Pair]:
        if error is not None:
            raise error
        return list(todo or [])

    def shard(self, todo: list[Pair]) -> list[Pair]:
        return todo

    def gather(self, obj: Any) -> Optional[list[Any]]:
        return [obj]


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, (PairError, io.ImageReadError)):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{io.display_name(exc.filename) + ': ' if exc.filename else ''}{exc.strerror or exc}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


class _FolderRun:
    """The state of one :func:`run_folder` call: the summary, the bars, the journal and the batch loop."""

    def __init__(self, model: Optional[nn.Module], run: RunConfig, out_dir: Path, device: torch.device,
                 summary: RunSummary, progress: Any, step_bar: Optional[BarFactory],
                 progress_dir: Optional[Path], journal: resume.Journal, on_event: Optional[Event]) -> None:
        self.model, self.run, self.out_dir, self.device = model, run, out_dir, device
        self.summary, self.progress, self.step_bar, self.progress_dir = summary, progress, step_bar, progress_dir
        self.journal, self.on_event = journal, on_event
        self.rank = 0
        self.plan: Optional[ExecutionPlan] = None  # the plan that ran (the sampler's, with its fallbacks)
        self.finished = 0  # pairs of this process's share that were done or failed
        self.stopped: Optional[str] = None  # why the loop stopped early (a write no output can escape)

    def event(self, status: str, record: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event({"event": "pair", "status": status, **record, **({"rank": self.rank} if self.rank else {})})

    def fail(self, pair: Pair, exc: BaseException) -> None:
        reason = _describe_error(exc)
        r = self.run.roles
        record = {"stem": pair.stem, r.ir: str(pair.ir), r.vis: str(pair.vis), "reason": reason}
        self.summary.failed.append(record)
        self.finished += 1
        self.progress.write(f"failed: {pair.stem}: {reason}", file=sys.stderr)  # tqdm's default is stdout
        self.event("failed", record)
        if isinstance(exc, OutputWriteError) and exc.fatal and self.stopped is None:
            self.stopped = reason

    def read(self, todo: list[Pair]) -> Iterator[ReadPair]:
        for pair in todo:
            _raise_pending_signal()
            if self.stopped:
                return
            try:
                yield read_pair(pair, self.run)
            except PairError as exc:
                self.fail(pair, exc)
                self.progress.update(1)

    def fuse(self, batch: list[ReadPair]) -> None:
        """Fuse and write one batch; a failing batch (e.g. out of memory, one non-finite image) is retried pair by
        pair, so only the pair at fault fails."""
        from ddfm_fast.progress import ProgressRecorder, step_callback

        if self.stopped:
            return
        t = time.perf_counter()
        steps = None
        if self.step_bar is not None:
            steps = self.step_bar(total=self.run.sampler.num_steps(), desc=f"steps ({len(batch)} img)",
                                  unit="step", leave=False)
        recorder = ProgressRecorder(self.progress_dir, batch[0].prepared.out_hw) if self.progress_dir else None
        try:
            results = fuse_batch(self.model, batch, self.run, self.device, step_callback(recorder, steps))
        except Exception as exc:  # noqa: BLE001 - a failing batch fails its pairs, not the run
            if steps is not None:
                steps.close()
                steps = None
            if len(batch) > 1:  # a single pair may fit, or only one of them is bad
                for item in batch:
                    self.fuse([item])
                return
            self.fail(batch[0].pair, exc)
            self.progress.update(1)
            return
        finally:
            if steps is not None:
                steps.close()
        per_image = (time.perf_counter() - t) / len(batch)
        digest = self.summary.settings_digest
        for item, result in zip(batch, results, strict=True):
            self.plan = result.plan or self.plan
            dest = self.out_dir / (item.pair.stem + self.run.suffix)
            try:
                record = write_result(result, item, dest, self.run, per_image, settings=digest,
                                      journal=self.journal)
            except Exception as exc:  # noqa: BLE001 - a failed write fails its pair (and a full disk the run)
                self.fail(item.pair, exc)
                continue
            if recorder is not None:
                record["progress"] = str(recorder.finish())
            self.summary.done.append(record)
            self.finished += 1
            self.event("done", record)
        self.summary.fusion_s += time.perf_counter() - t
        self.progress.update(len(batch))


_JOURNAL_RANK = re.compile(r"-r(\d+)" + re.escape(resume.JOURNAL_SUFFIX) + "$")


def _journal_in(path: Path, summary: RunSummary) -> bool:
    """True when every output ``path`` journals is in ``summary``'s outputs with the same bytes (or the journal is
    gone): removing it then loses no record."""
    if not path.exists():
        return True
    found = resume.FolderRecords()
    resume.read_journals([path], found)
    outputs = summary.outputs
    return all(outputs.get(name, {}).get("output_sha256") == recs[-1].get("output_sha256")
               for name, recs in found.journaled.items())


def _absorb_journals(summary: RunSummary, out_dir: Path, exclude: set[Path]) -> None:
    """Rank 0 of an interrupted torchrun run: add the outputs the other ranks journaled in this run (the journals
    not in ``exclude``: those read at the start, and rank 0's own) to ``done``, tagged with their rank, so the
    interrupted summary counts every output done so far without waiting for the other ranks."""
    mine = {Path(rec["output"]).name for rec in summary.done if "output" in rec}
    for path in resume.journal_paths(out_dir):
        if path in exclude:
            continue
        found = resume.FolderRecords()
        resume.read_journals([path], found)
        match = _JOURNAL_RANK.search(path.name)
        for name, recs in found.journaled.items():
            if name not in mine:
                summary.done.append({**recs[-1], **({"rank": int(match.group(1))} if match else {})})
                mine.add(name)
        for digest, ident in found.identities.items():
            summary.identities.setdefault(digest, ident)


def interrupted_message(summary: RunSummary, out_dir: Path, signum: int, total: int, rank: int = 0) -> str:
    """What an interrupted folder run says: how much is done, that it is kept, how to resume."""
    if rank:
        return (f"rank {rank} interrupted by {signal_name(signum)}: {len(summary.done)} pair(s) fused on this rank, "
                f"kept in {out_dir}; rank 0 writes the summary; rerun the same command to resume")
    c = summary.counts()
    where = (f"summary: {out_dir / SUMMARY_NAME}" if summary.write_error is None
             else f"the summary could not be written ({summary.write_error}); the records are kept in "
                  f"{out_dir}/{resume.JOURNAL_PREFIX}*{resume.JOURNAL_SUFFIX}")
    return (f"interrupted by {signal_name(signum)}: {c['done']} pair(s) fused in this run, {c['outputs']} output(s) "
            f"done in all in {out_dir} and kept, {c['pending']} of {total} pair(s) not reached; rerun the same "
            f"command to resume ({where})")


def run_folder(
    model: Optional[nn.Module],
    pairing: Pairing,
    out_dir: Path,
    run: RunConfig,
    *,
    device: torch.device,
    plan: Optional[ExecutionPlan] = None,
    overwrite: bool = False,
    extra_settings: Optional[dict[str, Any]] = None,
    inputs: Optional[dict[str, str]] = None,
    bar: Optional[BarFactory] = None,
    step_bar: Optional[BarFactory] = None,
    progress_dir: Optional[Path] = None,
    coordinator: Optional[Coordinator] = None,
    lock: Optional[resume.FolderLock] = None,
    write_summary: bool = True,
    on_event: Optional[Event] = None,
    warn: Optional[Callable[[str], None]] = None,
) -> RunSummary:
    """Fuse every pair of ``pairing`` into ``out_dir/<stem><suffix>`` and write ``out_dir/ddfm_summary.json``.

    The folder is locked for the run (``lock``: a :class:`~ddfm_fast.resume.FolderLock` the caller already holds,
    else one is taken here; a second run gets :class:`~ddfm_fast.resume.FolderBusyError`), stale temporary files
    are removed, and existing outputs are kept only when verified (:func:`plan_resume`; with ``overwrite`` all
    are redone). A pair that fails (unreadable, size mismatch, non-finite, its output cannot be written) is
    recorded with its reason and the run goes on; a full or read-only disk stops it (``summary.stopped``). Pairs
    of one model size are fused ``run.batch_size`` at a time. The summary keeps the records of earlier runs'
    outputs and is written also when the run is interrupted (``complete: false``; then
    :class:`RunInterrupted` is raised with what was done), or its write failure is kept in
    ``summary.write_error`` (never raised). ``plan`` is the execution plan the caller resolved (the plan is made
    here when it is None; replaced by the sampler's, with its run-time fallbacks, once a batch ran).
    ``extra_settings`` go into the summary's settings beside :meth:`RunConfig.to_dict` (device, paper, ...).
    ``bar`` / ``step_bar`` are tqdm-like factories. ``progress_dir`` (a pairing of exactly one pair) receives its
    per-step images. ``on_event`` receives one dict per pair (``{"event": "pair", "status": "done" | "skipped" |
    "failed", ...}``); ``warn`` the run's warnings (default: the progress bar's ``write``).

    Distributed hooks (``ddfm_fast.distributed``): ``coordinator`` shares rank 0's resume decision and shards
    it; only rank 0 locks, cleans and decides; ``write_summary=False`` leaves the file to the caller.
    """
    out_dir = Path(out_dir)
    coord: Coordinator = coordinator if coordinator is not None else Alone()
    if progress_dir is not None and len(pairing.pairs) != 1:
        raise InputError(
            f"per-step progress images are written for one pair only, but the folders hold {len(pairing.pairs)} pairs"
        )
    _check_progress(progress_dir, run)
    t0 = time.perf_counter()
    run = run.for_model(model, digest=True)
    if plan is None and run.sampler.prior != "none":
        from ddfm_fast.plan import plan as make_plan

        plan = make_plan(device, run.accel)
    identity = run.identity(plan)
    digest = resume.settings_digest(identity)
    own_lock: Optional[resume.FolderLock] = None
    decided: Optional[ResumePlan] = None
    records = resume.FolderRecords()
    removed: list[str] = []
    error: Optional[BaseException] = None
    identities = coord.gather(identity)  # every rank's, on the main one: they must all fuse alike
    if coord.is_main:
        try:
            for rank, other in enumerate(identities or []):
                if other != identity:
                    raise InputError(f"rank {rank} would fuse with other settings than rank 0 "
                                     f"({'; '.join(resume.settings_changes(identity, other))}): every rank must "
                                     "load the same model file and options")
            problem = outputs.output_problem(out_dir, folder=True)
            if problem:
                raise InputError(f"output folder {problem}")
            if lock is None or not lock.held:
                own_lock = lock if lock is not None else resume.FolderLock(out_dir)
                own_lock.acquire()
            removed = resume.remove_stale_parts(out_dir)
            records = resume.load_records(out_dir, SUMMARY_NAME)
            stale = any(rec.get("settings") != digest for rec in records.all_records().values())
            decided = plan_resume(pairing.pairs, out_dir, run, identity, records, overwrite=overwrite,
                                  equivalent=legacy_digests(run, identity, model) if stale else (),
                                  fold_case=resume.case_insensitive(out_dir))
        except Exception as exc:  # noqa: BLE001 - raised below on every process (coord.agree), not only here
            error = exc
        except BaseException:  # Ctrl-C while the resume check hashes the inputs: the folder must not stay locked
            if own_lock is not None:
                own_lock.release()
            raise
    try:
        todo = coord.agree(error, None if decided is None else decided.todo)
        todo = coord.shard(todo)
    except BaseException:
        if own_lock is not None:
            own_lock.release()
        raise
    settings = {**run.to_dict(), "num_steps": run.sampler.num_steps(), **(extra_settings or {})}
    summary = RunSummary(settings=settings, inputs=dict(inputs or {}), output_dir=str(out_dir),
                         plan=None if plan is None else plan.to_dict(), unpaired=pairing.unpaired,
                         ignored=[str(p) for p in pairing.ignored], settings_digest=digest,
                         identities={**records.identities, digest: identity}, runs=list(records.runs))
    warnings_: list[str] = []
    if decided is not None:
        summary.skipped, summary.replaced, summary.kept = decided.skipped, decided.replaced, decided.kept
        summary.failed += decided.refused
        summary.failed += [{"stem": u.stem, "reason": u.reason} for u in pairing.ambiguous]
        if removed:
            warnings_.append(f"removed {len(removed)} stale temporary file(s) left by an interrupted write: "
                             + ", ".join(removed[:5]) + (", ..." if len(removed) > 5 else ""))
        for item in decided.replaced:
            warnings_.append(f"{item['stem']}: {item['reason']}")
        if run.sampler.tau_reduce == "batch" and run.batch_size > 1 and todo:
            warnings_.append(f"tau_reduce 'batch' with batch size {run.batch_size}: the EM step's tau is one mean "
                             "over each batch (the official reduction), so an output depends on the pairs fused "
                             "beside it, and a resumed or torchrun run batches other pairs together; "
                             "--tau-reduce image (or --batch-size 1) fuses each pair as if alone")
        lock_warning = (own_lock or lock).warning if (own_lock or lock) is not None else None
        if lock_warning:
            warnings_.append(lock_warning)
    summary.warnings = warnings_
    progress = (bar or _no_bar())(total=len(todo), desc="fuse", unit="img")
    say = warn if warn is not None else (lambda m: progress.write(f"warning: {m}", file=sys.stderr))
    for message in summary.warnings:
        say(message)
    if on_event is not None:
        for rec in summary.skipped:
            on_event({"event": "pair", "status": "skipped", **rec})
        for rec in summary.failed:
            on_event({"event": "pair", "status": "failed", **rec})
    token = f"{summary.started.replace(':', '').replace('+', 'p')}-{os.getpid()}-r{coord.rank}"
    journal = resume.Journal(out_dir, token, identity, digest)
    state = _FolderRun(model, run, out_dir, device, summary, progress, step_bar, progress_dir, journal, on_event)
    state.rank = coord.rank
    interrupted: Optional[KeyboardInterrupt] = None
    try:
        try:
            for batch in size_buckets(state.read(todo), run.batch_size):
                _raise_pending_signal()
                state.fuse(batch)
                if state.stopped:
                    break
            _raise_pending_signal()
            summary.stopped = state.stopped
            summary.complete = state.stopped is None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP turned into Interrupted by the CLI
            _PENDING_SIGNALS.clear()  # this one arrived
            interrupted = exc
        finally:
            progress.close()
            journal.close()
            if state.plan is not None:
                summary.plan = state.plan.to_dict()
            for records_ in (summary.done, summary.failed):
                records_.sort(key=lambda rec: rec.get("stem", ""))
            summary.pending = max(len(todo) - state.finished, 0)
            summary.finished = now()
            summary.wall_s = time.perf_counter() - t0
            if interrupted is not None and coord.world_size > 1 and coord.is_main:
                summary.done = [{**rec, "rank": 0} for rec in summary.done]
                _absorb_journals(summary, out_dir, exclude={*records.journals, journal.path})
                summary.done.sort(key=lambda rec: rec.get("stem", ""))
                accounted = {rec.get("stem") for rec in [*summary.done, *summary.skipped, *summary.failed]}
                summary.pending = sum(1 for p in pairing.pairs if p.stem not in accounted)  # all ranks' share
            if write_summary or (interrupted is not None and coord.is_main):
                written = summary.write_safely(out_dir)
                if written is not None and coord.world_size == 1:
                    # The journals read at the start are in the summary (kept). This run's own is, unless an
                    # interrupt landed between an output's rename and its record reaching ``done``: then the
                    # journal stays and the next run reads the record from it.
                    own = [journal.path] if _journal_in(journal.path, summary) else []
                    resume.remove_journals([*records.journals, *own])
    finally:
        if own_lock is not None:
            own_lock.release()
    if interrupted is not None:
        signum = getattr(interrupted, "signum", signal.SIGINT)
        raise RunInterrupted(signum, interrupted_message(summary, out_dir, signum, len(pairing.pairs), coord.rank),
                             summary) from interrupted
    return summary


def _no_bar() -> Any:
    from ddfm_fast.progress import NoBar

    return NoBar
