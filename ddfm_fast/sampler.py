"""The DDFM sampling loop (Zhao et al., ICCV 2023, Algorithm 1): DDIM (eta = 0) with one EM step per UNet call.

:class:`DDFMSampler` takes the two option types whole (:class:`~ddfm_fast.config.SamplerConfig`,
:class:`~ddfm_fast.config.AccelConfig`), asks :func:`ddfm_fast.plan.plan` how to run on the device, and runs
:func:`ddfm_fast.step.ddfm_step` N times over static buffers. How the step executes (eager, compiled, replayed
from a CUDA graph) is the plan's choice; the step and the loop are the same for all of them, so the faithful fp32
path and the fast path differ only in the plan.

One runner (buffers, the step compiled for that shape, a captured graph) is kept per (model, batch, H, W,
device); at most ``max_runners`` are kept, least recently used released first, so a folder of many image sizes
holds a bounded number of buffers and graph pools. Each runner compiles its own copy of the step function:
Dynamo's recompile limit counts per code object, so a shared function would, past 8 sizes, stop compiling.
"""

from __future__ import annotations

import copy
import time
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ddfm_fast.config import AccelConfig, SamplerConfig, torch_dtype
from ddfm_fast.em import EMState
from ddfm_fast.plan import ExecutionPlan, plan
from ddfm_fast.schedule import Schedule, StepTable
from ddfm_fast.step import NONFINITE_STAGES, StepBuffers, ddfm_step


class NonFiniteError(RuntimeError):
    """The sample went NaN or infinite; the message names the stage where it first happened."""


@dataclass
class StepOutput:
    """What one step produced; handed to the per-step callback (device tensors, valid during the callback)."""

    j: int  # loop position, 0 .. N-1
    idx: int  # spaced index, N-1 .. 0 (the official ``idx``, used in the official progress file names)
    timestep: Optional[int]  # the original timestep t given to the UNet; None for an EM-only iteration (no UNet)
    x_prev: torch.Tensor  # the step's output x_{t-1} (the official ``out['sample']``)
    pred_xstart: torch.Tensor  # x0' after the EM rectification
    state: EMState


StepCallback = Callable[[StepOutput], None]


@dataclass
class SampleResult:
    """The final sample ((B, 3, H, W), about [-1, 1]), the final EM state and the plan that ran."""

    sample: torch.Tensor
    state: EMState
    plan: ExecutionPlan
    compile_seconds: Optional[float] = None  # the first call's compile (and capture), when this call made one


def check_inputs(x_start: torch.Tensor, I: torch.Tensor, V: torch.Tensor) -> None:  # noqa: E741
    """x_start (B, 3, H, W) float32 with sources (B, 1, H, W) on its device: the sampler's one input check."""
    if x_start.ndim != 4 or x_start.shape[1] != 3:
        raise ValueError(f"x_start must be (B, 3, H, W), got {tuple(x_start.shape)}")
    expected = (x_start.shape[0], 1, *x_start.shape[2:])
    for name, t in (("I", I), ("V", V)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must be {expected} to match x_start {tuple(x_start.shape)}, got {tuple(t.shape)}")
        if t.device != x_start.device:
            raise ValueError(f"{name} is on {t.device} but x_start is on {x_start.device}")
    if x_start.dtype != torch.float32:
        raise TypeError(f"x_start must be float32 (the sampler's state is fp32), got {x_start.dtype}")


def _weights_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or written in place (address and version counter)."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def _fresh_step() -> Callable[..., None]:
    """:func:`ddfm_step` with a code object of its own, so its compiled-graph cache is its own."""
    return types.FunctionType(ddfm_step.__code__.replace(), ddfm_step.__globals__, ddfm_step.__name__,
                              ddfm_step.__defaults__, ddfm_step.__closure__)


class _Runner:
    """The step over static buffers for one (model, B, H, W, device): compiled and captured on first use."""

    def __init__(self, model: nn.Module, shape: tuple[int, int, int], device: torch.device, table: StepTable,
                 cfg: SamplerConfig, plan_: ExecutionPlan, source: nn.Module) -> None:
        self.plan, self.device = plan_, device
        self.source = source  # the caller's model (``model`` may be a prepared copy of it)
        self.buf = StepBuffers.create(*shape, device, triton=plan_.backend == "triton")
        self.args = (model, self.buf, table, cfg)
        self.kwargs = dict(triton=plan_.backend == "triton", channels_last=plan_.channels_last)
        self.fn: Callable[..., None] = ddfm_step
        if plan_.compile:
            # Inductor's own CUDA graphs are never combined with the capture below.
            mode = None
            if plan_.compile_backend == "inductor":
                mode = "max-autotune-no-cudagraphs" if plan_.compile_mode.startswith("max-autotune") else None
            self.fn = torch.compile(_fresh_step(), fullgraph=True, dynamic=False, mode=mode,
                                    backend=plan_.compile_backend)
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.warm = False

    def call(self) -> None:
        self.fn(*self.args, **self.kwargs)

    def warm_up(self) -> float:
        """The first call (compiles) and, if planned, the graph capture; returns the seconds they took."""
        t0 = time.perf_counter()
        try:
            self.call()
        except Exception as exc:  # noqa: BLE001 - a compiler failure falls back to the eager step, recorded
            if self.fn is ddfm_step:
                raise
            self.plan.fall_back("compile", f"{type(exc).__name__}: {str(exc)[:300]}; the step runs eagerly")
            self.fn = ddfm_step
            self.buf.j.zero_()
            self.call()
        if self.plan.cuda_graphs and self.device.type == "cuda":
            self._capture()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warm = True
        return time.perf_counter() - t0

    def _capture(self) -> None:
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # let lazy allocations (cuFFT plans, workspaces) happen outside the capture
                    self.buf.j.zero_()  # stay inside the step table even with one step
                    self.call()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.buf.j.zero_()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.call()
            self.graph = graph
        except Exception as exc:  # noqa: BLE001 - a capture failure falls back, recorded
            self.graph = None
            self.plan.fall_back("cuda_graphs", f"capture failed ({type(exc).__name__}: {str(exc)[:300]}); "
                                f"running the {'compiled' if self.fn is not ddfm_step else 'eager'} step")

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.call()

    def release(self) -> None:
        self.graph = None
        self.fn = ddfm_step


class DDFMSampler:
    """DDIM + EM sampler for one :class:`SamplerConfig`; the execution follows an :class:`AccelConfig`.

    Args:
        config: what to compute; ``config.steps`` must be set (``SamplerConfig.for_model`` fills in a model's
            default).
        accel: how to run it (default: the faithful fp32 eager path).
        max_runners: how many (model, shape, device) runners to keep (each holds buffers and, when compiled or
            captured, a compiled step or a graph pool).

    The caller's model is never modified: a dtype or memory-format change is made on a copy, kept per model.
    """

    def __init__(self, config: Optional[SamplerConfig] = None, accel: Optional[AccelConfig] = None, *,
                 max_runners: int = 4) -> None:
        self.config = config if config is not None else SamplerConfig(steps=100)
        if self.config.prior != "diffusion":
            raise ValueError("DDFMSampler runs the diffusion prior; prior='none' is ddfm_fast.em_only")
        self.config.num_steps()  # steps must be set
        if max_runners < 1:
            raise ValueError(f"max_runners must be >= 1, got {max_runners}")
        self.accel = accel if accel is not None else AccelConfig()
        self.max_runners = max_runners
        self.schedule = Schedule.create(self.config.steps, self.config.train_timesteps)  # type: ignore[arg-type]
        self._tables: dict[torch.device, StepTable] = {}
        self._plans: dict[torch.device, ExecutionPlan] = {}
        self._runners: dict[tuple, _Runner] = {}  # least recently used first
        # (id, dtype, channels_last, device) -> (original, prepared copy, weights version of the original)
        self._models: dict[tuple, tuple[nn.Module, nn.Module, tuple]] = {}

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def table(self, device: torch.device) -> StepTable:
        """The step table on ``device``, built on first use and kept."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.schedule.table(device)
        return self._tables[device]

    def plan(self, device: torch.device | str) -> ExecutionPlan:
        """The execution plan on ``device`` (made once; run-time fallbacks update it)."""
        device = torch.device(device)
        if device not in self._plans:
            self._plans[device] = plan(device, self.accel)
        return self._plans[device]

    def prepared_model(self, model: nn.Module, plan_: ExecutionPlan, device: torch.device) -> nn.Module:
        """``model`` in the plan's dtype and memory format: the model itself when nothing changes, else a copy.

        A copy is shared by the runners of that model and made again when the caller's weights change in place
        (tracked by each tensor's address and version counter), so a copy never serves stale weights.
        """
        dtype = torch_dtype(plan_.dtype)
        first = next(iter(model.parameters()), None)
        if first is None:
            # No weights to cast (the analytic prior): its float32 schedule tables are kept as they are.
            return model
        if dtype == first.dtype and not plan_.channels_last:
            return model
        key = (id(model), plan_.dtype, plan_.channels_last, device)
        version = _weights_version(model)
        held = self._models.get(key)
        if held is None or held[2] != version:
            prepared = copy.deepcopy(model).to(dtype=dtype)
            if plan_.channels_last:
                prepared = prepared.to(memory_format=torch.channels_last)
            self._models[key] = (model, prepared.eval(), version)  # the original is held so its id is not reused
        return self._models[key][1]

    def _runner(self, model: nn.Module, x_start: torch.Tensor) -> _Runner:
        device = x_start.device
        plan_ = self.plan(device)
        key = (id(model), *x_start.shape, device)
        net = self.prepared_model(model, plan_, device)
        runner = self._runners.pop(key, None)
        if runner is not None and runner.args[0] is net:
            self._runners[key] = runner  # most recently used last
            return runner
        if runner is not None:  # the prepared copy was renewed: the old runner's step is bound to stale weights
            runner.release()
        while len(self._runners) >= self.max_runners:
            self._runners.pop(next(iter(self._runners))).release()
        b, _, h, w = x_start.shape
        self._runners[key] = _Runner(net, (b, h, w), device, self.table(device), self.config, plan_, model)
        live = {id(r.source) for r in self._runners.values()}
        for k in [k for k in self._models if k[0] not in live]:  # copies of models no runner uses any more
            del self._models[k]
        return self._runners[key]

    def release(self, model: nn.Module) -> None:
        """Release the runners and prepared copies of one model (e.g. one the caller will not use again)."""
        for key in [k for k, r in self._runners.items() if r.source is model]:
            self._runners.pop(key).release()
        for key in [k for k in self._models if k[0] == id(model)]:
            del self._models[key]

    def close(self) -> None:
        """Release every runner (buffers, compiled steps, CUDA graphs and their pools) and prepared model copies."""
        for runner in self._runners.values():
            runner.release()
        self._runners.clear()
        self._models.clear()

    @torch.no_grad()
    def sample(self, model: nn.Module, x_start: torch.Tensor, I: torch.Tensor, V: torch.Tensor,  # noqa: E741
               *, callback: Optional[StepCallback] = None) -> SampleResult:
        """Run all steps from ``x_start`` (B, 3, H, W) with sources ``I``, ``V`` (B, 1, H, W) in [-1, 1].

        The tensors a ``callback`` receives are the sampler's buffers: valid during the callback, overwritten by
        later steps (clone what must be kept). Raises :class:`NonFiniteError` when the sample went non-finite.
        """
        check_inputs(x_start, I, V)
        runner = self._runner(model, x_start)
        compile_seconds = None
        if not runner.warm:
            if runner.fn is ddfm_step and not (runner.plan.cuda_graphs and runner.device.type == "cuda"):
                runner.warm = True  # nothing to compile or capture: the first real step is the first call
            else:
                runner.buf.reset(x_start, I, V)
                compile_seconds = runner.warm_up()
        buf = runner.buf
        buf.reset(x_start, I, V)
        n = self.num_steps
        timesteps = self.schedule.timestep_map
        for j in range(n):
            runner.step()
            if callback is not None:
                idx = n - 1 - j
                callback(StepOutput(j, idx, int(timesteps[idx]), buf.x, buf.x0, buf.state))
        bad = buf.nonfinite.tolist()
        if any(bad):
            stage = NONFINITE_STAGES[bad.index(True)]
            raise NonFiniteError(f"the sample went non-finite (NaN or inf) in {stage}; nothing was written. "
                                 "Check the checkpoint's weights and the lamb / rho values")
        # At idx = 0, ac_prev = 1: x_{-1} equals x0' exactly; the official loop returns x_prev. The state is the
        # runner's buffer (the next sample of this shape overwrites it): clone it to keep it.
        return SampleResult(sample=buf.x.clone(), state=buf.state, plan=runner.plan,
                            compile_seconds=compile_seconds)
