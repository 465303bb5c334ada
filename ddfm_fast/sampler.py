"""The DDFM sampling loop (Zhao et al., ICCV 2023, Algorithm 1): DDIM (eta = 0) with one EM step per UNet call.

Per step, in loop order j = 0 .. N-1 (spaced index idx = N-1-j, original timestep t = timestep_map[idx]):

    eps      = UNet(x_t, t)[:, :3]                                   (the variance channels are unused by DDIM)
    x0       = clamp(c1 * x_t - c2 * eps, -1, 1)                     (Eq. 3: f~_{0|t})
    f_pre    = Y(x0) / 255                                           (official YCbCr scaling, ``color.py``)
    F, state = EM_step(f_pre, I, V, state)                           (Eqs. 16-30, ``em.py``: f^_{0|t})
    x0'      = RGB(Y := F, Cb, Cr of x0)                             (not clipped again, as official)
    eps'     = (c1 * x_t - x0') / c2                                 (eps recomputed from the rectified x0)
    x_{t-1}  = sqrt(ac_prev) * x0' + sqrt(1 - ac_prev) * eps'        (DDIM update, eta = 0)

The EM state is created once, at the first step, and carried through all steps (reference README §6.1).
Nothing in a step reads a value back to the host: the coefficients come from a device table indexed by the
step counter, and the EM state is updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from ddfm_fast import color
from ddfm_fast.dispatch import BackendChoice, resolve_backend
from ddfm_fast.em import EMState, TauReduce, TVProx, em_init, em_step, resolve_tv_prox
from ddfm_fast.schedule import C1, C2, SQRT_1M_AC_PREV, SQRT_AC_PREV, Respacing, Schedule, StepTable

if TYPE_CHECKING:  # the kernels import triton; only the Triton backend loads them
    from ddfm_fast.kernels.em_tail import TailWorkspace


@dataclass
class StepOutput:
    """What one step produced; handed to the per-step callback (tensors stay on the device)."""

    j: int  # loop position, 0 .. N-1
    idx: int  # spaced index, N-1 .. 0 (the official ``idx``, used in progress file names)
    x_t: torch.Tensor  # the step's input (UNet input)
    pred_xstart: torch.Tensor  # x0' after the EM rectification
    x_prev: torch.Tensor  # the step's output x_{t-1}
    state: EMState


StepCallback = Callable[[StepOutput], None]


@dataclass
class SampleResult:
    """The final sample (x0' of the last step, (B, 3, H, W) in about [-1, 1]) and the final EM state."""

    sample: torch.Tensor
    state: EMState
    backend: BackendChoice


class DDFMSampler:
    """DDIM + EM sampler for one respacing; the schedule table is built once per sampler.

    Args:
        steps: the respacing (int, ``"N"``, comma list or ``"ddimN"``; the paper uses 100).
        lamb, rho: the EM step's TV weight and ADMM penalty (official 0.5 and 0.001).
        tau_reduce: ``"batch"`` (official: one tau over the whole batch) or ``"image"`` (independent images).
        clip_denoised: clamp the x0 prediction to [-1, 1] before the EM step (official True).
        tv_prox: the EM step's F update: ``"shrink"`` (official linear shrink) or ``"soft"`` (the paper's soft
            threshold, Eqs. 26-27; needs ``tv_threshold``, see :func:`ddfm_fast.em.resolve_tv_prox`).
        tv_threshold: the soft threshold kappa >= 0 (only with ``"soft"``; there is no safe default).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``ddfm_fast.dispatch``).
        num_train_timesteps: length of the base linear schedule (the ADM models: 1000).
    """

    def __init__(
        self,
        steps: Respacing = 100,
        *,
        lamb: float = 0.5,
        rho: float = 0.001,
        tau_reduce: TauReduce = "batch",
        clip_denoised: bool = True,
        tv_prox: TVProx = "shrink",
        tv_threshold: Optional[float] = None,
        backend: str = "auto",
        num_train_timesteps: int = 1000,
    ) -> None:
        if tau_reduce not in ("batch", "image"):
            raise ValueError(f"tau_reduce must be 'batch' or 'image', got {tau_reduce!r}")
        resolve_tv_prox(tv_prox, tv_threshold)  # fail here, not at the first step
        self.tv_prox: TVProx = tv_prox
        self.tv_threshold = None if tv_threshold is None else float(tv_threshold)
        self.schedule = Schedule.create(steps, num_train_timesteps)
        self.lamb, self.rho = float(lamb), float(rho)
        self.tau_reduce: TauReduce = tau_reduce
        self.clip_denoised = clip_denoised
        self.backend = backend
        self._tables: dict[torch.device, StepTable] = {}

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def table(self, device: torch.device) -> StepTable:
        """The step table on ``device``, built on first use and kept."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.schedule.table(device)
        return self._tables[device]

    def step(
        self, model: nn.Module, x_t: torch.Tensor, j: int, I: torch.Tensor, V: torch.Tensor,  # noqa: E741
        state: EMState, table: StepTable, *, workspace: Optional["TailWorkspace"] = None,
        out: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDFM step at loop position ``j``; returns ``(x_prev, pred_xstart)`` and updates ``state``.

        With a ``workspace`` (``ddfm_fast.kernels.em_tail.TailWorkspace``) the tail after the UNet runs as the
        fused Triton kernels, writing x_prev into ``out`` (default ``workspace.x_prev``) and x0' into
        ``workspace.x0``; without one, as plain torch (``step_tail_torch``).
        """
        t = table.model_t[j : j + 1].expand(x_t.shape[0])
        eps = model(x_t, t)[:, : x_t.shape[1]]
        tv = dict(tv_prox=self.tv_prox, tv_threshold=self.tv_threshold)
        if workspace is not None:
            from ddfm_fast.kernels.em_tail import step_tail_triton

            return step_tail_triton(x_t, eps, table.coef[j], I, V, state, lamb=self.lamb, rho=self.rho,
                                    tau_reduce=self.tau_reduce, clip_denoised=self.clip_denoised,
                                    workspace=workspace, out=out, **tv)
        return step_tail_torch(x_t, eps, table.coef[j], I, V, state, lamb=self.lamb, rho=self.rho,
                               tau_reduce=self.tau_reduce, clip_denoised=self.clip_denoised, **tv)

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        x_start: torch.Tensor,
        I: torch.Tensor,  # noqa: E741
        V: torch.Tensor,
        *,
        callback: Optional[StepCallback] = None,
        state: Optional[EMState] = None,
    ) -> SampleResult:
        """Run all steps from ``x_start`` (B, 3, H, W) with sources ``I``, ``V`` (B, 1, H, W) in [-1, 1].

        ``state`` may be a preallocated :class:`EMState` of the right shape (it is reset); otherwise one is made.

        With the Triton backend the step tail writes into buffers allocated once per call (two x buffers used in
        turn, and one x0'): the tensors a ``callback`` receives are valid during the callback and are
        overwritten by later steps, so clone what must be kept. The returned sample is not overwritten.
        """
        _check_inputs(x_start, I, V)
        choice = resolve_backend(self.backend, x_start.device)
        table = self.table(x_start.device)
        if state is None:
            state = em_init(I)
        else:
            state.reset()
        workspace, x_bufs = None, ()
        if choice.name == "triton":
            from ddfm_fast.kernels.em_tail import TailWorkspace

            workspace = TailWorkspace.create(I, rgb=True)
            x_bufs = (workspace.x_prev, torch.empty_like(workspace.x_prev))
        x = x_start
        x0 = x_start
        for j in range(self.num_steps):
            out = x_bufs[j % 2] if x_bufs else None  # x_t and x_{t-1} never share a buffer
            x_prev, x0 = self.step(model, x, j, I, V, state, table, workspace=workspace, out=out)
            if callback is not None:
                callback(StepOutput(j, self.num_steps - 1 - j, x, x0, x_prev, state))
            x = x_prev
        # At idx = 0, ac_prev = 1: x_prev equals x0' exactly; return x_prev as the official loop does.
        return SampleResult(sample=x, state=state, backend=choice)


def _check_inputs(x_start: torch.Tensor, I: torch.Tensor, V: torch.Tensor) -> None:  # noqa: E741
    if x_start.ndim != 4 or x_start.shape[1] != 3:
        raise ValueError(f"x_start must be (B, 3, H, W), got {tuple(x_start.shape)}")
    expected = (x_start.shape[0], 1, *x_start.shape[2:])
    for name, t in (("I", I), ("V", V)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must be {expected} to match x_start {tuple(x_start.shape)}, got {tuple(t.shape)}")
        if t.device != x_start.device:
            raise ValueError(f"{name} is on {t.device} but x_start is on {x_start.device}")
    if x_start.dtype != torch.float32:
        raise TypeError(f"x_start must be float32 (the faithful sampler), got {x_start.dtype}")


def step_tail_torch(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    coef: torch.Tensor,
    I: torch.Tensor,  # noqa: E741
    V: torch.Tensor,
    state: EMState,
    *,
    lamb: float,
    rho: float,
    tau_reduce: TauReduce = "batch",
    clip_denoised: bool = True,
    tv_prox: TVProx = "shrink",
    tv_threshold: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything of a step after the UNet, in plain torch (the oracle for the Triton tail).

    ``coef`` is one row of :class:`~ddfm_fast.schedule.StepTable` (c1, c2, sqrt(ac_prev), sqrt(1 - ac_prev)).
    ``tv_prox`` / ``tv_threshold`` select the EM step's F update (see :func:`ddfm_fast.em.em_step`).
    Returns ``(x_prev, pred_xstart)``; ``state`` is updated in place.
    """
    c1, c2 = coef[C1], coef[C2]
    x0 = c1 * x_t - c2 * eps
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    ycc = color.luminance_for_em(x0)
    F, _ = em_step(ycc[:, 0:1], I, V, state, lamb, rho, tau_reduce, tv_prox, tv_threshold)
    x0 = color.rgb_from_em(torch.cat([F, ycc[:, 1:]], dim=1))
    eps = (c1 * x_t - x0) / c2
    x_prev = x0 * coef[SQRT_AC_PREV] + coef[SQRT_1M_AC_PREV] * eps
    return x_prev, x0
