"""The speed waterfall behind ``ddfm-fast bench``: every acceleration added in turn, each row with its fidelity.

Rows (the issue's order): fp32 eager with materialised attention (the official code's shape) -> fp16 ->
+ SDPA (flash / memory-efficient attention) -> + torch.compile -> + Triton step tail -> + CUDA graphs.
Each row reports time per image, images/s, peak GPU memory and the PSNR of its 8-bit output against the fp32
row's, on the same inputs (seeded noise, synthetic sources).

Beside the chain, ``variants`` are measured at the same size (e.g. ``channels_last``: kept only where it helps,
so it is measured, not assumed). With ``upstream`` (a clone of the official MMIF-DDFM), the official sampler
itself runs on the same inputs and weights (``ddfm_fast.upstream``) and every row gets its speed-up over it.

Timing protocol: after one warm-up sample (compile and capture happen there and are reported apart as
``compile_s``), ``step_s`` is the median over timed steps of a full sample; ``per_image_s`` is the wall time of
one full N-step sample divided by the batch. Slow rows can be timed on fewer steps (``timed_steps``) and are then
marked ``extrapolated``: their per-image time is ``N * step_s / batch``; such rows carry no PSNR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ddfm_fast.api import postprocess
from ddfm_fast.config import AccelConfig, SamplerConfig
from ddfm_fast.sampler import DDFMSampler
from ddfm_fast.unet import ADM256_UNCOND_CONFIG, UNetConfig, UNetModel


@dataclass(frozen=True)
class Row:
    """One waterfall configuration."""

    name: str
    options: AccelConfig
    backend: str = "torch"
    math_attention: bool = False  # force SDPA's math kernel: the T x T matrix is materialised, as officially


# The chain compiles in inductor's default mode: every compile row recompiles the paper-size UNet, and
# max-autotune's kernel search (minutes per compile, not measured yet on the target GPUs) would put the suite's
# 8-minute limit at risk. max-autotune is a variant, measured when the budget allows.
_FP16_COMPILED = AccelConfig(dtype="fp16", compile=True, compile_mode="default")
WATERFALL = (
    Row("fp32 eager, materialised attention", AccelConfig(), math_attention=True),
    Row("fp16", AccelConfig(dtype="fp16"), math_attention=True),
    Row("+ SDPA", AccelConfig(dtype="fp16")),
    Row("+ compile", _FP16_COMPILED),
    Row("+ Triton tail", _FP16_COMPILED, backend="triton"),
    Row("+ CUDA graphs", dataclasses.replace(_FP16_COMPILED, cuda_graphs=True), backend="triton"),
)


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
    warmup_peak_mem_gib: Optional[float] = None  # peak during the first sample (compile, autotune, graph capture)


def environment() -> dict[str, Any]:
    """Device, versions and date: every report carries where its numbers come from."""
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
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


@contextlib.contextmanager
def _attention(math_only: bool) -> Iterator[None]:
    if not math_only:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(batch: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, 3, h, w, generator=gen)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    I = (0.6 * torch.sin(3 * xx) * torch.cos(2 * yy)).expand(batch, 1, h, w).clone()  # noqa: E741
    V = (0.8 * torch.tanh(4 * yy - xx)).expand(batch, 1, h, w).clone()
    I += 0.05 * torch.randn(I.shape, generator=gen)
    return tuple(t.to(device) for t in (x, I, V))


def psnr_8bit(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB, peak 255) between the official 8-bit outputs of two (B, 3, H, W) samples' first images."""
    h, w = a.shape[-2:]
    fa = postprocess(a[0], (h, w)).fused.astype(np.float64)
    fb = postprocess(b[0], (h, w)).fused.astype(np.float64)
    mse = float(np.mean((fa - fb) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run_row(row: Row, model_fp32: nn.Module, size: tuple[int, int], batch: int, steps: int, device: torch.device,
            *, reference: Optional[torch.Tensor], timed_steps: Optional[int] = None,
            model_factory=None) -> tuple[Result, Optional[torch.Tensor]]:
    """Time one row. ``model_factory()`` gives a fresh fp32 model when the row casts to half precision.

    Peak memory is this row's own: its model, buffers, graph pool and activations, measured over the timed samples
    (``peak_mem_gib``) and over the first, compiling sample (``warmup_peak_mem_gib``); memory held before the row
    (the shared fp32 model when the row does not use it, other rows' leftovers) is not counted.
    """
    cuda = device.type == "cuda"
    h, w = size
    x, I, V = _inputs(batch, h, w, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    # prepare_model casts and re-lays out in place: rows that change the model get their own copy.
    changes_model = row.options.dtype != "fp32" or bool(row.options.channels_last)
    fresh = changes_model and model_factory is not None
    model = model_factory() if fresh else model_fp32
    shared_bytes = 0 if fresh else _module_bytes(model)  # allocated before the row, but the row uses it
    n = timed_steps or steps
    sampler = DDFMSampler(SamplerConfig(steps=n, tau_reduce="image"), row.options.replace(backend=row.backend))
    result = Result(row.name, f"{h}x{w}", batch, steps, None, None, None, None, None, None, n != steps)
    try:
        with _attention(row.math_attention), torch.no_grad():
            step_times: list[float] = []
            t0 = time.perf_counter()
            warm_result = sampler.sample(model, x, I, V)  # warm-up: compile / capture
            _sync(device)
            warm = time.perf_counter() - t0
            if cuda:
                result.warmup_peak_mem_gib = (torch.cuda.max_memory_allocated(device) - before + shared_bytes) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            last = [time.perf_counter()]

            def tick(_):
                _sync(device)
                now = time.perf_counter()
                step_times.append(now - last[0])
                last[0] = now

            t0 = time.perf_counter()
            last[0] = t0
            out = sampler.sample(model, x, I, V, callback=tick).sample
            _sync(device)
            total = time.perf_counter() - t0
            # The per-step callback synchronises; time a second, callback-free sample for the wall time.
            t0 = time.perf_counter()
            out = sampler.sample(model, x, I, V).sample
            _sync(device)
            total = min(total, time.perf_counter() - t0)
        result.step_s = float(np.median(step_times))
        result.compile_s = warm_result.compile_seconds if warm_result.compile_seconds is not None \
            else max(0.0, warm - total)
        result.per_image_s = (steps * result.step_s if n != steps else total) / batch
        result.images_per_s = 1.0 / result.per_image_s
        result.notes += warm_result.plan.fallbacks + [f"plan: {warm_result.plan.describe()}"]
        if cuda:
            result.peak_mem_gib = (torch.cuda.max_memory_allocated(device) - before + shared_bytes) / 2**30
        if reference is not None and n == steps:
            result.psnr_vs_fp32_db = psnr_8bit(out, reference)
        return result, (out if n == steps else None)
    except Exception as exc:  # noqa: BLE001 - a row that cannot run (OOM, no Triton) is reported, not fatal
        result.error = f"{type(exc).__name__}: {exc}"[:500]
        return result, None
    finally:
        # Free this row's runners (buffers, graph pool, compiled step) and model copy before the next row.
        sampler.close()
        del sampler, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True)
class Plan:
    """What one suite measures: the full waterfall at one size, the fast row elsewhere, within a time budget."""

    config: UNetConfig
    steps: int
    waterfall_size: tuple[int, int]
    fast_sizes: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    slow_timed_steps: int  # eager rows with materialised attention: timed over this many steps, extrapolated
    budget_s: float  # rows start only this long after the start (the gpu suite: the command's, tests included)
    rows: tuple[Row, ...] = WATERFALL
    variants: tuple[Row, ...] = ()  # measured at the waterfall size beside the chain, not part of it


# channels_last is an independent switch; it stays off by default unless a report shows it helps.
GPU_VARIANTS = (
    Row("+ CUDA graphs, channels_last", dataclasses.replace(WATERFALL[-1].options, channels_last=True),
        backend="triton"),
    Row("+ CUDA graphs, max-autotune (--fast)", AccelConfig(dtype="fp16", compile=True, compile_mode="max-autotune", cuda_graphs=True), backend="triton"),
)


GPU_PLAN = Plan(ADM256_UNCOND_CONFIG, 100, (480, 640), ((256, 256), (1024, 1280)), (1, 8), 5, 420.0,
                variants=GPU_VARIANTS)

# The reference README's tiny ADM UNet (tiny_unet_config.json): the smallest model the official code can build
# and sample (32 GroupNorm groups, learned variance, attention); the CPU suites use it with ``--upstream``.
TINY_ADM_ARGS = {
    "image_size": 64, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "", "learn_sigma": True,
    "attention_resolutions": "16,8", "num_heads": 1, "num_head_channels": 16, "use_scale_shift_norm": True,
    "resblock_updown": True, "dropout": 0.0,
}


def _small_config() -> UNetConfig:
    from ddfm_fast.unet import DDFM_SMALL_ARGS

    return UNetConfig.from_create_model_args(DDFM_SMALL_ARGS)


CPU_ROWS = (
    Row("fp32 eager", AccelConfig()),
    Row("bf16", AccelConfig(dtype="bf16")),
    Row("fp32 + compile", AccelConfig(compile=True)),
)
CPU_VARIANTS = (Row("fp32 eager, channels_last", AccelConfig(channels_last=True)),)


def plan_for(suite: str, *, upstream: bool = False) -> Plan:
    """``gpu``: the paper-size model (random weights, same cost); ``cpu``: the shipped small prior's config;
    ``quick``: a seconds-long run of the same code (CI). With ``upstream``, the CPU suites switch to the tiny ADM
    config (``TINY_ADM_ARGS``): the shipped prior's layout is one the official code cannot build."""
    if suite == "gpu":
        return GPU_PLAN
    config = UNetConfig.from_create_model_args(TINY_ADM_ARGS) if upstream else _small_config()
    if suite == "cpu":
        return Plan(config, 10, (256, 256), ((480, 640),), (1,), 10, 240.0, rows=CPU_ROWS, variants=CPU_VARIANTS)
    if suite == "quick":
        quick_rows = (CPU_ROWS[0], CPU_ROWS[1],
                      Row("fp32 + compile (dynamo only)", AccelConfig(compile=True, compile_backend="eager")))
        return Plan(config, 2, (32, 32), (), (1,), 2, 60.0, rows=quick_rows, variants=CPU_VARIANTS)
    raise ValueError(f"unknown suite {suite!r}; choose gpu, cpu or quick")


UPSTREAM_ROW = "official MMIF-DDFM (fp32)"


def run_upstream(root: Path, model: nn.Module, config: UNetConfig, size: tuple[int, int], steps: int,
                 device: torch.device, *, reference: Optional[torch.Tensor]) -> Result:
    """The official sampler from the clone at ``root`` on the waterfall's inputs and ``model``'s weights."""
    from ddfm_fast import upstream

    h, w = size
    result = Result(UPSTREAM_ROW, f"{h}x{w}", 1, steps, None, None, None, None, None, None, False)
    x, I, V = _inputs(1, h, w, device)  # noqa: E741
    try:
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
        result.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def run_plan(plan: Plan, device: torch.device, log=print, *, upstream: Optional[Path] = None,
             on_result: Optional[Callable[[list[Result]], None]] = None,
             start: Optional[float] = None) -> list[Result]:
    """The waterfall at ``plan.waterfall_size`` (batch 1; PSNR against the fp32 row), the last (fastest) row at the
    other sizes and batches, then the variants at the waterfall size. Rows left when the budget (counted from
    ``start``, default now) is spent are reported as skipped, not run. With ``upstream`` (a clone of MMIF-DDFM),
    the official sampler runs right after the reference row and every row carries its speed-up over it (per
    image). ``on_result(results_so_far)`` is called after every row (the bench command rewrites its report there,
    so a run killed by a time limit keeps what it measured)."""
    start = time.perf_counter() if start is None else start  # the bench command passes its own start time
    results: list[Result] = []
    official: list[Result] = []

    def add(res: Result) -> None:
        # Per image, at the official run's size only (it runs one size, batch 1).
        if (official and official[0].per_image_s and res.per_image_s and res.speedup_vs_upstream is None
                and res.size == official[0].size):
            res.speedup_vs_upstream = official[0].per_image_s / res.per_image_s
        results.append(res)
        log(format_row(res))
        if on_result is not None:
            on_result(results)

    base = random_model(plan.config, device=device)
    factory = lambda: random_model(plan.config, device=device)  # noqa: E731 - half rows cast their own copy

    def over_budget(row: Row, size, batch) -> bool:
        if time.perf_counter() - start < plan.budget_s:
            return False
        res = Result(row.name, f"{size[0]}x{size[1]}", batch, plan.steps, None, None, None, None, None, None,
                     False, error="skipped: the suite's time budget is spent")
        add(res)
        return True

    # The fp32 reference for PSNR: fp32 with SDPA (same arithmetic as the first row, without the T x T matrix).
    reference_row = Row("fp32 eager (reference)", AccelConfig())
    ref, reference = run_row(reference_row, base, plan.waterfall_size, 1, plan.steps, device, reference=None)
    add(ref)
    if upstream is not None:
        official.append(run_upstream(upstream, base, plan.config, plan.waterfall_size, plan.steps, device,
                                     reference=reference))
        add(official[0])
        if ref.per_image_s and official[0].per_image_s:
            ref.speedup_vs_upstream = official[0].per_image_s / ref.per_image_s
    def waterfall_row(row: Row) -> None:
        if over_budget(row, plan.waterfall_size, 1):
            return
        torch._dynamo.reset()
        timed = plan.slow_timed_steps if row.math_attention else None
        res, _ = run_row(row, base, plan.waterfall_size, 1, plan.steps, device, reference=reference,
                         timed_steps=timed, model_factory=factory)
        add(res)

    for row in plan.rows:
        waterfall_row(row)
    # The targets (other sizes, batch 8, peak memory at the largest size) come before the variants, so that a
    # slow variant (max-autotune's kernel search) cannot push them out of the budget.
    fastest = plan.rows[-1]
    for size in (plan.waterfall_size, *plan.fast_sizes):
        for batch in plan.batches:
            if size == plan.waterfall_size and batch == 1:
                continue
            if over_budget(fastest, size, batch):
                continue
            torch._dynamo.reset()
            res, _ = run_row(fastest, base, size, batch, plan.steps, device, reference=None, model_factory=factory)
            add(res)
    for row in plan.variants:
        waterfall_row(row)
    return results


def format_row(r: Result) -> str:
    if r.error:
        return f"{r.row:<38} {r.size:>10} b{r.batch:<2} {r.error}"
    psnr = "-" if r.psnr_vs_fp32_db is None else f"{r.psnr_vs_fp32_db:6.1f}"
    mem = "-" if r.peak_mem_gib is None else f"{r.peak_mem_gib:6.2f}"
    ext = "*" if r.extrapolated else " "
    speedup = "" if r.speedup_vs_upstream is None else f"  x{r.speedup_vs_upstream:.1f} vs official"
    return (f"{r.row:<38} {r.size:>10} b{r.batch:<2} {r.per_image_s:9.3f}{ext} s/img {r.images_per_s:8.3f} img/s "
            f"step {1e3 * r.step_s:8.2f} ms  compile {r.compile_s:6.1f} s  mem {mem} GiB  PSNR {psnr} dB{speedup}")


def write_report(path: Path, payload: dict[str, Any]) -> Path:
    from ddfm_fast.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
    return path


def results_payload(results: list[Result], **extra: Any) -> dict[str, Any]:
    return {"environment": environment(), **extra, "rows": [asdict(r) for r in results]}


