"""Noise schedule and DDIM respacing, with the official (guided-diffusion / DDFM) semantics.

DDFM samples the ADM model, trained with a linear 1000-step beta schedule (Ho et al. 2020), with DDIM
(Song et al. 2021, eta = 0) on a respaced subset of the timesteps. Everything here is computed once,
in float64 numpy as the official code does, and handed to the sampler as one float32 table
(:class:`StepTable`) whose rows are read by a step counter, so that no per-step host work remains.

Notation (variable -> paper / official code):
    alphas_cumprod[i]       alpha_bar_t of the spaced process at spaced index i
    timestep_map[i]         the original timestep t in 0..999 that the UNet sees at spaced index i
    c1 = sqrt(1/alpha_bar)  ``sqrt_recip_alphas_cumprod``   (x0 = c1 * x_t - c2 * eps)
    c2 = sqrt(1/alpha_bar-1) ``sqrt_recipm1_alphas_cumprod``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # torch is imported where the table is built, so that importing the options stays light
    import torch

Respacing = Union[int, str, Sequence[int]]

NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Linear schedule of Ho et al., scaled so that it keeps its shape for any number of steps (float64)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def base_alphas_cumprod(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """alpha_bar_t of the unspaced linear process (float64, length ``num_timesteps``)."""
    return np.cumprod(1.0 - linear_betas(num_timesteps))


def _ddim_stride_steps(num_timesteps: int, count: int) -> list[int]:
    """``"ddimN"``: the DDIM paper's fixed integer stride, ``range(0, T, s)`` with exactly N entries."""
    for stride in range(1, num_timesteps):
        steps = range(0, num_timesteps, stride)
        if len(steps) == count:
            return list(steps)
    raise ValueError(f"cannot create exactly {count} steps out of {num_timesteps} with an integer stride")


def _section_steps(num_timesteps: int, counts: Sequence[int]) -> list[int]:
    """Fractional striding within equal sections, exactly as guided-diffusion's ``space_timesteps``.

    ``cur`` grows by repeated float64 addition and Python's ``round`` (half to even) picks the step;
    this is not always ``round(i * stride)``, so the loop is kept as it is.
    """
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1:
            raise ValueError(f"a section needs at least one step, got {count}")
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return steps


def space_timesteps(num_timesteps: int, respacing: Respacing) -> list[int]:
    """The sorted original timesteps kept by a respacing.

    ``respacing`` is an int N, a string ``"N"``, a comma list ``"10,15,20"`` (one count per equal section),
    a sequence of ints (same meaning), or ``"ddimN"`` (integer stride, which differs from ``"N"``:
    ``"ddim10"`` keeps 0, 100, ..., 900 while ``10`` keeps 0, 111, ..., 999).
    """
    if isinstance(respacing, bool):
        raise TypeError("timestep respacing must be an int, a string or a list of ints, not a bool")
    if isinstance(respacing, str):
        text = respacing.strip()
        if not text:
            return list(range(num_timesteps))
        if text.startswith("ddim"):
            try:
                count = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"timestep respacing {respacing!r}: expected 'ddimN' with an integer N") from None
            return _ddim_stride_steps(num_timesteps, count)
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep respacing {respacing!r}: expected an int, 'N', a comma list 'N1,N2' or 'ddimN'"
            ) from None
    elif isinstance(respacing, (int, np.integer)):
        counts = [int(respacing)]
    else:
        counts = [int(c) for c in respacing]
    return sorted(set(_section_steps(num_timesteps, counts)))


@dataclass(frozen=True)
class Schedule:
    """A respaced diffusion schedule (float64 numpy, the official values), indexed by spaced index."""

    timestep_map: np.ndarray  # int64 (N,), ascending original timesteps
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.timestep_map.shape[0])

    @classmethod
    def create(cls, respacing: Respacing = 100, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "Schedule":
        """Linear betas over ``num_timesteps``, respaced like guided-diffusion's ``SpacedDiffusion``."""
        base_ac = base_alphas_cumprod(num_timesteps)
        keep = set(space_timesteps(num_timesteps, respacing))
        last, betas, tmap = 1.0, [], []
        for i, ac in enumerate(base_ac):
            if i in keep:
                betas.append(1 - ac / last)
                last = ac
                tmap.append(i)
        betas_arr = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - betas_arr)
        return cls(
            timestep_map=np.array(tmap, dtype=np.int64),
            betas=betas_arr,
            alphas_cumprod=ac,
            alphas_cumprod_prev=np.append(1.0, ac[:-1]),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        )

    def table(self, device: torch.device | str = "cpu") -> "StepTable":
        """The per-step coefficients in loop order, as float32 device tensors (see :class:`StepTable`)."""
        return StepTable.from_schedule(self, device)


# Column layout of StepTable.coef. The sampler reads one row per step.
C1, C2, SQRT_AC_PREV, SQRT_1M_AC_PREV = range(4)


@dataclass
class StepTable:
    """Per-step DDIM coefficients in **loop order** (row j is spaced index N-1-j), on the sampler's device.

    ``coef[j]`` holds, in float32 exactly as the official sampler multiplies them:
        c1 = float32(sqrt(1/ac)), c2 = float32(sqrt(1/ac - 1))      (x0 prediction and eps' recomputation)
        sqrt(float32(ac_prev)) and sqrt(1 - float32(ac_prev) - 0)   (DDIM update, eta = 0; sqrt in float32)
    ``model_t[j]`` is the original timestep given to the UNet (int64), ``spaced_idx[j]`` the spaced index.
    """

    coef: torch.Tensor  # (N, 4) float32
    model_t: torch.Tensor  # (N,) int64
    spaced_idx: torch.Tensor  # (N,) int64

    @property
    def num_steps(self) -> int:
        return int(self.model_t.shape[0])

    @classmethod
    def from_schedule(cls, schedule: Schedule, device: torch.device | str = "cpu") -> "StepTable":
        import torch

        order = np.arange(schedule.num_steps - 1, -1, -1)
        c1 = torch.from_numpy(schedule.sqrt_recip_alphas_cumprod[order]).float()
        c2 = torch.from_numpy(schedule.sqrt_recipm1_alphas_cumprod[order]).float()
        ac_prev = torch.from_numpy(schedule.alphas_cumprod_prev[order]).float()
        # The official code forms sigma = eta * ... = 0 and takes sqrt(1 - ac_prev - sigma**2) in float32;
        # subtracting an exact zero changes nothing, so it is left out.
        coef = torch.stack([c1, c2, torch.sqrt(ac_prev), torch.sqrt(1 - ac_prev)], dim=1)
        return cls(
            coef=coef.to(device),
            model_t=torch.from_numpy(schedule.timestep_map[order].copy()).to(device),
            spaced_idx=torch.from_numpy(order.copy()).to(device),
        )
