"""The DDFM step (Zhao et al., ICCV 2023, Algorithm 1): one UNet call, one EM rectification, one DDIM update.

This file is the step. Every execution runs :func:`ddfm_step`: the eager loop calls it, ``torch.compile``
compiles it (``fullgraph=True``), and CUDA-graph capture records one call of the compiled or eager function and
replays it. It reads everything from :class:`StepBuffers` (static tensors allocated once per image size) and from
the :class:`~ddfm_fast.schedule.StepTable` through a device step counter, so nothing in a step reads a value
back to the host.

Per step, in loop order j = 0 .. N-1 (spaced index idx = N-1-j, original timestep t = timestep_map[idx]):

    eps      = UNet(x_t, t)[:, :3]                                   (the variance channels are unused by DDIM)
    x0       = clamp(c1 * x_t - c2 * eps, -1, 1)                     (Eq. 3: f~_{0|t})
    f_pre    = Y(x0) / 255                                           (official YCbCr scaling, ``color.py``)
    F, state = EM_step(f_pre, I, V, state)                           (Eqs. 16-30, ``em.py``: f^_{0|t})
    x0'      = RGB(Y := F, Cb, Cr of x0)                             (not clipped again, as official)
    eps'     = (c1 * x_t - x0') / c2                                 (eps recomputed from the rectified x0)
    x_{t-1}  = sqrt(ac_prev) * x0' + sqrt(1 - ac_prev) * eps'        (DDIM update, eta = 0)

Notation (buffer -> paper): ``x`` x_t (overwritten by x_{t-1}), ``x0`` the rectified f^_{0|t} as RGB,
``I``/``V`` the sources i/v in the official driver's roles, ``state`` the EM variables C, D, tau_a, tau_b, H,
F1, F2 (Eqs. 16-27), carried from step to step and reset per sample.

The tail after the UNet is plain torch (:func:`step_tail_torch`, the oracle) or the fused Triton kernels, which
enter the step as the custom op ``ddfm_fast::triton_step_tail``: every tensor it reads or writes and every
scalar is an argument, so the compiler schedules it as one opaque call with declared mutations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ddfm_fast import color
from ddfm_fast.config import SamplerConfig
from ddfm_fast.em import EMState, em_init, em_step
from ddfm_fast.schedule import C1, C2, SQRT_1M_AC_PREV, SQRT_AC_PREV, StepTable

# Indices of StepBuffers.nonfinite: which stage first produced a NaN or an infinity.
NONFINITE_UNET, NONFINITE_EM = 0, 1
NONFINITE_STAGES = ("the UNet's noise prediction", "the EM rectification / DDIM update")


@dataclass
class StepBuffers:
    """The static tensors of one (B, H, W) sample; their addresses never change (a CUDA graph needs that)."""

    x: torch.Tensor  # (B, 3, H, W) x_t; each step overwrites it with x_{t-1}
    x0: torch.Tensor  # (B, 3, H, W) x0' of the last step
    I: torch.Tensor  # (B, 1, H, W) the anchor source (visible / MRI)  # noqa: E741
    V: torch.Tensor  # (B, 1, H, W) the partner source (infrared / functional)
    j: torch.Tensor  # (1,) int64 step counter, on the device
    nonfinite: torch.Tensor  # (2,) bool: a NaN/inf seen in eps, or in the step's output (see NONFINITE_*)
    state: EMState
    tail: Optional["TritonTail"] = None  # the Triton tail's workspace, when that backend runs

    @classmethod
    def create(cls, batch: int, height: int, width: int, device: torch.device, *, triton: bool) -> "StepBuffers":
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        I = zeros(batch, 1, height, width)  # noqa: E741
        return cls(x=zeros(batch, 3, height, width), x0=zeros(batch, 3, height, width), I=I,
                   V=zeros(batch, 1, height, width), j=torch.zeros(1, dtype=torch.long, device=device),
                   nonfinite=torch.zeros(2, dtype=torch.bool, device=device), state=em_init(I),
                   tail=TritonTail.create(I) if triton else None)

    def reset(self, x_start: torch.Tensor, I: torch.Tensor, V: torch.Tensor) -> None:  # noqa: E741
        """Load one sample's inputs and put the counter, the flags and the EM state back to their start."""
        self.x.copy_(x_start)
        self.I.copy_(I)
        self.V.copy_(V)
        self.state.reset()
        self.j.zero_()
        self.nonfinite.zero_()


@dataclass
class TritonTail:
    """The Triton tail's workspace tensors (``ddfm_fast.kernels.em_tail.TailWorkspace``) and its output buffer."""

    numerator: torch.Tensor
    spectrum: torch.Tensor  # the rfft2 workspace as its real view (..., 2) float32 (see _triton_step_tail)
    denom: torch.Tensor
    partials: torch.Tensor
    colour: torch.Tensor
    x_next: torch.Tensor  # the kernels write x_{t-1} here, never into their own input x_t

    @classmethod
    def create(cls, I: torch.Tensor) -> "TritonTail":  # noqa: E741
        from ddfm_fast.kernels.em_tail import TailWorkspace

        ws = TailWorkspace.create(I, rgb=True)
        return cls(ws.numerator, torch.view_as_real(ws.spectrum), ws.denom, ws.partials, ws.colour, ws.x_prev)


def ddfm_step(model: nn.Module, buf: StepBuffers, table: StepTable, cfg: SamplerConfig, *,
              triton: bool = False, channels_last: bool = False) -> None:
    """One DDFM step at the position ``buf.j``: x_t in ``buf.x`` becomes x_{t-1}; ``buf.x0`` gets x0'.

    ``triton`` selects the fused tail (``buf.tail`` must exist); ``channels_last`` feeds the UNet NHWC. The UNet
    may run in half precision; its output is taken back to float32, where the whole tail runs.
    """
    coef = torch.index_select(table.coef, 0, buf.j)[0]
    t = torch.index_select(table.model_t, 0, buf.j).expand(buf.x.shape[0])
    x_in = buf.x.contiguous(memory_format=torch.channels_last) if channels_last else buf.x
    eps = model(x_in, t)[:, :3].float()
    buf.nonfinite[NONFINITE_UNET:NONFINITE_UNET + 1].logical_or_(~torch.isfinite(eps).all().reshape(1))
    if triton:
        tail, st = buf.tail, buf.state
        assert tail is not None
        torch.ops.ddfm_fast.triton_step_tail(
            buf.x, eps, coef, buf.I, buf.V, tail.x_next, buf.x0, st.C, st.D, st.F1, st.F2, st.H, st.tau_a,
            st.tau_b, tail.numerator, tail.spectrum, tail.denom, tail.partials, tail.colour,
            cfg.lamb, cfg.rho, cfg.tau_reduce == "image", cfg.clip, cfg.kappa is not None,
            0.0 if cfg.kappa is None else cfg.kappa)
        x_prev = tail.x_next
    else:
        x_prev, x0 = step_tail_torch(buf.x, eps, coef, buf.I, buf.V, buf.state, cfg)
        buf.x0.copy_(x0)
    buf.nonfinite[NONFINITE_EM:NONFINITE_EM + 1].logical_or_(~torch.isfinite(x_prev).all().reshape(1))
    buf.x.copy_(x_prev)
    buf.j.add_(1)


def step_tail_torch(x_t: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, I: torch.Tensor,  # noqa: E741
                    V: torch.Tensor, state: EMState, cfg: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything of a step after the UNet, in plain torch (the oracle for the Triton tail).

    ``coef`` is one row of :class:`~ddfm_fast.schedule.StepTable` (c1, c2, sqrt(ac_prev), sqrt(1 - ac_prev)).
    Returns ``(x_prev, pred_xstart)``; ``state`` is updated in place.
    """
    c1, c2 = coef[C1], coef[C2]
    x0 = c1 * x_t - c2 * eps
    if cfg.clip:
        x0 = x0.clamp(-1, 1)
    ycc = color.luminance_for_em(x0)
    F, _ = em_step(ycc[:, 0:1], I, V, state, cfg.lamb, cfg.rho, cfg.tau_reduce, cfg.tv_prox, cfg.tv_threshold)
    x0 = color.rgb_from_em(torch.cat([F, ycc[:, 1:]], dim=1))
    eps = (c1 * x_t - x0) / c2
    x_prev = x0 * coef[SQRT_AC_PREV] + coef[SQRT_1M_AC_PREV] * eps
    return x_prev, x0


@torch.library.custom_op(
    "ddfm_fast::triton_step_tail",
    mutates_args=("x_next", "x0", "C", "D", "F1", "F2", "H", "tau_a", "tau_b", "numerator", "spectrum",
                  "partials"),
)
def _triton_step_tail(x_t: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, I: torch.Tensor,  # noqa: E741
                      V: torch.Tensor, x_next: torch.Tensor, x0: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                      F1: torch.Tensor, F2: torch.Tensor, H: torch.Tensor, tau_a: torch.Tensor,
                      tau_b: torch.Tensor, numerator: torch.Tensor, spectrum: torch.Tensor, denom: torch.Tensor,
                      partials: torch.Tensor, colour: torch.Tensor, lamb: float, rho: float, tau_per_image: bool,
                      clip: bool, soft: bool, kappa: float) -> None:
    """The Triton step tail (``kernels/em_tail.py``); it writes only through its arguments, which under
    functionalization may be copies of the sampler's buffers.

    ``spectrum`` (the rfft2 workspace) arrives as its real view, (..., 2) float32, made once outside the step:
    inductor's functionalization cannot re-apply a custom op's mutation of a complex tensor, nor of a view taken
    inside the compiled graph (its decomposition asserts), while a real buffer it handles.
    """
    from ddfm_fast.kernels.em_tail import TailWorkspace, default_tiles, step_tail_triton

    B, _, h, w = I.shape
    tiles = default_tiles(I.device, h, w)
    n_tiles_w = -(-w // tiles.block_w)
    ws = TailWorkspace(shape=(B, 1, h, w), device=I.device, tiles=tiles, n_tiles_w=n_tiles_w,
                       n_tiles=-(-h // tiles.block_h) * n_tiles_w, numerator=numerator,
                       spectrum=torch.view_as_complex(spectrum),
                       denom=denom, partials=partials, colour=colour, x_prev=x_next, x0=x0, F=None)
    # The Triton tail reads and writes only the iterated EM variables; the OTFs live in the workspace (denom).
    state = EMState(C=C, D=D, F1=F1, F2=F2, H=H, tau_a=tau_a, tau_b=tau_b, otf_k1=None, otf_k2=None,  # type: ignore[arg-type]
                    otf_k1sq=None, otf_k2sq=None, tv_denom=None)  # type: ignore[arg-type]
    step_tail_triton(x_t, eps, coef, I, V, state, lamb=lamb, rho=rho,
                     tau_reduce="image" if tau_per_image else "batch", clip_denoised=clip,
                     tv_prox="soft" if soft else "shrink", tv_threshold=kappa if soft else None,
                     workspace=ws, out=x_next)


@_triton_step_tail.register_fake
def _(x_t, eps, coef, I, V, x_next, x0, C, D, F1, F2, H, tau_a, tau_b, numerator, spectrum, denom,  # noqa: E741
      partials, colour, lamb, rho, tau_per_image, clip, soft, kappa) -> None:
    return None
