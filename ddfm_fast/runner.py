"""Runs over pairs of files: one pair to one file, or two folders to an output folder, resumable.

A folder run is four small steps, each a function here:

1. :func:`pending_pairs`: which pairs still need an output (existing ones are kept unless ``overwrite``), and
   :func:`check_resume`: kept outputs must come from a run with the same :func:`output_identity`, else the run
   is refused before anything is written;
2. :func:`read_pair` reads and validates each pair once (:func:`ddfm_fast.io.open_image`, then
   :func:`ddfm_fast.api.prepare_arrays`), and :func:`size_buckets` groups pairs of one model size into batches;
3. :func:`fuse_batch` hands a batch to :func:`ddfm_fast.api.fuse_prepared` (no second read), and
   :func:`write_result` writes each output atomically;
4. the :class:`~ddfm_fast.summary.RunSummary` records every pair (done, skipped, failed with its reason), the
   settings (:meth:`RunConfig.to_dict`) and the plan that ran, run-time fallbacks included.

:func:`run_folder` strings them together; a bad pair never stops a folder run. Nothing here knows about click:
``ddfm-fast fuse``, ``ddfm-fast score`` and the torchrun launcher (``ddfm_fast.distributed``) all call it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
from torch import nn

from ddfm_fast import api, io
from ddfm_fast.config import AccelConfig, ConfigError, SamplerConfig
from ddfm_fast.pairing import MODES, InputError, Pair, Pairing, Roles, roles
from ddfm_fast.plan import ExecutionPlan
from ddfm_fast.progress import BarFactory, NoBar, ProgressRecorder, step_callback
from ddfm_fast.sampler import StepOutput
from ddfm_fast.summary import SUMMARY_NAME, SUMMARY_SCHEMA, RunSummary, now

OutputKind = Literal["gray", "color", "png16", "npy"]
OUTPUT_KINDS: tuple[str, ...] = ("gray", "color", "png16", "npy")
RESIZES = (None, "ir", "vis")
FLOAT_ROUNDING_ONLY = {"affects_output": False}  # RunConfig field metadata: excluded from the resume check


class PairError(ValueError):
    """One pair cannot be fused (unreadable file, size mismatch, too small); the message names the files."""


class StaleOutputsError(InputError):
    """The output folder holds outputs of a run with other output-affecting settings; the message names them."""


# --------------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunConfig:
    """One run: what is computed (:class:`SamplerConfig`), how fast (:class:`AccelConfig`), and the run's choices.

    Attributes:
        sampler, accel: the two option types, whole.
        mode: ``"ivf"`` (infrared + visible) or ``"mif"`` (functional + MRI): the roles (``ddfm_fast.pairing``).
        output: ``"gray"`` (the official 8-bit output), ``"color"`` (fused luminance with the colour side's
            chroma), ``"png16"`` (16-bit unstretched luminance) or ``"npy"`` (float32 ``(Y + 1) / 2``).
        resize: ``None`` (a size mismatch fails the pair), ``"ir"`` (the vis side takes the ir side's size) or
            ``"vis"`` (the other way), with Pillow's LANCZOS filter.
        checkpoint, model_config: the model's identity as given (a path or a preset name; ``None`` is the shipped
            prior, or no model for ``prior="none"``). The caller loads the model; these name it in the summary.
        batch_size: how many pairs of one model size are fused at once (one EM tau per image, so outputs equal
            the single runs up to float rounding: it is not part of :func:`output_identity`).
    """

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    accel: AccelConfig = field(default_factory=AccelConfig)
    mode: str = "ivf"
    output: OutputKind = "gray"
    resize: Optional[Literal["ir", "vis"]] = None
    checkpoint: Optional[str] = None
    model_config: Optional[str] = None
    batch_size: int = field(default=1, metadata=FLOAT_ROUNDING_ONLY)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.output not in OUTPUT_KINDS:
            raise ConfigError(f"output must be one of {', '.join(OUTPUT_KINDS)}, got {self.output!r}")
        if self.resize not in RESIZES:
            raise ConfigError(f"resize must be None, 'ir' or 'vis', got {self.resize!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.sampler.prior == "none" and self.checkpoint is not None:
            raise ConfigError("checkpoint is not used with prior='none': EM only (the paper's ablation I) has no model")

    @property
    def roles(self) -> Roles:
        return roles(self.mode)

    @property
    def suffix(self) -> str:
        """The output file suffix: ``.npy`` for raw npy output, else ``.png``."""
        return ".npy" if self.output == "npy" else ".png"

    def for_model(self, model: Optional[nn.Module]) -> "RunConfig":
        """This run with the sampler's ``steps`` filled in from ``model`` (its ``default_steps``) when unset."""
        sampler = self.sampler.for_model(getattr(model, "default_steps", None))
        return self if sampler == self.sampler else dataclasses.replace(self, sampler=sampler)

    def to_dict(self) -> dict[str, Any]:
        """``{"sampler": ..., "accel": ..., "run": ...}``: every field, JSON-able; model names made absolute."""
        run = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("sampler", "accel")}
        run["checkpoint"] = _model_name(self.checkpoint, self.sampler.prior)
        run["model_config"] = _model_name(self.model_config, self.sampler.prior, default=None)
        return {"sampler": self.sampler.to_dict(), "accel": self.accel.to_dict(), "run": run}

    def identity(self, plan: Optional[ExecutionPlan]) -> dict[str, Any]:
        """:func:`output_identity` of this run under ``plan``."""
        return output_identity(self.to_dict(), None if plan is None else plan.to_dict())


def _model_name(name: Optional[str], prior: str, default: Optional[str] = api.DEFAULT_PRIOR) -> Optional[str]:
    """A checkpoint or config as the summary records it: a file as its absolute path, a preset by its name."""
    if prior == "none":
        return None
    if name is None:
        return default
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_file() else str(name)


def output_identity(settings: dict[str, Any], plan: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What decides the written pixels, from a summary's ``settings`` (:meth:`RunConfig.to_dict`) and ``plan``.

    Every :class:`SamplerConfig` field; every :class:`RunConfig` run-level field except those marked as changing
    float rounding only (the batch size); and the UNet dtype the plan chose (fp16 / bf16 change the numerics,
    not only their rounding order). Derived from the fields, so a new sampler option is covered by being a
    field. The device, the step backend, compile, CUDA graphs and channels_last change float rounding only.
    """
    sampler, run = dict(settings.get("sampler", {})), settings.get("run", {})
    counted = [f.name for f in dataclasses.fields(RunConfig)
               if f.name not in ("sampler", "accel") and f.metadata.get("affects_output", True)]
    identity = {**sampler, **{k: run.get(k) for k in counted}}
    identity["unet_dtype"] = plan.get("dtype") if plan and sampler.get("prior") != "none" else None
    return json.loads(json.dumps(identity))  # the types a summary gives back (lists, not tuples)


def check_resume(out_dir: Path, identity: dict[str, Any], kept: int) -> Optional[str]:
    """Refuse, with :class:`StaleOutputsError`, to keep ``kept`` outputs made with another identity.

    A resumed run keeps existing outputs only when the previous run's summary in ``out_dir`` has the same
    :func:`output_identity`; any difference is named in the one-line error, with the way out (``--overwrite``).
    Returns a warning when outputs exist but no summary does (they are kept: files put there on purpose).
    """
    if kept == 0:
        return None
    path = Path(out_dir) / SUMMARY_NAME
    if not path.exists():
        return (f"{kept} existing output(s) in {out_dir} were kept, but there is no {SUMMARY_NAME} saying which "
                "settings made them; use --overwrite to redo them")
    redo = "rerun with --overwrite to redo them with these settings, or write to another folder"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        schema = old.get("schema") if isinstance(old, dict) else None
    except (OSError, ValueError) as exc:
        raise StaleOutputsError(f"{path}: cannot be read ({exc}), so the {kept} existing output(s) cannot be "
                                f"checked against the settings; {redo}") from None
    if schema != SUMMARY_SCHEMA:
        raise StaleOutputsError(f"{path} does not record the settings as this version of ddfm-fast does (schema "
                                f"{schema!r}, expected {SUMMARY_SCHEMA}), so the {kept} existing output(s) cannot "
                                f"be checked against them; {redo}")
    before = output_identity(old.get("settings") or {}, old.get("plan"))
    changed = [f"{k} {before.get(k)!r} -> {identity.get(k)!r}" for k in sorted(set(before) | set(identity))
               if before.get(k) != identity.get(k)]
    if changed:
        raise StaleOutputsError(f"{out_dir} holds {kept} output(s) made with other settings ({'; '.join(changed)}); "
                                f"{redo}")
    return None


# --------------------------------------------------------------------------------------------------- one pair


@dataclass
class ReadPair:
    """A pair read once and validated: the sampler's inputs, and what the output writer needs."""

    pair: Pair
    prepared: api.PreparedPair
    color_source: Optional[np.ndarray]  # (H, W, 3) uint8, only for colour output
    resized: Optional[str] = None  # which side was resized, with the sizes, for the summary

    @property
    def model_hw(self) -> tuple[int, int]:
        """The size the model sees: pairs of one model size can share a batch."""
        return tuple(self.prepared.anchor.shape[-2:])  # type: ignore[return-value]


def _size(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}"


def read_pair(pair: Pair, run: RunConfig) -> ReadPair:
    """Read a pair (each file decoded once), resize if asked, apply the size policy.

    Raises :class:`PairError` naming the files and the problem.
    """
    r = run.roles
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
    return ReadPair(pair, prepared, color, resized)


def fuse_batch(model: Optional[nn.Module], batch: list[ReadPair], run: RunConfig, device: torch.device,
               callback: Optional[Callable[[StepOutput], None]] = None) -> list[api.FusionResult]:
    """Fuse read pairs of one model size as one batch (one EM tau per image): :func:`api.fuse_prepared`."""
    return api.fuse_prepared([item.prepared for item in batch], run.sampler, run.accel, model, device,
                             callback=callback)


def output_array(result: api.FusionResult, item: ReadPair, output: OutputKind) -> np.ndarray:
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


def write_result(result: api.FusionResult, item: ReadPair, dest: Path, run: RunConfig,
                 seconds: float) -> dict[str, Any]:
    """Write one output atomically (temporary file + rename); returns its summary record."""
    array = output_array(result, item, run.output)
    if run.output == "npy":
        io.save_npy(array, dest)
    else:
        io.save_png(array, dest)
    r = run.roles
    record: dict[str, Any] = {"stem": item.pair.stem, r.ir: str(item.pair.ir), r.vis: str(item.pair.vis),
                              "output": str(dest), "size": [result.size[1], result.size[0]],
                              "seconds": round(seconds, 4)}
    if item.resized:
        record["resized"] = item.resized
    if run.output == "color" and item.color_source is not None and not io.has_chroma(item.color_source):
        record["note"] = "the colour source is gray, so the colour output is gray"
    return record


@dataclass
class SingleResult:
    """What :func:`run_single` wrote, and the plan that ran (None for EM only)."""

    record: dict[str, Any]
    plan: Optional[ExecutionPlan]


def run_single(model: Optional[nn.Module], pair: Pair, dest: Path, run: RunConfig, *, device: torch.device,
               progress_dir: Optional[Path] = None, step_bar: Optional[BarFactory] = None) -> SingleResult:
    """Fuse one pair into ``dest`` (replacing it, atomically); optionally its per-step images in ``progress_dir``.

    Errors of the pair raise :class:`PairError`.
    """
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


# --------------------------------------------------------------------------------------------------- folders


def pending_pairs(pairs: Iterable[Pair], out_dir: Path, suffix: str,
                  overwrite: bool) -> tuple[list[Pair], list[dict[str, Any]]]:
    """The pairs to fuse, and a ``skipped`` record for each pair whose output exists (kept unless ``overwrite``)."""
    todo: list[Pair] = []
    skipped: list[dict[str, Any]] = []
    for pair in pairs:
        dest = Path(out_dir) / (pair.stem + suffix)
        if dest.exists() and not overwrite:
            skipped.append({"stem": pair.stem, "output": str(dest),
                            "reason": "output exists (resume; --overwrite to redo)"})
        else:
            todo.append(pair)
    return todo, skipped


def size_buckets(items: Iterable[ReadPair], batch_size: int) -> Iterator[list[ReadPair]]:
    """Batches of up to ``batch_size`` pairs of one model size, each as soon as it is full, the rest at the end."""
    buckets: dict[tuple[int, int], list[ReadPair]] = {}
    for item in items:
        bucket = buckets.setdefault(item.model_hw, [])
        bucket.append(item)
        if len(bucket) >= batch_size:
            yield buckets.pop(item.model_hw)
    yield from buckets.values()


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, (PairError, io.ImageReadError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class _FolderRun:
    """The state of one :func:`run_folder` call: the summary, the bars, and the batch loop."""

    def __init__(self, model: Optional[nn.Module], run: RunConfig, out_dir: Path, device: torch.device,
                 summary: RunSummary, progress: Any, step_bar: Optional[BarFactory],
                 progress_dir: Optional[Path]) -> None:
        self.model, self.run, self.out_dir, self.device = model, run, out_dir, device
        self.summary, self.progress, self.step_bar, self.progress_dir = summary, progress, step_bar, progress_dir
        self.plan: Optional[ExecutionPlan] = None  # the plan that ran (the sampler's, with its fallbacks)

    def fail(self, pair: Pair, exc: BaseException) -> None:
        reason = _describe_error(exc)
        r = self.run.roles
        self.summary.failed.append({"stem": pair.stem, r.ir: str(pair.ir), r.vis: str(pair.vis), "reason": reason})
        self.progress.write(f"failed: {pair.stem}: {reason}")

    def read(self, todo: list[Pair]) -> Iterator[ReadPair]:
        for pair in todo:
            try:
                yield read_pair(pair, self.run)
            except PairError as exc:
                self.fail(pair, exc)
                self.progress.update(1)

    def fuse(self, batch: list[ReadPair]) -> None:
        """Fuse and write one batch; a failing batch (e.g. out of memory) is retried pair by pair."""
        t = time.perf_counter()
        steps = None
        if self.step_bar is not None:
            steps = self.step_bar(total=self.run.sampler.num_steps(), desc=f"steps ({len(batch)} img)",
                                  unit="step", leave=False)
        recorder = ProgressRecorder(self.progress_dir, batch[0].prepared.out_hw) if self.progress_dir else None
        try:
            results = fuse_batch(self.model, batch, self.run, self.device, step_callback(recorder, steps))
        except (KeyboardInterrupt, SystemExit):
            raise
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
        for item, result in zip(batch, results, strict=True):
            self.plan = result.plan or self.plan
            try:
                record = write_result(result, item, self.out_dir / (item.pair.stem + self.run.suffix), self.run,
                                      per_image)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - a failed write (disk full) fails its pair
                self.fail(item.pair, exc)
                continue
            if recorder is not None:
                record["progress"] = str(recorder.finish())
            self.summary.done.append(record)
        self.summary.fusion_s += time.perf_counter() - t
        self.progress.update(len(batch))


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
    shard: Optional[Callable[[list[Pair]], list[Pair]]] = None,
    write_summary: bool = True,
) -> RunSummary:
    """Fuse every pair of ``pairing`` into ``out_dir/<stem><suffix>`` and write ``out_dir/ddfm_summary.json``.

    Existing outputs are kept unless ``overwrite`` (resume), after :func:`check_resume` (a
    :class:`StaleOutputsError` before anything is written when they were made with other settings). A pair that
    fails (unreadable, size mismatch, an error while fusing or writing) is recorded with its reason and the run
    goes on. Pairs of one model size are fused ``run.batch_size`` at a time. The summary is written even when
    the run is interrupted (``complete: false``). ``plan`` is the execution plan the caller resolved (recorded;
    replaced by the sampler's, with its run-time fallbacks, once a batch ran). ``extra_settings`` go into the
    summary's settings beside :meth:`RunConfig.to_dict` (device, paper, ...). ``bar`` / ``step_bar`` are
    tqdm-like factories. ``progress_dir`` (a pairing of exactly one pair) receives its per-step images.

    Distributed hooks (``ddfm_fast.distributed``; unused by a single-process run): ``shard`` receives the pending
    pairs and returns the ones this process fuses; ``write_summary=False`` leaves the file to the caller.
    """
    out_dir = Path(out_dir)
    if progress_dir is not None and len(pairing.pairs) != 1:
        raise InputError(
            f"per-step progress images are written for one pair only, but the folders hold {len(pairing.pairs)} pairs"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output folder {out_dir}: exists and is not a folder")
    t0 = time.perf_counter()
    run = run.for_model(model)
    todo, skipped = pending_pairs(pairing.pairs, out_dir, run.suffix, overwrite)
    warning = check_resume(out_dir, run.identity(plan), len(skipped))
    if shard is not None:  # distributed hook: this rank's share of the pending pairs (a collective call)
        todo = shard(todo)
    settings = {**run.to_dict(), "num_steps": run.sampler.num_steps(), **(extra_settings or {})}
    summary = RunSummary(settings=settings, inputs=dict(inputs or {}), output_dir=str(out_dir),
                         plan=None if plan is None else plan.to_dict(), skipped=skipped,
                         unpaired=pairing.unpaired, ignored=[str(p) for p in pairing.ignored],
                         warnings=[warning] if warning else [])
    summary.failed += [{"stem": u.stem, "reason": u.reason} for u in pairing.ambiguous]
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = (bar or NoBar)(total=len(todo), desc="fuse", unit="img")
    for message in summary.warnings:
        progress.write(f"warning: {message}")
    state = _FolderRun(model, run, out_dir, device, summary, progress, step_bar, progress_dir)
    try:
        for batch in size_buckets(state.read(todo), run.batch_size):
            state.fuse(batch)
        summary.complete = True
    finally:
        progress.close()
        if state.plan is not None:
            summary.plan = state.plan.to_dict()
        for records in (summary.done, summary.failed):
            records.sort(key=lambda rec: rec.get("stem", ""))
        summary.finished = now()
        summary.wall_s = time.perf_counter() - t0
        if write_summary:  # distributed hook: False on every rank, rank 0 writes the merged summary
            summary.write(out_dir)
    return summary
