"""The fast path: a half-precision UNet, ``torch.compile`` of the whole step, and CUDA graphs over one step.

The faithful :class:`~ddfm_fast.sampler.DDFMSampler` runs one Python-level step at a time. Here the step is
re-expressed over **static buffers** so it can be compiled (``fullgraph=True``: a graph break is a bug) and
captured once as a CUDA graph that replays all N steps:

* ``x`` (B, 3, H, W) holds x_t; each step writes x_{t-1} back into it;
* ``j`` (1,) int64 is the step counter on the device; the step reads its coefficients and timestep from the
  :class:`~ddfm_fast.schedule.StepTable` with ``index_select`` (no host value, no ``.item()``) and increments it;
* the EM state is updated in place (``ddfm_fast.em``), the sources ``I``, ``V`` are copied into fixed buffers.

Every acceleration is a separate switch (:class:`FastOptions`): the UNet dtype (fp16 / bf16 body, GroupNorm
and softmax in fp32 as guided-diffusion does; the EM math always fp32), channels_last, compile (mode selectable),
CUDA graphs. A failed capture falls back to the compiled step and says so once.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ddfm_fast.dispatch import _warn_once, resolve_backend
from ddfm_fast.em import EMState, em_init
from ddfm_fast.sampler import DDFMSampler, SampleResult, StepOutput, _check_inputs, step_tail_torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


@dataclass(frozen=True)
class FastOptions:
    """Which accelerations to use; each is independent.

    dtype: the UNet body's dtype (``torch.float16`` on GPU is the product's default fast path).
    channels_last: NHWC memory format for the UNet's convolutions.
    compile: ``torch.compile`` the whole step (UNet + tail) with ``fullgraph=True``.
    compile_mode: ``"default"`` or ``"max-autotune"`` (``"max-autotune-no-cudagraphs"`` when we capture graphs
        ourselves).
    cuda_graphs: capture one step as a CUDA graph and replay it N times (CUDA only).
    """

    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    cuda_graphs: bool = False
    compile_backend: str = "inductor"  # "eager" traces with dynamo only: a cheap graph-break check

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")

    @classmethod
    def preset(cls, name: str) -> "FastOptions":
        """``"faithful"`` (fp32 eager) or ``"fast"`` (fp16 + compile + CUDA graphs, the GPU headline)."""
        if name == "faithful":
            return cls()
        if name == "fast":
            return cls(dtype=torch.float16, compile=True, compile_mode="max-autotune-no-cudagraphs", cuda_graphs=True)
        raise ValueError(f"unknown fast preset {name!r}; choose 'faithful' or 'fast'")

    def describe(self) -> str:
        name = {v: k for k, v in DTYPES.items()}[self.dtype]
        parts = [name] + (["channels_last"] if self.channels_last else [])
        parts += [f"compile({self.compile_mode})"] if self.compile else []
        parts += ["cuda_graphs"] if self.cuda_graphs else []
        return "+".join(parts)


def prepare_model(model: nn.Module, options: FastOptions) -> nn.Module:
    """Cast the UNet body to ``options.dtype`` and set its memory format (in place; returns the model).

    Our :class:`~ddfm_fast.unet.UNetModel` keeps GroupNorm statistics and the attention softmax in float32 and
    returns float32 for float32 input, so the sampler around it stays float32.
    """
    model = model.to(dtype=options.dtype)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


@dataclass
class _Buffers:
    x: torch.Tensor  # x_t, overwritten with x_{t-1} by every step
    x0: torch.Tensor  # x0' of the last step
    I: torch.Tensor  # noqa: E741
    V: torch.Tensor
    j: torch.Tensor  # (1,) int64 step counter
    state: EMState
    workspace: object = None  # the Triton tail's buffers, when that backend runs
    x_next: Optional[torch.Tensor] = None  # the Triton tail writes here (never into its own input)


class StaticStepRunner:
    """Runs a sampler's steps over static buffers for one (B, H, W); compiles and captures on first use."""

    def __init__(self, sampler: "FastDDFMSampler", model: nn.Module, batch: int, height: int, width: int,
                 device: torch.device) -> None:
        self.sampler, self.model, self.device = sampler, model, device
        self.options = sampler.options
        self.table = sampler.table(device)
        self.backend = resolve_backend(sampler.backend, device)
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        I = zeros(batch, 1, height, width)  # noqa: E741
        self.buf = _Buffers(x=zeros(batch, 3, height, width), x0=zeros(batch, 3, height, width), I=I,
                            V=zeros(batch, 1, height, width), j=torch.zeros(1, dtype=torch.long, device=device),
                            state=em_init(I))
        if self.backend.name == "triton":
            from ddfm_fast.kernels.em_tail import TailWorkspace

            self.buf.workspace = TailWorkspace.create(I, rgb=True)
            self.buf.x_next = torch.empty_like(self.buf.x)
        self.handle = _register(self)
        self._fn: Callable[[], None] = self._step
        if self.options.compile:
            mode = self.options.compile_mode if self.options.compile_backend == "inductor" else None
            self._fn = torch.compile(self._step, fullgraph=True, mode=mode, backend=self.options.compile_backend)
        self._graph: Optional["torch.cuda.CUDAGraph"] = None
        self.compile_seconds: Optional[float] = None
        self.notes: list[str] = []

    def _step(self) -> None:
        """One DDFM step, reading everything from the buffers and the device tables."""
        b, s = self.buf, self.sampler
        coef = torch.index_select(self.table.coef, 0, b.j)[0]
        t = torch.index_select(self.table.model_t, 0, b.j).expand(b.x.shape[0])
        x_in = b.x.contiguous(memory_format=torch.channels_last) if self.options.channels_last else b.x
        eps = self.model(x_in, t)[:, :3].float()
        tv = dict(tv_prox=s.tv_prox, tv_threshold=s.tv_threshold)
        if b.workspace is not None:
            # Through an opaque custom op: the compiler schedules it as one call with declared mutations instead
            # of tracing into Triton's launcher (which it cannot do for interpreted kernels, nor reliably for
            # launch options such as enable_fp_fusion).
            st = b.state
            torch.ops.ddfm_fast.triton_step_tail(b.x, eps, coef, b.I, b.V, b.x_next, b.workspace.x0, st.C, st.D,
                                                 st.F1, st.F2, st.H, st.tau_a, st.tau_b, self.handle)
            x_prev, x0 = b.x_next, b.workspace.x0
        else:
            x_prev, x0 = step_tail_torch(b.x, eps, coef, b.I, b.V, b.state, lamb=s.lamb, rho=s.rho,
                                         tau_reduce=s.tau_reduce, clip_denoised=s.clip_denoised, **tv)
        b.x0.copy_(x0)
        b.x.copy_(x_prev)
        b.j.add_(1)

    def _reset(self, x_start: torch.Tensor, I: torch.Tensor, V: torch.Tensor) -> None:  # noqa: E741
        b = self.buf
        b.x.copy_(x_start)
        b.I.copy_(I)
        b.V.copy_(V)
        b.state.reset()
        b.j.zero_()

    def _warm_up(self) -> None:
        """First call: compile (timed on its own) and, if asked, capture the CUDA graph."""
        t0 = time.perf_counter()
        try:
            self._first_call()
        except Exception as exc:  # noqa: BLE001 - a compiler failure falls back to the eager step, loudly
            if self._fn is self._step:
                raise
            message = (f"ddfm-fast: torch.compile of the step failed ({type(exc).__name__}: {str(exc)[:300]}); "
                       "running the step eagerly")
            self.notes.append(message)
            _warn_once(message)
            self._fn = self._step
            self._first_call()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - t0

    def _first_call(self) -> None:
        if self.device.type == "cuda" and self.options.cuda_graphs:
            self._capture()
        else:
            self._fn()

    def _capture(self) -> None:
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compile and let lazy allocations happen outside the capture
                    self._fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._fn()
            self._graph = graph
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back, loudly
            self._graph = None
            message = f"ddfm-fast: CUDA graph capture failed ({type(exc).__name__}: {exc}); running the " \
                      f"{'compiled' if self.options.compile else 'eager'} step without graphs"
            self.notes.append(message)
            _warn_once(message)

    def run(self, x_start: torch.Tensor, I: torch.Tensor, V: torch.Tensor,  # noqa: E741
            callback: Optional[Callable[[StepOutput], None]] = None) -> torch.Tensor:
        if self.compile_seconds is None:
            self._reset(x_start, I, V)
            self._warm_up()
        self._reset(x_start, I, V)
        n = self.sampler.num_steps
        for j in range(n):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._fn()
            if callback is not None:
                x_prev = self.buf.x
                callback(StepOutput(j, n - 1 - j, x_prev, self.buf.x0, x_prev, self.buf.state))
        return self.buf.x.clone()


# Runners by handle: the custom op below receives an int (ops take tensors and scalars only) and finds the
# workspace and the sampler's settings here.
_RUNNERS: dict[int, "StaticStepRunner"] = {}
_HANDLES = itertools.count()  # never reused: a handle baked into a compiled graph must not name another runner


def _register(runner: "StaticStepRunner") -> int:
    handle = next(_HANDLES)
    _RUNNERS[handle] = runner
    return handle


def _release(runner: StaticStepRunner) -> None:
    """Drop a runner's registration, graph and compiled step, so its buffers and graph pool can be freed."""
    _RUNNERS.pop(runner.handle, None)
    runner._graph = None
    runner._fn = runner._step


@torch.library.custom_op(
    "ddfm_fast::triton_step_tail",
    mutates_args=("x_next", "x0", "C", "D", "F1", "F2", "H", "tau_a", "tau_b"),
)
def _triton_step_tail(x_t: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, I: torch.Tensor,  # noqa: E741
                      V: torch.Tensor, x_next: torch.Tensor, x0: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                      F1: torch.Tensor, F2: torch.Tensor, H: torch.Tensor, tau_a: torch.Tensor, tau_b: torch.Tensor,
                      handle: int) -> None:
    """The Triton step tail of one runner (``kernels/em_tail.py``); every tensor it writes is an argument."""
    from ddfm_fast.kernels.em_tail import step_tail_triton

    runner = _RUNNERS[handle]
    s, b = runner.sampler, runner.buf
    # Write only through the arguments: under functionalization they may be copies of the runner's buffers.
    state = dataclasses.replace(b.state, C=C, D=D, F1=F1, F2=F2, H=H, tau_a=tau_a, tau_b=tau_b)
    workspace = dataclasses.replace(b.workspace, x0=x0)
    step_tail_triton(x_t, eps, coef, I, V, state, lamb=s.lamb, rho=s.rho, tau_reduce=s.tau_reduce,
                     clip_denoised=s.clip_denoised, tv_prox=s.tv_prox, tv_threshold=s.tv_threshold,
                     workspace=workspace, out=x_next)


@_triton_step_tail.register_fake
def _(x_t, eps, coef, I, V, x_next, x0, C, D, F1, F2, H, tau_a, tau_b, handle) -> None:  # noqa: E741
    return None


class FastDDFMSampler(DDFMSampler):
    """:class:`~ddfm_fast.sampler.DDFMSampler` with the accelerations of :class:`FastOptions`.

    Same arguments as the faithful sampler plus ``options`` and ``max_runners``. One static runner (buffers,
    compiled step, captured graph) is kept per (model, batch, H, W, device); later calls of the same shape reuse
    it. At most ``max_runners`` are kept: a folder of many image sizes would otherwise hold one set of buffers and
    one graph memory pool per size on the GPU; the least recently used is released first.
    In a ``callback`` the step's input is not available (it was overwritten in place): ``x_t`` and ``x_prev``
    are both the step's output.
    """

    def __init__(self, *args, options: Optional[FastOptions] = None, max_runners: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if max_runners < 1:
            raise ValueError(f"max_runners must be >= 1, got {max_runners}")
        self.options = options or FastOptions()
        self.max_runners = max_runners
        self._runners: dict[tuple, StaticStepRunner] = {}  # in least-recently-used order
        self._prepared: set[int] = set()

    def close(self) -> None:
        """Release every runner (static buffers, compiled step, CUDA graph and its memory pool).

        Runners are also registered globally for the Triton custom op, so they outlive the sampler unless closed;
        call this when a sampler is done with (the benchmarks do, row by row).
        """
        for runner in self._runners.values():
            _release(runner)
        self._runners.clear()

    def runner(self, model: nn.Module, x_start: torch.Tensor) -> StaticStepRunner:
        key = (id(model), *x_start.shape, x_start.device)
        if key in self._runners:
            self._runners[key] = self._runners.pop(key)  # most recently used last
            return self._runners[key]
        while len(self._runners) >= self.max_runners:
            _release(self._runners.pop(next(iter(self._runners))))
        if id(model) not in self._prepared:
            prepare_model(model, self.options)
            self._prepared.add(id(model))
        b, _, h, w = x_start.shape
        self._runners[key] = StaticStepRunner(self, model, b, h, w, x_start.device)
        return self._runners[key]

    @torch.no_grad()
    def sample(self, model: nn.Module, x_start: torch.Tensor, I: torch.Tensor, V: torch.Tensor,  # noqa: E741
               *, callback: Optional[Callable[[StepOutput], None]] = None,
               state: Optional[EMState] = None) -> SampleResult:
        if state is not None:
            raise ValueError("FastDDFMSampler keeps its own static EM state; do not pass one")
        if x_start.device.type != "cuda" and self.options.cuda_graphs:
            _warn_once("ddfm-fast: cuda_graphs needs a CUDA device; running without graphs on "
                       f"{x_start.device.type}")
        _check_inputs(x_start, I, V)
        runner = self.runner(model, x_start)
        sample = runner.run(x_start, I, V, callback)
        return SampleResult(sample=sample, state=runner.buf.state, backend=runner.backend)


