"""The benchmark behind ``ddfm-fast bench``: rows in priority order, each gated by its predicted time, each with
its fidelity.

The gpu suite (the paper model's layout with random weights, which costs what the paper model costs; 100 DDIM
steps), in priority order:

    1. fp32 reference: eager, TF32 off (true fp32); the PSNR reference of every row of its size and step count
    2. the fast path, ``AccelConfig.fast()`` on CUDA: fp16 UNet + torch.compile (inductor's default mode) + the
       Triton step tail + CUDA graphs, at 480x640 (the headline number)
    3. the same without CUDA graphs, 4. fp16 eager (no compile, no graphs; the Triton tail)
    5. the step tail alone (Triton, then plain torch) timed inside one CUDA graph of many calls
    6. the reference with TF32 allowed: what TF32 costs in PSNR and gains in speed
    7. the fast path at 256x256, 8. at 1280x1024 (peak memory), 9. at batch 8
    opt-in: the fast path with max-autotune (``--max-autotune``), with channels_last (``--channels-last``)

Each row below the fast path and the Triton tail names a ``parent`` it differs from by one switch (tests check
the chain). The
cpu and quick suites run a reference, a chain of rows at one size, its last row at other sizes, then variants.

The gate. Before a row starts, its time is predicted: compile (the longest compile measured so far in this run,
else the plan's prior) + (1 + steps) x batch x the UNet's FLOPs per image (counted by
``torch.utils.flop_counter`` on the meta device) / a rate in FLOP/s. The rate is the one measured by the rows
before with the same precision and compile setting, else the same precision, else the plan's nominal rate for
the precision scaled by how the last measured row compared with its own nominal rate (so a slower device slows
every prediction). A row predicted to end after ``budget_s`` (counted from the command's start, tests included)
is skipped, and the prediction is its reason. Only the first row of a run is predicted from nominal rates alone.

Timing protocol of a sampling row: a warm-up call compiles (compile rows), captures (graph rows) and runs one
step, and is stopped there; ``compile_s`` is that call's time less one measured step. Then one full sample is
timed with a per-step timer (CUDA events, so no host synchronisation between steps; ``time.perf_counter`` on a
CPU): ``per_image_s`` is its wall time over the batch, ``step_s`` the median step, ``tflops`` the UNet FLOPs of
a step over ``step_s``. A row whose execution plan changed at run time (a compile or a capture given up:
``ExecutionPlan.fallbacks``) fails: it would otherwise time the slow path under the fast path's name. PSNR is
that of the first image's 8-bit output against the reference's (the first image of every batch has the
reference's inputs); peak memory is the row's own (its model copy, buffers, graph pool, activations).

The whole command (the cpu suite, before its rows): the README's first command, ``ddfm-fast fuse --example -o
OUT.png``, run as a user runs it (a fresh interpreter: imports, model load, sampling, writing), with the default
prior and with the previous shipped prior (``--checkpoint ddfm-small``), interleaved round by round so a change in
the machine's load hits both alike. Wall seconds from ``perf_counter``, user and system seconds of the child from
``os.wait4``; medians over the rounds, their ratio, and the README command's target (<= 15 s, default prior). Each
round is gated like a row. A run that fails is reported with its stderr's last line, never with a time.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ddfm_fast import precision
from ddfm_fast.api import postprocess
from ddfm_fast.config import AccelConfig, SamplerConfig
from ddfm_fast.sampler import DDFMSampler
from ddfm_fast.unet import ADM256_UNCOND_CONFIG, UNetConfig, UNetModel

SAMPLE, TAIL = "sample", "tail"


@dataclass(frozen=True)
class Row:
    """One benchmark row: an acceleration setting at one size and batch.

    ``accel`` is given in full (no ``None`` left to the plan) in the gpu suite, so the row measures what its name
    says on every CUDA machine. ``size`` None means the plan's main size. ``tf32`` allows TF32 in the float32
    convolutions and matmuls (off = true fp32). ``timed_steps`` times only that many steps and extrapolates (no
    PSNR). ``kind`` is ``"sample"`` (a full DDFM sample) or ``"tail"`` (the step tail alone, ``accel.backend``).
    """

    name: str
    accel: AccelConfig = AccelConfig()
    size: Optional[tuple[int, int]] = None
    batch: int = 1
    tf32: bool = False
    timed_steps: Optional[int] = None
    parent: Optional[str] = None
    kind: str = SAMPLE

    def at(self, size: Optional[tuple[int, int]] = None, batch: Optional[int] = None) -> "Row":
        return dataclasses.replace(self, size=self.size if size is None else size,
                                   batch=self.batch if batch is None else batch)

    @property
    def compiles(self) -> bool:
        return self.kind == SAMPLE and bool(self.accel.compile)

    @property
    def precision_key(self) -> str:
        """What sets the UNet's arithmetic rate: fp16 / bf16, true fp32, or fp32 with TF32."""
        dtype = self.accel.dtype or "fp32"
        return "tf32" if dtype == "fp32" and self.tf32 else dtype


@dataclass(frozen=True)
class Priors:
    """Nominal rates and times for predictions before anything was measured (assumptions, not measurements)."""

    tflops: Mapping[str, float]  # eager UNet rate per precision key, TFLOP/s
    compile_gain: float  # a compiled step's rate over the eager one
    compile_s: float  # the first compile of the UNet's step
    tail_s: float  # one step-tail row (kernel builds, capture, replays)
    overhead_s: float  # per row: model copy and cast, buffers, PSNR


# H100 / H200 (the same arithmetic rates; datasheet fp32 67, dense bf16/fp16 990 TFLOP/s). Assumed, not measured:
# true fp32 at ~40% of its peak, TF32 at ~2.4x that, the fp16 eager UNet at ~15% of the tensor peak (GroupNorm in
# fp32 and a few hundred small kernels per step), compiled ~1.7x faster (the 2.5 s/image target needs ~430 TFLOP/s);
# inductor's default mode on the 552.8 M UNet: ~150 s cold with 16 compile workers.
GPU_PRIORS = Priors(tflops={"fp32": 25.0, "tf32": 60.0, "fp16": 150.0, "bf16": 150.0}, compile_gain=1.7,
                    compile_s=150.0, tail_s=20.0, overhead_s=5.0)
# This repository's 2-core CPU (bench/results/cpu-*.json: the small prior at 256x256 runs ~20 GFLOP/s in fp32;
# fp16 is emulated, ~10x slower; bf16 ~1.6x faster); a CPU inductor compile ~60 s (README), Dynamo alone ~10 s.
CPU_PRIORS = Priors(tflops={"fp32": 0.02, "tf32": 0.02, "fp16": 0.002, "bf16": 0.03}, compile_gain=1.2,
                    compile_s=60.0, tail_s=5.0, overhead_s=1.0)


# bf16 without AVX512-BF16 / AMX: emulated, about 100x slower than fp32 (the cpu suite's 256x256 bf16 row took 525 s
# against 2.5 s for fp32 on a 2-core AVX2 EPYC, while the machine was shared), slower still than emulated fp16.
EMULATED_BF16_TFLOPS = CPU_PRIORS.tflops["fp32"] / 100


def cpu_priors() -> Priors:
    """:data:`CPU_PRIORS` for this CPU: without native bf16 bf16 is emulated (:data:`EMULATED_BF16_TFLOPS`), so the
    gate skips a bf16 row that would not fit instead of predicting it from the native rate."""
    from ddfm_fast.plan import cpu_has_native_bf16

    if cpu_has_native_bf16():
        return CPU_PRIORS
    return dataclasses.replace(CPU_PRIORS, tflops={**CPU_PRIORS.tflops, "bf16": EMULATED_BF16_TFLOPS})


@dataclass
class Result:
    row: str
    size: str
    batch: int
    steps: int
    per_image_s: Optional[float]
    images_per_s: Optional[float]
    step_s: Optional[float]
    compile_s: Optional[float]
    peak_mem_gib: Optional[float]
    psnr_vs_fp32_db: Optional[float]
    extrapolated: bool
    notes: list[str] = field(default_factory=list)
    error: Optional[str] = None
    speedup_vs_upstream: Optional[float] = None  # official per-image time / this row's, same size (official: batch 1)
    warmup_peak_mem_gib: Optional[float] = None  # peak during the first call (compile, autotune, graph capture)
    status: str = "ok"  # ok, failed or skipped
    skipped: Optional[str] = None  # why the row was not run
    kind: str = SAMPLE
    tflops: Optional[float] = None  # UNet FLOPs of one step / step_s
    speedup_vs_reference: Optional[float] = None  # the fp32 reference's per-image time / this row's, same size
    effective_gbps: Optional[float] = None  # step-tail rows: the bytes a step must move / the time of one step
    predicted_s: Optional[float] = None  # the gate's prediction of this row's time
    seconds: Optional[float] = None  # the row's wall time, warm-up and model copies included
    precision: dict[str, Any] = field(default_factory=dict)  # the float32 switches in force (precision.tf32_flags)
    plan: Optional[dict[str, Any]] = None  # the execution plan that ran (ExecutionPlan.to_dict)

    def fail(self, message: str) -> None:
        self.status, self.error = "failed", message[:500]



def _end_row(result: "Result", t_row: float, device: torch.device) -> None:
    """A row's wall time, and its memory given back before the next row starts."""
    result.seconds = round(time.perf_counter() - t_row, 2)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, where ``platform.processor()`` is often empty), else what
    ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass  # not Linux: platform below
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    """Device, versions, float32 switches, compile caches and date: every report carries where its numbers come
    from."""
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "precision_at_start": precision.tf32_flags(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    # Where compiled code is kept between runs: a second run with the same folders starts warm.
    user = os.environ.get("USER") or "root"
    env["compile_caches"] = {
        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", f"(default) /tmp/torchinductor_{user}"),
        "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR", "(default) ~/.triton/cache"),
    }
    return env


def random_model(config: UNetConfig = ADM256_UNCOND_CONFIG, *, device: torch.device, seed: int = 0) -> nn.Module:
    """A UNet with random weights and the paper model's cost.

    guided-diffusion zero-initialises every block's output layer, which would make eps = 0 and the EM step
    trivial; those layers get small random weights instead, so the step does real work and PSNR means something.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = UNetModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.02 / max(1.0, p[0].numel() ** 0.5))
    return model.eval()


_FLOPS: dict[tuple, int] = {}


def unet_flops(config: UNetConfig, batch: int, height: int, width: int) -> int:
    """FLOPs of one UNet forward (2 per multiply-add: convolutions, matmuls, attention), counted by
    ``torch.utils.flop_counter`` on a meta-device model (no memory, no arithmetic); cached per shape."""
    key = (repr(config), batch, height, width)
    if key not in _FLOPS:
        from torch.utils.flop_counter import FlopCounterMode

        try:
            with torch.device("meta"):
                model = UNetModel(config)
                x = torch.zeros(batch, 3, height, width)
                t = torch.zeros(batch, dtype=torch.long)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x, t)
            _FLOPS[key] = int(counter.get_total_flops())
        except Exception as exc:  # noqa: BLE001 - the gate must not stop the suite; say so, use an estimate
            if config != ADM256_UNCOND_CONFIG:
                raise
            # DESIGN.md: 10.7 TFLOP per forward at 480x640 (counted with torch 2.13), scaled by the pixel count.
            import warnings

            warnings.warn(f"ddfm-fast bench: counting the UNet's FLOPs failed ({type(exc).__name__}: {exc}); "
                          "using 10.7 TFLOP per 480x640 image scaled by pixels", RuntimeWarning, stacklevel=2)
            _FLOPS[key] = int(10.7e12 * batch * height * width / (480 * 640))
    return _FLOPS[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(batch: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Seeded noise and two synthetic sources. Image k's inputs depend on k alone (its own generator), so the
    first image of every batch is the batch-1 image and can be compared with the reference."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    xs, Is = [], []
    for k in range(batch):
        gen = torch.Generator().manual_seed(1234 + k)
        xs.append(torch.randn(1, 3, h, w, generator=gen))
        Is.append(0.6 * torch.sin(3 * xx) * torch.cos(2 * yy) + 0.05 * torch.randn(1, 1, h, w, generator=gen))
    V = (0.8 * torch.tanh(4 * yy - xx)).expand(batch, 1, h, w).clone()
    return tuple(t.to(device) for t in (torch.cat(xs), torch.cat(Is), V))


def psnr_8bit(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB, peak 255) between the official 8-bit outputs of two (B, 3, H, W) samples' first images."""
    h, w = a.shape[-2:]
    fa = postprocess(a[0], (h, w)).fused.astype(np.float64)
    fb = postprocess(b[0], (h, w)).fused.astype(np.float64)
    mse = float(np.mean((fa - fb) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class _WarmedUp(Exception):
    """Raised by the warm-up callback after the first step: the compile and capture are done."""


def _stop_after_first_step(_: Any) -> None:
    raise _WarmedUp


class _StepTimer:
    """The per-step callback of a timed sample: a CUDA event per step (no host sync), or perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = [self._mark()]

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __call__(self, _: Any) -> None:
        self.marks.append(self._mark())

    def step_seconds(self) -> list[float]:
        """Per-step times; call after the device finished (the caller synchronises)."""
        pairs = zip(self.marks, self.marks[1:])
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in pairs]
        return [b - a for a, b in pairs]


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _fmt_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def run_row(row: Row, model: nn.Module, steps: int, device: torch.device, *,
            reference: Optional[torch.Tensor]) -> tuple[Result, Optional[torch.Tensor]]:
    """Time one sampling row (see the module docstring); returns its result and, when fully timed, its sample.

    ``model`` is the fp32 model; a row in another dtype or memory format runs on the sampler's own copy (counted
    in its peak memory, as the shared fp32 model is when the row uses it).
    """
    assert row.size is not None
    cuda = device.type == "cuda"
    h, w = row.size
    n = row.timed_steps or steps
    result = Result(row.name, _fmt_size(row.size), row.batch, steps, None, None, None, None, None, None, n != steps)
    x, I, V = _inputs(row.batch, h, w, device)  # noqa: E741
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    sampler = DDFMSampler(SamplerConfig(steps=n, tau_reduce="image"), row.accel)
    t_row = time.perf_counter()
    try:
        with precision.tf32(row.tf32) as flags, torch.no_grad():
            result.precision = flags
            t0 = time.perf_counter()
            try:
                sampler.sample(model, x, I, V, callback=_stop_after_first_step)
            except _WarmedUp:
                pass
            _sync(device)
            warm = time.perf_counter() - t0
            plan_ = sampler.plan(device)
            shared = _module_bytes(model) if plan_.dtype == "fp32" and not plan_.channels_last else 0
            if cuda:
                result.warmup_peak_mem_gib = (torch.cuda.max_memory_allocated(device) - before + shared) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            timer = _StepTimer(device)
            t0 = time.perf_counter()
            out = sampler.sample(model, x, I, V, callback=timer)
            _sync(device)
            total = time.perf_counter() - t0
        step_times = timer.step_seconds()
        result.step_s = float(statistics.median(step_times))
        result.compile_s = max(0.0, warm - result.step_s)
        result.per_image_s = (steps * result.step_s if n != steps else total) / row.batch
        result.images_per_s = 1.0 / result.per_image_s
        result.tflops = unet_flops_of(model, row) / result.step_s / 1e12
        result.plan = out.plan.to_dict()
        result.notes += [f"plan: {out.plan.describe()}"]
        if cuda:
            result.peak_mem_gib = (torch.cuda.max_memory_allocated(device) - before + shared) / 2**30
        if out.plan.fallbacks:
            result.fail("the plan changed at run time: " + "; ".join(out.plan.fallbacks))
        elif reference is not None and n == steps:
            result.psnr_vs_fp32_db = psnr_8bit(out.sample, reference)
        return result, (out.sample if n == steps else None)
    except Exception as exc:  # noqa: BLE001 - a row that cannot run (OOM, no Triton) is reported, not fatal
        result.fail(f"{type(exc).__name__}: {exc}")
        return result, None
    finally:
        result.seconds = round(time.perf_counter() - t_row, 2)
        # Free this row's runners (buffers, graph pool, compiled step) and model copy before the next row.
        sampler.close()
        del sampler
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def unet_flops_of(model: nn.Module, row: Row) -> int:
    config = getattr(model, "config", None)
    if not isinstance(config, UNetConfig):
        raise TypeError("the benchmark model must be a ddfm_fast UNetModel (its .config sets the FLOP count)")
    assert row.size is not None
    return unet_flops(config, row.batch, *row.size)


# ------------------------------------------------------------------------------------------------ step tail


def tail_bytes(batch: int, height: int, width: int) -> int:
    """The bytes one step tail must move (the fused tail's traffic, ``kernels/em_tail.py``'s docstring): kernels
    A (10 plane reads, 1 write) and B (9 reads, 10 writes) in float32 planes of B*H*W, plus rfft2, the in-place
    divide and irfft2 over the complex half spectrum. The least any implementation moves, so every tail's GB/s is
    on one scale (for the Triton tail it estimates the bandwidth it reaches)."""
    plane = batch * height * width * 4
    half_spectrum = batch * height * (width // 2 + 1) * 8
    return 30 * plane + (plane + half_spectrum) + 2 * half_spectrum + (half_spectrum + plane)


def make_tail(backend: str, size: tuple[int, int], batch: int, device: torch.device) -> Callable[[], Any]:
    """One step tail (everything of a step after the UNet) on fixed inputs, as a closure; the EM state evolves
    from call to call as in sampling. ``backend``: ``"torch"`` (``step_tail_torch``) or ``"triton"``."""
    from ddfm_fast.em import em_init
    from ddfm_fast.schedule import Schedule
    from ddfm_fast.step import step_tail_torch

    h, w = size
    x, I, V = _inputs(batch, h, w, device)  # noqa: E741
    gen = torch.Generator().manual_seed(7)
    eps = (0.9 * x.cpu() + 0.3 * torch.randn(x.shape, generator=gen)).to(device)
    cfg = SamplerConfig(steps=100, tau_reduce="image")
    coef = Schedule.create(100).table(device).coef[0]
    state = em_init(I)
    if backend == "torch":
        return lambda: step_tail_torch(x, eps, coef, I, V, state, cfg)
    if backend != "triton":
        raise ValueError(f"step-tail backend must be 'torch' or 'triton', got {backend!r}")
    from ddfm_fast.plan import BackendError, triton_not_supported_reasons

    reasons = triton_not_supported_reasons(device)
    if reasons:
        raise BackendError("the Triton tail cannot run here: " + "; ".join(reasons))
    from ddfm_fast.kernels.em_tail import TailWorkspace, step_tail_triton

    ws = TailWorkspace.create(I)
    return lambda: step_tail_triton(x, eps, coef, I, V, state, lamb=cfg.lamb, rho=cfg.rho, tau_reduce="image",
                                    workspace=ws)


def time_tail(tail: Callable[[], Any], device: torch.device, calls: int, replays: int = 5) -> tuple[float, str]:
    """Seconds per call of ``tail``, and how they were measured.

    CUDA: ``calls`` calls captured in one CUDA graph, replayed ``replays`` times between two CUDA events, so no
    launch overhead or host synchronisation is in the number (at 10-50 us per call, a per-call host sync would
    measure mostly that). CPU: ``calls`` calls timed with perf_counter.
    """
    if device.type != "cuda":
        tail()
        t0 = time.perf_counter()
        for _ in range(calls):
            tail()
        return (time.perf_counter() - t0) / calls, f"{calls} calls timed with perf_counter"
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # FFT plans, kernel builds and workspaces outside the capture
            tail()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            tail()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / (calls * replays)
    del graph
    return seconds, f"one CUDA graph of {calls} calls, replayed {replays} times between CUDA events"


def run_tail_row(row: Row, device: torch.device, calls: int) -> Result:
    """The step tail alone: us per step and GB/s against :func:`tail_bytes`."""
    assert row.size is not None
    result = Result(row.name, _fmt_size(row.size), row.batch, 1, None, None, None, None, None, None, False,
                    kind=TAIL)
    t_row = time.perf_counter()
    try:
        with torch.no_grad():
            seconds, how = time_tail(make_tail(row.accel.backend, row.size, row.batch, device), device, calls)
        result.step_s = seconds
        result.effective_gbps = tail_bytes(row.batch, *row.size) / seconds / 1e9
        result.notes.append(f"{how}; {tail_bytes(row.batch, *row.size) / 1e6:.1f} MB per step")
    except Exception as exc:  # noqa: BLE001 - reported as the row's failure
        result.fail(f"{type(exc).__name__}: {exc}")
    finally:
        _end_row(result, t_row, device)
    return result


# ---------------------------------------------------------------------------------------------------- plans

REFERENCE = "fp32 eager (reference)"
REFERENCE_ROW = Row(REFERENCE, AccelConfig(dtype="fp32", compile=False, cuda_graphs=False, backend="torch"))

# The fast path as AccelConfig.fast() resolves it on CUDA, every switch explicit: inductor's default mode (a
# compile of about a minute on the paper model); max-autotune is its own opt-in row.
FAST = AccelConfig(dtype="fp16", channels_last=False, compile=True, compile_mode="default", cuda_graphs=True,
                   backend="triton")
HEADLINE = "fast: fp16, compile, Triton tail, CUDA graphs"
GPU_SIZE = (480, 640)


def gpu_rows(*, max_autotune: bool = False, channels_last: bool = False) -> tuple[Row, ...]:
    """The gpu suite's rows after the reference, in priority order (see the module docstring)."""
    rows = [
        Row(HEADLINE, FAST, GPU_SIZE),  # every acceleration at once: the top of the chain
        Row("fast without CUDA graphs", FAST.replace(cuda_graphs=False), GPU_SIZE, parent=HEADLINE),
        Row("fp16 eager (Triton tail)", FAST.replace(cuda_graphs=False, compile=False), GPU_SIZE,
            parent="fast without CUDA graphs"),
        Row("step tail, Triton", AccelConfig(backend="triton"), GPU_SIZE, kind=TAIL),
        Row("step tail, torch", AccelConfig(backend="torch"), GPU_SIZE, kind=TAIL, parent="step tail, Triton"),
        Row("fp32 eager, TF32", REFERENCE_ROW.accel, GPU_SIZE, tf32=True, parent=REFERENCE),
        Row(HEADLINE, FAST, (256, 256), parent=HEADLINE),
        Row(HEADLINE, FAST, (1024, 1280), parent=HEADLINE),
        Row(HEADLINE, FAST, GPU_SIZE, batch=8, parent=HEADLINE),
    ]
    if max_autotune:
        rows.append(Row("fast, max-autotune", FAST.replace(compile_mode="max-autotune"), GPU_SIZE, parent=HEADLINE))
    if channels_last:
        rows.append(Row("fast, channels_last", FAST.replace(channels_last=True), GPU_SIZE, parent=HEADLINE))
    return tuple(rows)


@dataclass(frozen=True)
class Plan:
    """What one suite measures, within a time budget.

    Either an explicit ``schedule`` (rows with their sizes, in priority order: the gpu suite), or the derived
    order: ``rows`` at ``waterfall_size`` (batch 1), the last of them at every (size, batch) of
    ``(waterfall_size, *fast_sizes) x batches``, then ``variants`` at ``waterfall_size``. The reference row runs
    first either way.
    """

    config: UNetConfig
    steps: int
    waterfall_size: tuple[int, int]
    budget_s: float  # every row must be predicted to end within this many seconds of the command's start
    rows: tuple[Row, ...] = ()
    fast_sizes: tuple[tuple[int, int], ...] = ()
    batches: tuple[int, ...] = (1,)
    variants: tuple[Row, ...] = ()
    schedule: Optional[tuple[Row, ...]] = None
    reference: Row = REFERENCE_ROW
    priors: Priors = CPU_PRIORS
    tail_calls: int = 200
    whole_command_rounds: int = 0  # rounds of the README command, whole, per prior, before the rows (0: none)

    def jobs(self) -> tuple[Row, ...]:
        """Every row, with its size and batch, in the order it runs (the reference first)."""
        first = self.reference.at(self.waterfall_size, 1)
        if self.schedule is not None:
            return (first, *(r if r.size is not None else r.at(self.waterfall_size) for r in self.schedule))
        jobs = [first, *(r.at(self.waterfall_size, 1) for r in self.rows)]
        if self.rows:
            for size in (self.waterfall_size, *self.fast_sizes):
                for batch in self.batches:
                    if (size, batch) != (self.waterfall_size, 1):
                        jobs.append(self.rows[-1].at(size, batch))
        jobs += [r.at(self.waterfall_size, 1) for r in self.variants]
        return tuple(jobs)


def gpu_plan(*, max_autotune: bool = False, channels_last: bool = False, budget_s: float = 480.0) -> Plan:
    """The paper model's layout, 480x640, 100 steps. ``budget_s`` 480: the rows end by 8 minutes after the
    command's start, so that with a minute of misprediction to spare the suite ends within 9."""
    return Plan(ADM256_UNCOND_CONFIG, 100, GPU_SIZE, budget_s,
                schedule=gpu_rows(max_autotune=max_autotune, channels_last=channels_last), priors=GPU_PRIORS)


GPU_PLAN = gpu_plan()

# The reference README's tiny ADM UNet (tiny_unet_config.json): the smallest model the official code can build
# and sample (32 GroupNorm groups, learned variance, attention); the CPU suites use it with ``--upstream`` and the
# gpu suite's dry run on a CPU.
TINY_ADM_ARGS = {
    "image_size": 64, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "", "learn_sigma": True,
    "attention_resolutions": "16,8", "num_heads": 1, "num_head_channels": 16, "use_scale_shift_norm": True,
    "resblock_updown": True, "dropout": 0.0,
}


def _small_config() -> UNetConfig:
    from ddfm_fast.unet import DDFM_SMALL_ARGS

    return UNetConfig.from_create_model_args(DDFM_SMALL_ARGS)


CPU_ROWS = (
    Row("fp32 eager", AccelConfig(), parent=REFERENCE),
    Row("bf16", AccelConfig(dtype="bf16"), parent="fp32 eager"),
    Row("fp32 + compile", AccelConfig(compile=True), parent="fp32 eager"),
)
CPU_VARIANTS = (Row("fp32 eager, channels_last", AccelConfig(channels_last=True), parent="fp32 eager"),)


def plan_for(suite: str, *, upstream: bool = False, max_autotune: bool = False,
             channels_last: bool = False) -> Plan:
    """``gpu``: the paper-size model (random weights, same cost); ``cpu``: the whole README command (both priors),
    then rows with the small prior's config; ``quick``: a seconds-long run of the same rows' code (CI). With
    ``upstream``, the CPU suites switch to the tiny ADM config (``TINY_ADM_ARGS``): the shipped prior's layout is one
    the official code cannot build."""
    if suite == "gpu":
        return gpu_plan(max_autotune=max_autotune, channels_last=channels_last)
    config = UNetConfig.from_create_model_args(TINY_ADM_ARGS) if upstream else _small_config()
    if suite == "cpu":
        # 330 s: the rows' ~200 s predicted from the CPU priors after the whole command's ~90 s (3 rounds of both
        # priors, COMMAND_PRIOR_S), so that neither crowds the other out on the 2-core machine.
        return Plan(config, 10, (256, 256), 330.0, rows=CPU_ROWS, fast_sizes=((480, 640),), variants=CPU_VARIANTS,
                    priors=cpu_priors(), whole_command_rounds=3)
    if suite == "quick":
        quick_rows = (CPU_ROWS[0], CPU_ROWS[1],
                      Row("fp32 + compile (dynamo only)", AccelConfig(compile=True, compile_backend="eager"),
                          parent="fp32 eager"))
        return Plan(config, 2, (32, 32), 60.0, rows=quick_rows, variants=CPU_VARIANTS,
                    priors=dataclasses.replace(cpu_priors(), compile_s=10.0))
    raise ValueError(f"unknown suite {suite!r}; choose gpu, cpu or quick")


def _dry_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    return tuple(max(multiple, round(v / 40 / multiple) * multiple) for v in size)  # type: ignore[return-value]


def dry_run_plan(plan: Plan, *, steps: int = 2) -> Plan:
    """``plan`` for a CPU: the same rows in the same order with the same gate, on the tiny ADM UNet at 1/40 of each
    size (at least one downsampling multiple), ``steps`` steps, CPU priors, a few tail calls. Compile rows trace
    with Dynamo only (``compile_backend="eager"``: a CPU inductor build of every compile row would take minutes);
    CUDA graphs are planned off on a CPU (the plan says why), the Triton tail runs in Triton's interpreter."""
    config = UNetConfig.from_create_model_args(TINY_ADM_ARGS)
    multiple = 2 ** (len(config.channel_mult) - 1)

    def cpu(row: Row) -> Row:
        accel = row.accel.replace(compile_backend="eager") if row.accel.compile else row.accel
        return dataclasses.replace(row, accel=accel, size=None if row.size is None else _dry_size(row.size, multiple))

    return dataclasses.replace(
        plan, config=config, steps=steps, waterfall_size=_dry_size(plan.waterfall_size, multiple),
        rows=tuple(cpu(r) for r in plan.rows), variants=tuple(cpu(r) for r in plan.variants),
        fast_sizes=tuple(_dry_size(s, multiple) for s in plan.fast_sizes),
        schedule=None if plan.schedule is None else tuple(cpu(r) for r in plan.schedule),
        reference=cpu(plan.reference), priors=dataclasses.replace(cpu_priors(), compile_s=10.0), tail_calls=3)


# ----------------------------------------------------------------------------------------------- prediction


@dataclass
class Predictor:
    """Predicts a row's seconds from its FLOPs and the rates measured so far (see the module docstring)."""

    config: UNetConfig
    steps: int
    priors: Priors
    measured: dict[tuple[str, bool], tuple[float, str]] = field(default_factory=dict)  # key -> (FLOP/s, row)
    last_ratio: Optional[float] = None  # measured / nominal rate of the last measured row
    compile_s: Optional[float] = None  # the longest compile measured so far
    tail_s: Optional[float] = None

    def _nominal(self, key: tuple[str, bool]) -> float:
        rate = self.priors.tflops.get(key[0], self.priors.tflops["fp32"]) * 1e12
        return rate * (self.priors.compile_gain if key[1] else 1.0)

    def rate(self, row: Row) -> tuple[float, str]:
        key = (row.precision_key, row.compiles)
        if key in self.measured:
            rate, who = self.measured[key]
            return rate, f"measured by {who!r}"
        same = [(r, who) for (p, _), (r, who) in self.measured.items() if p == key[0]]
        if same:
            rate, who = min(same)
            return rate, f"measured by {who!r} ({key[0]}, other compile setting)"
        if self.last_ratio is not None:
            return self._nominal(key) * self.last_ratio, f"nominal {key[0]} rate x {self.last_ratio:.2f} (measured)"
        return self._nominal(key), f"nominal {key[0]} rate (nothing measured yet)"

    def predict(self, row: Row) -> tuple[float, str]:
        """(seconds, how): compile + (1 + steps) x batch x FLOPs / rate + overhead."""
        if row.kind == TAIL:
            seconds = self.tail_s if self.tail_s is not None else self.priors.tail_s
            return seconds, f"{seconds:.0f} s: {'the last tail row' if self.tail_s is not None else 'prior'}"
        assert row.size is not None
        flops = unet_flops(self.config, row.batch, *row.size)
        n = row.timed_steps or self.steps
        rate, how = self.rate(row)
        sampling = (1 + n) * flops / rate
        parts = [f"{1 + n} steps x {flops / 1e12:.3g} TFLOP at {rate / 1e12:.3g} TFLOP/s ({how})"]
        seconds = sampling + self.priors.overhead_s
        if row.compiles:
            compile_s = self.compile_s if self.compile_s is not None else self.priors.compile_s
            seconds += compile_s
            parts.insert(0, f"compile ~{compile_s:.0f} s ({'measured' if self.compile_s is not None else 'prior'})")
        return seconds, "; ".join(parts)

    def record(self, row: Row, result: Result) -> None:
        if result.status != "ok":
            return
        if row.kind == TAIL:
            self.tail_s = result.seconds
            return
        if result.step_s and row.size is not None:
            rate = unet_flops(self.config, row.batch, *row.size) / result.step_s
            key = (row.precision_key, row.compiles)
            self.measured[key] = (rate, row.name)
            self.last_ratio = rate / self._nominal(key)
        if row.compiles and result.compile_s is not None:
            self.compile_s = max(self.compile_s or 0.0, result.compile_s)


def forecast(plan: Plan, tests_s: float) -> list[dict[str, Any]]:
    """The plan's timeline predicted from its nominal rates alone (what the gate expects before measuring):
    each row's predicted seconds and end time after ``tests_s`` of tests; rows past the budget marked."""
    predictor = Predictor(plan.config, plan.steps, plan.priors)
    now, out = tests_s, []
    for row in plan.jobs():
        seconds, how = predictor.predict(row)
        fits = now + seconds <= plan.budget_s
        if fits:
            now += seconds
        out.append({"row": row.name, "size": _fmt_size(row.size or plan.waterfall_size), "batch": row.batch,
                    "predicted_s": round(seconds, 1), "ends_at_s": round(now, 1) if fits else None, "fits": fits,
                    "how": how})
    return out


# -------------------------------------------------------------------------------------------------- running

UPSTREAM_ROW = "official MMIF-DDFM (fp32)"


def run_upstream(root: Path, model: nn.Module, config: UNetConfig, size: tuple[int, int], steps: int,
                 device: torch.device, *, reference: Optional[torch.Tensor]) -> Result:
    """The official sampler from the clone at ``root`` on the reference's inputs and ``model``'s weights."""
    from ddfm_fast import upstream

    h, w = size
    result = Result(UPSTREAM_ROW, f"{h}x{w}", 1, steps, None, None, None, None, None, None, False)
    x, I, V = _inputs(1, h, w, device)  # noqa: E741
    t_row = time.perf_counter()
    try:
        with precision.tf32(False) as flags:
            result.precision = flags
            run = upstream.run_official(root, config, model.state_dict(), x, I, V, steps)
        result.per_image_s = run.seconds
        result.images_per_s = 1.0 / run.seconds
        result.step_s = run.seconds / steps
        result.compile_s = run.warmup_seconds
        result.peak_mem_gib = run.peak_mem_gib
        result.notes += run.notes + ["per-image time of one full run (batch 1); compile_s is its 2-step warm-up"]
        if reference is not None:
            result.psnr_vs_fp32_db = psnr_8bit(run.sample, reference)
        result.speedup_vs_upstream = 1.0
    except Exception as exc:  # noqa: BLE001 - an official run that fails (OOM, missing library) is reported
        result.fail(f"{type(exc).__name__}: {exc}")
    finally:
        _end_row(result, t_row, device)
    return result


def skipped_result(row: Row, steps: int, reason: str) -> Result:
    assert row.size is not None
    return Result(row.name, _fmt_size(row.size), row.batch, steps, None, None, None, None, None, None, False,
                  status="skipped", skipped=reason, kind=row.kind)


def run_plan(plan: Plan, device: torch.device, log: Callable[[str], None] = print, *,
             upstream: Optional[Path] = None,
             on_result: Optional[Callable[[list[Result], list[Row]], None]] = None,
             start: Optional[float] = None, clock: Callable[[], float] = time.perf_counter) -> list[Result]:
    """Run ``plan.jobs()`` in order, each only if predicted to end within ``plan.budget_s`` of ``start`` (default
    now; the bench command passes its own start). With ``upstream`` (a clone of MMIF-DDFM), the official sampler
    runs right after the reference and every row of its size gets its speed-up over it (per image).
    ``on_result(results_so_far, rows_not_yet_run)`` is called after every row (the bench command rewrites its
    report there, so a run stopped by a time limit keeps what it measured and says what it did not reach)."""
    start = clock() if start is None else start
    jobs = list(plan.jobs())
    results: list[Result] = []
    predictor = Predictor(plan.config, plan.steps, plan.priors)
    base = random_model(plan.config, device=device)
    references: dict[tuple[str, int], tuple[Result, torch.Tensor]] = {}  # (size, steps) -> the reference's
    official: list[Result] = []

    def add(res: Result, pending: list[Row]) -> None:
        ref = references.get((res.size, res.steps))
        if ref is not None and res is not ref[0] and res.per_image_s and ref[0].per_image_s:
            res.speedup_vs_reference = ref[0].per_image_s / res.per_image_s
        if (official and official[0].per_image_s and res.per_image_s and res.speedup_vs_upstream is None
                and res.size == official[0].size):
            res.speedup_vs_upstream = official[0].per_image_s / res.per_image_s
        results.append(res)
        log(format_row(res))
        if on_result is not None:
            on_result(results, pending)

    def gate(row: Row, predicted: float, how: str) -> Optional[str]:
        elapsed = clock() - start
        if elapsed + predicted <= plan.budget_s:
            return None
        return (f"predicted {predicted:.0f} s ({how}) would end at {elapsed + predicted:.0f} s, past the "
                f"{plan.budget_s:.0f} s budget")

    for i, row in enumerate(jobs):
        pending = jobs[i + 1:]
        predicted, how = predictor.predict(row)
        reason = gate(row, predicted, how)
        if reason is not None:
            skipped = skipped_result(row, plan.steps, reason)
            skipped.predicted_s = round(predicted, 1)
            add(skipped, pending)
            continue
        torch._dynamo.reset()
        if row.kind == TAIL:
            res = run_tail_row(row, device, plan.tail_calls)
        else:
            assert row.size is not None
            ref = references.get((_fmt_size(row.size), row.timed_steps or plan.steps))
            res, sample = run_row(row, base, plan.steps, device, reference=None if ref is None else ref[1])
            if i == 0 and sample is not None:
                references[(res.size, plan.steps)] = (res, sample)
        res.predicted_s = round(predicted, 1)
        predictor.record(row, res)
        add(res, pending)
        if i == 0 and upstream is not None:
            up_row = Row(UPSTREAM_ROW, row.accel, row.size)
            up_predicted = predictor.predict(up_row)[0] * 2  # materialised attention and host round trips
            reason = gate(up_row, up_predicted, "twice the reference's time")
            if reason is not None:
                add(skipped_result(up_row, plan.steps, reason), pending)
                continue
            ref = references.get((res.size, plan.steps))
            official.append(run_upstream(upstream, base, plan.config, row.size, plan.steps, device,
                                         reference=None if ref is None else ref[1]))
            official[0].predicted_s = round(up_predicted, 1)
            add(official[0], pending)
            if res.per_image_s and official[0].per_image_s:
                res.speedup_vs_upstream = official[0].per_image_s / res.per_image_s
    return results


def format_row(r: Result) -> str:
    """One line per row; a failed or skipped row says why, and a row's fallbacks and warnings follow it."""
    head = f"{r.row:<46} {r.size:>9} b{r.batch:<2}"
    if r.status == "skipped":
        return f"{head} SKIPPED: {r.skipped}"
    if r.status == "failed" and r.step_s is None:
        return f"{head} FAILED: {r.error}"
    if r.kind == TAIL:
        line = f"{head} {1e6 * r.step_s:9.1f} us/step  {r.effective_gbps:7.3g} GB/s"
    else:
        psnr = "-" if r.psnr_vs_fp32_db is None else f"{r.psnr_vs_fp32_db:.1f}"
        mem = "-" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.2f}"
        ext = "*" if r.extrapolated else " "
        tflops = "-" if r.tflops is None else f"{r.tflops:.3g}"
        line = (f"{head} {r.per_image_s:9.3f}{ext} s/img {r.images_per_s:8.3f} img/s  step {1e3 * r.step_s:8.2f} ms"
                f"  {tflops:>6} TFLOP/s  compile {r.compile_s:6.1f} s  mem {mem} GiB  PSNR {psnr} dB")
        if r.precision.get("tf32"):
            line += "  [TF32]"
        if r.speedup_vs_reference is not None:
            line += f"  x{r.speedup_vs_reference:.1f} vs fp32"
        if r.speedup_vs_upstream is not None:
            line += f"  x{r.speedup_vs_upstream:.1f} vs official"
    if r.predicted_s is not None and r.seconds is not None:
        line += f"  ({r.seconds:.0f} s, predicted {r.predicted_s:.0f} s)"
    extra = []
    if r.status == "failed":
        extra.append(f"FAILED: {r.error}")
    if r.plan is not None:
        extra += [f"fell back: {f}" for f in r.plan.get("fallbacks", [])]
        extra += [f"plan: {w}" for w in r.plan.get("reasons", []) + r.plan.get("warnings", [])]
    return line + "".join(f"\n    {e}" for e in extra)


# ---------------------------------------------------------------------------------------------- whole command

README_COMMAND = ("fuse", "--example", "-o")  # the README's first command, `ddfm-fast fuse --example -o fused.png`
README_TARGET_S = 15.0  # the README command (640x480, default prior and steps), median wall, on the 2-core machine
PREVIOUS_PRIOR = "ddfm-small"  # the prior shipped before ddfm-shrink, compared side by side
# One run's seconds assumed before any is measured (the gate's prior, not a measurement): median wall 3.1 s with
# the default prior and 19.4 s with ddfm-small on the 2-core development CPU (bench/results/prior_speed.md),
# rounded up for a busier or slower machine.
COMMAND_PRIOR_S = {"default": 5.0, "previous": 25.0}


@dataclass(frozen=True)
class CommandTiming:
    """One run of a command to its end, timed from outside: ``wall_s`` by ``perf_counter`` from start to reaping;
    ``user_s``, ``sys_s`` and ``maxrss_mb`` the child's own, from ``os.wait4`` (None where it does not exist)."""

    wall_s: float
    user_s: Optional[float]
    sys_s: Optional[float]
    maxrss_mb: Optional[float]
    returncode: int
    error: Optional[str] = None  # a failed run: how it ended and the last line of its stderr


def time_command(argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None) -> CommandTiming:
    """Run ``argv`` to its end (stdout discarded) and time it (see :class:`CommandTiming`).

    stderr goes to a file, not a pipe: a pipe read only after the exit would block a child that writes more than
    its buffer. Without ``os.wait4`` (Windows) user, system and RSS are None rather than guessed.
    """
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), env=None if env is None else dict(env), stdout=subprocess.DEVNULL,
                                stderr=err)
        _RUNNING.add(proc)
        user = system = rss = None
        try:
            if hasattr(os, "wait4"):
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t0
                proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
                user, system = usage.ru_utime, usage.ru_stime
                rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, else KiB
            else:
                code = proc.wait()
                wall = time.perf_counter() - t0
        finally:
            _RUNNING.discard(proc)
        error = None
        if code:
            err.seek(0)
            lines = [line.strip() for line in err.read().decode(errors="replace").splitlines() if line.strip()]
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            error = f"{how}: {lines[-1] if lines else '(nothing on stderr)'}"
    return CommandTiming(wall, user, system, rss, code, error)


# Commands time_command is running: the bench command's hard limit ends the process with os._exit, which would leave
# them running (a fuse of a minute or more) after the report says the command stopped.
_RUNNING: set[subprocess.Popen] = set()


def kill_commands() -> None:
    """Kill every command :func:`time_command` is running (the hard limit's last act before the process ends)."""
    for proc in list(_RUNNING):
        try:
            proc.kill()
        except OSError:
            pass  # it ended meanwhile


@dataclass
class CommandVariant:
    """One command of the whole-command section and its runs; a failed variant keeps no time (only its error)."""

    name: str
    key: str  # "default" or "previous": its prior in COMMAND_PRIOR_S
    argv: list[str]  # as run, with OUT.png standing for a fresh file per run in a temporary folder
    command: str  # the same as a shell line
    runs: list[dict[str, Optional[float]]] = field(default_factory=list)  # wall_s, user_s, sys_s, maxrss_mb, load
    median: Optional[dict[str, Optional[float]]] = None  # wall_s, user_s, sys_s over the runs
    status: str = "ok"  # ok or failed
    error: Optional[str] = None

    def fail(self, message: str) -> None:
        self.status, self.error, self.runs, self.median = "failed", message[:500], [], None

    def argv_for(self, out: Path) -> list[str]:
        return [str(out) if a == "OUT.png" else a for a in self.argv]


@dataclass
class WholeCommand:
    """The whole-command section of the cpu suite's report (see the module docstring)."""

    rounds: int
    variants: list[CommandVariant]
    machine: dict[str, Any]  # CPU model, platform, threads, torch: what the numbers were measured on
    target: dict[str, Any]  # the shape of :func:`targets`' entries
    status: str = "running"  # ok, failed (a run failed), skipped (no round fit the budget); running until done
    rounds_run: int = 0
    skipped: Optional[str] = None  # why fewer than ``rounds`` rounds ran
    ratio: Optional[dict[str, Optional[float]]] = None  # the previous prior's medians over the default's
    what: str = ("the README's first command run whole (a fresh interpreter: imports, model load, sampling of the "
                 "shipped 640x480 MSRS pair at each prior's default steps, writing), default prior against the "
                 "previous one, interleaved round by round; medians over the rounds")


def readme_commands(python: str = sys.executable) -> list[CommandVariant]:
    """The README's command with the default prior and with the previous one, as this interpreter runs it."""
    from ddfm_fast.config import DEFAULT_PRIOR

    base = [python, "-m", "ddfm_fast", *README_COMMAND, "OUT.png"]
    previous = [*base, "--checkpoint", PREVIOUS_PRIOR]
    return [CommandVariant(f"default prior ({DEFAULT_PRIOR})", "default", base, shlex.join(base)),
            CommandVariant(f"previous prior ({PREVIOUS_PRIOR})", "previous", previous, shlex.join(previous))]


def _medians(runs: list[dict[str, Optional[float]]]) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    for m in ("wall_s", "user_s", "sys_s"):
        values = [r[m] for r in runs if r[m] is not None]
        out[m] = round(statistics.median(values), 3) if values else None
    return out


def run_whole_command(rounds: int, workdir: Path, *, budget_s: float = math.inf, start: Optional[float] = None,
                      clock: Callable[[], float] = time.perf_counter, log: Callable[[str], None] = print,
                      runner: Callable[[Sequence[str]], CommandTiming] = time_command,
                      on_update: Optional[Callable[["WholeCommand"], None]] = None) -> WholeCommand:
    """``rounds`` rounds of :func:`readme_commands`, each variant once per round, writing into ``workdir``.

    Before each round its time is predicted (each variant's median wall so far, else ``COMMAND_PRIOR_S``); a round
    predicted to end after ``budget_s`` of ``start`` is not run, nor those after it, and ``skipped`` says why.
    A failed run fails its variant (its error kept, its times dropped, later rounds without it).
    ``on_update(section)`` is called before the first run and after every run (the bench command rewrites its
    report there, so a run stopped midway keeps what it measured).
    """
    start = clock() if start is None else start
    variants = readme_commands()
    section = WholeCommand(rounds, variants, machine={
        "cpu_model": cpu_model(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__, "python": sys.executable,
        "threads_note": "the commands inherit this process's environment, so torch picks the same thread count"},
        target={"target": "README command, default prior, 640x480, median wall (s)", "value": None,
                "bound": f"<= {README_TARGET_S:g}", "met": None})
    if on_update is not None:
        on_update(section)
    for k in range(1, rounds + 1):
        active = [v for v in variants if v.status == "ok"]
        if not active:
            break
        predicted = sum(v.median["wall_s"] if v.median and v.median["wall_s"] else COMMAND_PRIOR_S[v.key]
                        for v in active)
        elapsed = clock() - start
        if elapsed + predicted > budget_s:
            how = "measured medians" if k > 1 else "prior"
            section.skipped = (f"rounds {k}-{rounds} not run: round {k} predicted {predicted:.0f} s ({how}) would "
                               f"end at {elapsed + predicted:.0f} s, past the {budget_s:.0f} s budget")
            log(f"whole command: {section.skipped}")
            break
        for v in active:
            slug = v.key + f"-{k}.png"
            try:
                t = runner(v.argv_for(workdir / slug))
            except Exception as exc:  # noqa: BLE001 - a command that cannot start is reported like one that fails
                t = CommandTiming(math.nan, None, None, None, -1, f"could not start: {type(exc).__name__}: {exc}")
            if t.returncode:
                v.fail(t.error or f"exit status {t.returncode}")
                log(f"whole command, round {k}/{rounds}, {v.name}: FAILED: {v.error}")
            else:
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                v.runs.append({"wall_s": round(t.wall_s, 3), "user_s": t.user_s, "sys_s": t.sys_s,
                               "maxrss_mb": None if t.maxrss_mb is None else round(t.maxrss_mb, 1),
                               "load_1min": None if load is None else round(load, 2)})
                v.median = _medians(v.runs)
                log(f"whole command, round {k}/{rounds}, {v.name}: wall {t.wall_s:.2f} s, user "
                    f"{_fmt_s(t.user_s)}, sys {_fmt_s(t.sys_s)}" + ("" if load is None else f", load {load:.1f}"))
            if on_update is not None:
                on_update(section)
        section.rounds_run = k
    return _finish_whole_command(section)


def _fmt_s(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def _finish_whole_command(section: WholeCommand) -> WholeCommand:
    default, previous = section.variants
    if any(v.status == "failed" for v in section.variants):
        section.status = "failed"
    elif section.rounds_run == 0:
        section.status = "skipped"
    else:
        section.status = "ok"
    if default.median and previous.median:
        section.ratio = {m: (None if not default.median[m] or previous.median[m] is None
                             else round(previous.median[m] / default.median[m], 2)) for m in default.median}
    value = default.median["wall_s"] if default.median else None
    section.target.update(value=value, met=None if value is None else value <= README_TARGET_S)
    return section


def format_whole_command(section: WholeCommand) -> str:
    """The section as the bench command prints it: where it ran, one line per command, the ratio, the target."""
    m = section.machine
    lines = [f"whole command, {section.rounds_run} of {section.rounds} interleaved rounds on {m['cpu_model']} "
             f"({m['threads']} threads, torch {m['torch']}):"]
    for v in section.variants:
        if v.status == "failed":
            lines.append(f"  {v.name:<28} FAILED: {v.error}\n      {v.command}")
        elif v.median is None:
            lines.append(f"  {v.name:<28} not run\n      {v.command}")
        else:
            runs = ", ".join(f"{r['wall_s']:.2f}" for r in v.runs)
            med = v.median
            lines.append(f"  {v.name:<28} median wall {med['wall_s']:.2f} s, user {_fmt_s(med['user_s'])}, "
                         f"sys {_fmt_s(med['sys_s'])} (wall of each run: {runs} s)\n      {v.command}")
    if section.ratio is not None:
        lines.append("  previous / default (medians): " + ", ".join(
            f"{k[:-2]} x{r:.2f}" for k, r in section.ratio.items() if r is not None))
    if section.skipped:
        lines.append(f"  {section.skipped}")
    t = section.target
    state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
    lines.append(f"  target {t['target']}: {t['value']} ({t['bound']}) {state}")
    return "\n".join(lines)


# Targets for the paper model on one H100 / H200, 100 steps (checked from the report, never from a unit test).
def targets(results: list[Result], whole_command: Optional[WholeCommand] = None) -> list[dict[str, Any]]:
    """Each target with its value from ``results`` (None when its row did not run) and whether it was met; with
    ``whole_command``, its README-command target last."""
    def find(name: str, size: str, batch: int = 1, kind: str = SAMPLE) -> Optional[Result]:
        for r in results:
            if (r.row, r.size, r.batch, r.kind) == (name, size, batch, kind) and r.status == "ok":
                return r
        return None

    head = find(HEADLINE, "480x640")
    big = find(HEADLINE, "1024x1280")
    b8 = find(HEADLINE, "480x640", 8)
    tail = find("step tail, Triton", "480x640", kind=TAIL)
    rows = [
        ("480x640 per image (s)", head and head.per_image_s, "<=", 2.5),
        ("fast path PSNR vs true fp32 (dB)", head and head.psnr_vs_fp32_db, ">=", 40.0),
        ("speed-up over the official sampler", head and head.speedup_vs_upstream, ">=", 10.0),
        ("1280x1024 peak memory (GiB)", big and big.peak_mem_gib, "<", 12.0),
        ("batch 8 at 480x640 (images/s)", b8 and b8.images_per_s, ">=", 0.5),
        ("step tail at 480x640 (us)", tail and tail.step_s and 1e6 * tail.step_s, "<=", 100.0),
    ]
    out = []
    for name, value, op, bound in rows:
        met = None if value is None else (value <= bound if op == "<=" else value >= bound if op == ">=" else
                                          value < bound)
        out.append({"target": name, "value": None if value is None else round(float(value), 3), "bound": f"{op} {bound:g}",
                    "met": met})
    if whole_command is not None:
        out.append(dict(whole_command.target))
    return out


def write_report(path: Path, payload: dict[str, Any]) -> Path:
    from ddfm_fast.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
    return path


def results_payload(results: list[Result], **extra: Any) -> dict[str, Any]:
    return {"environment": environment(), **extra, "rows": [asdict(r) for r in results]}
