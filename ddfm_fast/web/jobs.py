"""Jobs behind ``ddfm-fast serve``: checked uploads, one fusion at a time per model, live progress, cancel.

Nothing here knows about HTTP: :class:`JobManager` takes decoded :class:`Upload` objects and a
:class:`JobRequest`, runs one job at a time on a worker thread (the model is loaded once and used by that thread
only), and keeps a small, bounded record of recent jobs that the web layer turns into JSON and PNG responses.

Uploads are decoded by the command line's own readers (:func:`ddfm_fast.io.open_image`, then
:func:`ddfm_fast.io.read_gray` and :func:`ddfm_fast.io.read_rgb8` on the decoded image, and
:func:`ddfm_fast.metrics.read_gray_eval` for the metrics), which read a path: the bytes are written to a file the
server names itself, inside a private temporary folder that is removed right after decoding, so every check those
readers make on a file (the pixel cap from the header before decoding, one frame, the mode) applies to an upload
exactly as to a file given to ``ddfm-fast fuse``. Nothing the client sends is used as a path: its file name is only a label in messages, and the
temporary path is replaced by that label in any error, so the page shows the command line's words.

Cancel: the sampler calls a per-step callback (:class:`~ddfm_fast.sampler.StepOutput`); the job's callback raises
:class:`Cancelled` when the job was cancelled, which ends :meth:`~ddfm_fast.sampler.DDFMSampler.sample` between two
steps, and :func:`~ddfm_fast.em_only.fuse_em_only` between two EM iterations (``prior="none"``).
"""

from __future__ import annotations

import base64
import io as _bytesio
import logging
import math
import secrets
import tempfile
import threading
import time
import unicodedata
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from ddfm_fast import api, io
from ddfm_fast.config import AccelConfig, ConfigError, SamplerConfig
from ddfm_fast.em_only import EMOnlyNonFiniteError
from ddfm_fast.metrics import METRIC_NAMES, evaluate, read_gray_eval
from ddfm_fast.sampler import NonFiniteError, StepOutput

log = logging.getLogger("ddfm_fast.web")

# The two slots of a pair, by mode: (slot "ir", slot "vis"). Slot "ir" is the partner V and metric source A
# (infrared / functional), slot "vis" the anchor I and metric source B (visible / MRI), as ``ddfm_fast.api`` and
# ``ddfm-fast eval`` assign them.
MODES: dict[str, tuple[str, str]] = {
    "ivf": ("infrared image", "visible image"),
    "mif": ("functional image (CT / PET / SPECT)", "MRI image"),
}
COLOR_SLOT = {"ivf": "vis", "mif": "ir"}  # whose chroma the colour output keeps (the visible image, or PET/SPECT)
SLOTS = ("ir", "vis")
STATES = ("queued", "running", "done", "error", "cancelled")
FINAL_STATES = frozenset({"done", "error", "cancelled"})
MAX_STEPS = 1000  # the ADM models' training schedule has 1000 timesteps, so no respacing has more
OUTPUT_KINDS = ("fused", "color", "fused16")


class Cancelled(Exception):
    """Raised from the sampler's per-step callback to stop a cancelled job between two steps."""


class UploadError(ValueError):
    """An upload that cannot be used; the message is shown on the page as it is."""


class UploadTooLarge(UploadError):
    """An upload over the byte limit."""


class RequestError(ValueError):
    """A fusion request that cannot be run (unknown upload, bad option, sizes that differ); shown on the page."""


class QueueFull(RuntimeError):
    """More jobs are waiting than the server keeps in its queue."""


@dataclass(frozen=True)
class Limits:
    """What the server accepts and keeps.

    Attributes:
        max_upload_bytes: the largest upload in bytes (the pixel cap is the image reader's own, as for the CLI).
        max_queue: jobs that may wait behind the running one.
        keep_jobs: finished jobs whose results stay downloadable (oldest dropped first).
        keep_uploads: decoded uploads kept for new jobs (a job keeps its own two alive until it is dropped).
        preview_frames: about how many live x0 estimates a run sends (one every N / preview_frames steps).
        preview_side: the longest side of a live x0 image, in pixels (larger estimates are shrunk for display).
    """

    max_upload_bytes: int = 64 * 1024 * 1024
    max_queue: int = 8
    keep_jobs: int = 16
    keep_uploads: int = 8
    preview_frames: int = 25
    preview_side: int = 512

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_queue", "keep_jobs", "keep_uploads", "preview_frames", "preview_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def display_name(name: Optional[str], fallback: str) -> str:
    """A client's file name reduced to a label for messages: its last path part, printable, at most 80 characters.

    It is never used as a path.
    """
    text = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(c for c in text if unicodedata.category(c)[0] != "C").strip()
    return (text[:77] + "...") if len(text) > 80 else (text or fallback)


def png_bytes(array: np.ndarray) -> bytes:
    """An (H, W) uint8 / uint16 or (H, W, 3) uint8 array encoded as PNG (16-bit gray stays 16-bit)."""
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG output needs uint8 or uint16 data, got {array.dtype}")
    buf = _bytesio.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------- uploads


@dataclass
class Upload:
    """One decoded upload: what the sampler, the colour output and the metrics read from it."""

    token: str
    label: str
    gray: np.ndarray  # (H, W) float32 in [0, 1]: io.read_gray, the official driver's reading
    rgb8: np.ndarray  # (H, W, 3) uint8: io.read_rgb8, the colour output's source
    eval_gray: np.ndarray  # (H, W) float32 0..255: metrics.read_gray_eval, as ``ddfm-fast eval`` reads a file
    display_png: bytes  # the image as the page shows it (8-bit)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.gray.shape[1]), int(self.gray.shape[0])


def decode_upload(data: bytes, label: str, *, suffix: str = "") -> Upload:
    """Decode uploaded bytes with the command line's readers; raises :class:`UploadError` in the readers' words.

    ``suffix`` (e.g. ``".png"``) is kept only when it is one of the image suffixes the CLI knows, so the temporary
    file looks like a file given to ``ddfm-fast fuse``; the readers identify the format from the bytes.
    """
    if not data:
        raise UploadError(f"{label}: the file is empty")
    suffix = suffix.lower() if suffix.lower() in io.IMAGE_SUFFIXES else ""
    with tempfile.TemporaryDirectory(prefix="ddfm-serve-") as folder:  # mode 0700, removed on exit
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            decoded = io.open_image(path)  # the header checks (pixel cap, one frame), then one decode
            gray = io.read_gray(decoded)
            rgb8 = io.read_rgb8(decoded)
            eval_gray = read_gray_eval(path)  # the evaluator's own reading (16-bit: the high byte), after the cap
        except (io.ImageReadError, ValueError, OSError, Image.DecompressionBombError) as exc:
            # The readers name the file by its path; the page names it by the client's label.
            raise UploadError(str(exc).replace(str(path), label)) from None
    if gray.shape != rgb8.shape[:2] or gray.shape != eval_gray.shape:  # three readers of one file must agree
        raise UploadError(f"{label}: the image readers disagree on its size ({gray.shape}, {rgb8.shape[:2]}, "
                          f"{eval_gray.shape})")
    shown = rgb8 if io.has_chroma(rgb8) else rgb8[..., 0]
    return Upload(secrets.token_hex(16), label, gray, rgb8, eval_gray, png_bytes(shown))


class UploadStore:
    """The most recent decoded uploads by token (bounded; least recently used dropped first)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._items: OrderedDict[str, Upload] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, upload: Upload) -> None:
        with self._lock:
            self._items[upload.token] = upload
            while len(self._items) > self.keep:
                self._items.popitem(last=False)

    def get(self, token: str) -> Optional[Upload]:
        with self._lock:
            item = self._items.get(token)
            if item is not None:
                self._items.move_to_end(token)
            return item


# --------------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobRequest:
    """What the page asks for: the mode (roles), the prior, steps (None: the model's default), seed, colour output,
    size policy. Checked by :meth:`JobManager.submit` through :class:`~ddfm_fast.config.SamplerConfig`."""

    mode: str = "ivf"
    prior: str = "diffusion"
    steps: Optional[int] = None
    seed: int = 3407
    color: bool = False
    size_policy: str = "pad"


@dataclass
class Job:
    """One fusion: its inputs, its state and, when done, its outputs (PNG bytes) and metrics."""

    id: str
    request: JobRequest
    config: SamplerConfig
    pair: api.PreparedPair
    ir: Upload
    vis: Upload
    total: int  # steps (diffusion) or EM iterations (prior none)
    state: str = "queued"
    step: int = 0
    error: Optional[str] = None
    preview: Optional[bytes] = None  # PNG of the latest x0 estimate
    preview_step: int = 0
    outputs: dict[str, bytes] = field(default_factory=dict)
    views: dict[str, bytes] = field(default_factory=dict)  # the sources cropped to the output, for the page
    metrics: Optional[dict[str, float]] = None
    metrics_note: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    seconds: Optional[float] = None
    cancel_event: threading.Event = field(default_factory=threading.Event)

    @property
    def out_size(self) -> tuple[int, int]:
        """(width, height) of the output."""
        return self.pair.out_hw[1], self.pair.out_hw[0]


def _jsonable(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


class JobManager:
    """One worker thread fusing one job at a time with one loaded model; a bounded FIFO queue in front of it.

    Args:
        model: the loaded UNet (None: only ``prior="none"`` jobs can run).
        device: where the model lives and the jobs run.
        limits: queue and retention sizes, upload limits.
        model_name: how the page names the model.
    """

    def __init__(self, model: Optional[nn.Module], device: torch.device, limits: Limits = Limits(),
                 model_name: str = "", accel: AccelConfig = AccelConfig()) -> None:
        self.model = model
        self.accel = accel  # how diffusion jobs run (``serve --fast``); EM-only jobs have no UNet to speed up
        self.device = torch.device(device)
        self.limits = limits
        self.model_name = model_name
        self.default_steps: Optional[int] = getattr(model, "default_steps", None) if model is not None else None
        self.uploads = UploadStore(limits.keep_uploads)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: deque[Job] = deque()
        self._running: Optional[Job] = None
        self._cond = threading.Condition()
        self._closing = False
        self.version = 0  # bumped on every change a page may want to show
        self._worker = threading.Thread(target=self._work, name="ddfm-serve-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------ requests

    def add_upload(self, data: bytes, label: str, suffix: str = "") -> Upload:
        """Check the byte limit, decode with the CLI's readers, keep it; raises :class:`UploadError`."""
        if len(data) > self.limits.max_upload_bytes:
            raise UploadTooLarge(too_large_message(label, len(data), self.limits.max_upload_bytes))
        upload = decode_upload(data, label, suffix=suffix)
        self.uploads.add(upload)
        return upload

    def submit(self, ir_token: str, vis_token: str, request: JobRequest) -> Job:
        """Queue a job; raises :class:`RequestError` (shown on the page) or :class:`QueueFull`."""
        if request.mode not in MODES:
            raise RequestError(f"mode must be one of {', '.join(MODES)}, got {request.mode!r}")
        uploads = []
        for slot, token in zip(SLOTS, (ir_token, vis_token)):
            upload = self.uploads.get(token) if isinstance(token, str) else None
            if upload is None:
                role = MODES[request.mode][SLOTS.index(slot)]
                raise RequestError(f"the {role} is missing or no longer kept by the server; choose it again")
            uploads.append(upload)
        ir, vis = uploads
        if request.prior == "diffusion" and self.model is None:
            raise RequestError("this server was started without a model; choose prior 'none' (EM only)")
        if request.steps is not None and not (1 <= request.steps <= MAX_STEPS):
            raise RequestError(f"steps must be between 1 and {MAX_STEPS}, got {request.steps}")
        try:
            cfg = SamplerConfig(prior=request.prior, steps=request.steps, seed=request.seed,  # type: ignore[arg-type]
                                size_policy=request.size_policy)  # type: ignore[arg-type]
            # The library's own check and words for sizes that differ or are too small for the size policy.
            pair = api.prepare_arrays(ir.gray, vis.gray, cfg.size_policy, ir_name=ir.label, vis_name=vis.label)
        except (ConfigError, ValueError) as exc:
            raise RequestError(str(exc)) from None
        cfg = cfg.for_model(self.default_steps if cfg.prior == "diffusion" else None)
        job = Job(secrets.token_hex(8), request, cfg, pair, ir, vis, total=cfg.num_steps())
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.limits.max_queue:
                raise QueueFull(f"{len(self._queue)} jobs are already waiting (the server keeps at most "
                                f"{self.limits.max_queue}); wait for one to finish or cancel one")
            self._jobs[job.id] = job
            self._queue.append(job)
            self._bump()
            self._cond.notify_all()
        return job

    def cancel(self, job_id: str) -> Optional[Job]:
        """Cancel a queued job at once, or a running one at its next step; None for an unknown job."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.state == "queued":
                self._queue.remove(job)
                job.state, job.error = "cancelled", "cancelled before it started"
                self._bump()
                self._evict()
            elif job.state == "running":
                job.cancel_event.set()
                self._bump()
            return job

    def get(self, job_id: str) -> Optional[Job]:
        with self._cond:
            return self._jobs.get(job_id)

    def queue_position(self, job: Job) -> Optional[int]:
        """How many jobs run or wait ahead of ``job`` (None once it has started)."""
        with self._cond:
            if job.state != "queued":
                return None
            return self._queue.index(job) + (1 if self._running is not None else 0)

    def jobs(self) -> list[Job]:
        """Every job still kept, oldest first."""
        with self._cond:
            return list(self._jobs.values())

    @property
    def closing(self) -> bool:
        """True once the server began to stop: event streams end, no job is taken."""
        return self._closing

    def begin_close(self) -> None:
        """Cancel every queued job and the running one (at its next step), without waiting: the first thing a
        stopping server does, so that the pages following a job are told and their streams end."""
        with self._cond:
            self._closing = True
            for job in list(self._queue):
                job.state, job.error = "cancelled", "the server is shutting down"
            self._queue.clear()
            if self._running is not None:
                self._running.cancel_event.set()
            self._bump()
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker (waits up to ``timeout`` seconds for the running step)."""
        self.begin_close()
        self._worker.join(timeout)

    # ------------------------------------------------------------------------------------------ JSON views

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_name if self.model is not None else None,
            "default_steps": self.default_steps,
            "em_default_iterations": SamplerConfig(prior="none").for_model(None).num_steps(),
            "device": str(self.device),
            "max_upload_bytes": self.limits.max_upload_bytes,
            "max_steps": MAX_STEPS,
            "max_queue": self.limits.max_queue,
            "modes": {m: {"ir": a, "vis": b} for m, (a, b) in MODES.items()},
            "metrics": list(METRIC_NAMES),
        }

    def snapshot(self, job: Job, *, with_preview: bool = False) -> dict[str, Any]:
        """The job as the page shows it (the live x0 image as a data URL when ``with_preview``)."""
        snap: dict[str, Any] = {
            "id": job.id, "state": job.state, "mode": job.request.mode, "prior": job.config.prior,
            "steps": job.total, "step": job.step, "seed": job.config.seed, "color": job.request.color,
            "size_policy": job.config.size_policy, "size": list(job.out_size),
            "labels": {"ir": job.ir.label, "vis": job.vis.label},
            "sources": {"ir": job.ir.token, "vis": job.vis.token},
            "queue_position": self.queue_position(job), "error": job.error, "notes": list(job.notes),
            "seconds": job.seconds, "preview_step": job.preview_step,
            "outputs": [k for k in OUTPUT_KINDS if k in job.outputs],
            "metrics": None if job.metrics is None else {k: _jsonable(v) for k, v in job.metrics.items()},
            "metrics_note": job.metrics_note,
        }
        if with_preview and job.preview is not None:
            snap["preview"] = "data:image/png;base64," + base64.b64encode(job.preview).decode("ascii")
        return snap

    def queue_view(self) -> list[dict[str, Any]]:
        """A short line per kept job for the page's queue panel."""
        with self._cond:
            jobs = list(self._jobs.values())
        return [{"id": j.id, "state": j.state, "step": j.step, "steps": j.total, "prior": j.config.prior,
                 "labels": [j.ir.label, j.vis.label]} for j in jobs]

    # ------------------------------------------------------------------------------------------ worker

    def _bump(self) -> None:
        self.version += 1

    def _evict(self) -> None:
        """Drop the oldest finished jobs beyond ``keep_jobs`` (queued and running jobs are always kept)."""
        finished = [k for k, j in self._jobs.items() if j.state in FINAL_STATES]
        for key in finished[: max(0, len(finished) - self.limits.keep_jobs)]:
            del self._jobs[key]

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._queue.popleft()
                job.state, job.started = "running", time.perf_counter()
                self._running = job
                self._bump()
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - a job's failure is shown on the page; the server goes on
                log.exception("job %s failed", job.id)
                self._finish(job, "error", f"{type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._running = None
                    self._evict()
                    self._bump()

    def _finish(self, job: Job, state: str, error: Optional[str] = None) -> None:
        with self._cond:
            job.state, job.error = state, error
            if job.started is not None:
                job.seconds = round(time.perf_counter() - job.started, 3)
            self._bump()

    def _callback(self, job: Job) -> Any:
        every = max(1, round(job.total / self.limits.preview_frames))
        h, w = job.pair.out_hw

        def callback(out: StepOutput) -> None:
            done = out.j + 1
            if job.cancel_event.is_set():
                job.step = done
                raise Cancelled(f"cancelled after step {done} of {job.total}")
            if done % every == 0 or done == job.total:
                with np.errstate(invalid="ignore"):  # a non-finite estimate shows as black; the run then fails
                    frame = io.to_uint8_truncated(io.sample_luma(out.pred_xstart[0:1, :, :h, :w]))
                job.preview = png_bytes(_shrink(frame, self.limits.preview_side))
                job.preview_step = done
            job.step = done
            with self._cond:
                self._bump()

        return callback

    def _run(self, job: Job) -> None:
        model = self.model if job.config.prior == "diffusion" else None
        try:
            (result,) = api.fuse_prepared([job.pair], job.config, self.accel, model, self.device,
                                          callback=self._callback(job))
        except Cancelled as exc:
            self._finish(job, "cancelled", str(exc))
            return
        except (NonFiniteError, EMOnlyNonFiniteError) as exc:
            self._finish(job, "error", str(exc))
            return
        if job.cancel_event.is_set():  # cancelled after the callback of the last step: the result is not shown
            self._finish(job, "cancelled", f"cancelled after step {job.total} of {job.total}; its result was discarded")
            return
        job.step = job.total
        try:
            self._outputs(job, result)
        except NonFiniteError as exc:
            job.outputs.clear()
            self._finish(job, "error", str(exc))
            return
        self._finish(job, "done")

    def _outputs(self, job: Job, result: api.FusionResult) -> None:
        """PNGs (8-bit gray, colour, 16-bit raw luminance) and the 12 metrics of the 8-bit gray fusion."""
        h, w = result.size
        if not np.isfinite(result.luma).all():  # the sampler checks its sample; this guards what is written
            raise NonFiniteError("the fused luminance is not finite; nothing was written")
        job.outputs["fused"] = png_bytes(result.fused)
        if job.ir.token == job.vis.token or np.array_equal(job.ir.rgb8, job.vis.rgb8):
            job.notes.append("the two images are the same picture: it was fused with itself")
        flat = io.flat_output_note(result.luma)
        if flat:
            job.notes.append(flat)
        if result.plan is not None and result.plan.fallbacks:  # a fast path given up at run time is said on the page
            job.notes.extend(f"fast path {f}" for f in result.plan.fallbacks)
        for slot, upload in zip(SLOTS, (job.ir, job.vis)):
            rgb = upload.rgb8[:h, :w]
            job.views[slot] = png_bytes(rgb if io.has_chroma(rgb) else rgb[..., 0])
        job.outputs["fused16"] = png_bytes(io.luma_to_uint16(result.luma))
        if job.request.color:
            source = (job.vis if COLOR_SLOT[job.request.mode] == "vis" else job.ir).rgb8[:h, :w]
            job.outputs["color"] = png_bytes(io.colorize(result.fused, source))
            if not io.has_chroma(source):
                job.notes.append("the colour source is gray, so the colour output is gray")
        # As ``ddfm-fast eval --crop-sources`` scores the saved gray PNG: A = slot ir, B = slot vis, cropped to
        # the output (the crop size policy makes it smaller than the sources).
        try:
            job.metrics = evaluate(result.fused.astype(np.float32), job.ir.eval_gray[:h, :w],
                                   job.vis.eval_gray[:h, :w])
        except ValueError as exc:
            job.metrics_note = str(exc)


def _shrink(frame: np.ndarray, side: int) -> np.ndarray:
    """Shrink an (H, W) uint8 frame so its longest side is at most ``side`` (display only)."""
    h, w = frame.shape
    scale = side / max(h, w)
    if scale >= 1:
        return frame
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR))


def too_large_message(label: str, size: int, limit: int, *, at_least: bool = False) -> str:
    return (f"{label}: the file is {'more than ' if at_least else ''}{size / 2**20:.1f} MiB; uploads are limited "
            f"to {limit / 2**20:.0f} MiB (ddfm-fast serve --max-upload-mb)")
