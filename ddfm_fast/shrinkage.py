"""The shrinkage prior: an analytic x0 predictor for DDFM that needs no network (the shipped CPU default).

DDFM's EM rectification (``em.py``, Eqs. 16-29, as the official ``EM_onestep`` computes it) turns the prior's x0
prediction into per-pixel blend weights of the two sources: with ``f = f_{0|t}``,

    F ~= (1 - w) * I + w * V,    w = a |f - V| / (a |f - V| + b |I - f|),   w >= 1/3 (the clamp D <= 2C),

where a = sqrt(2 / tau_a), b = sqrt(2 / tau_b) (Eq. 17), up to the small ``rho * H`` TV term. The weight goes to the
source *farther* from the prediction. A prediction that reproduces its input (a good denoiser near t = 0) makes
consecutive steps swap the weights (w -> 1 - w), which averages out to the plain average plus the noise the swaps
carry (measured: the trained ``ddfm-small`` wins at most 2 of the 6 IVF metrics (EN, SD) against EM-only fusion at
any step count in ``bench/results/prior_study.md``, and none in ``bench/results/quality.md``). A prediction with
*less* contrast than its input keeps the weights on the source that deviates more from the image's mean at each
pixel, which is the saliency rule fusion metrics reward.

This prior is that prediction, in closed form. For x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Eq. 1) write
z = x_t / sqrt(abar_t) = x0 + sigma_t * eps with sigma_t^2 = (1 - abar_t) / abar_t, and m the mean of z over
each image and channel. The posterior mean of x0 under an i.i.d. Gaussian prior of unit variance around m is
m + (z - m) / (1 + sigma_t^2); this prior returns that estimate with its deviation from the mean scaled by the
contrast ``k`` < 1:

    x0_hat = m + k * (z - m) / (1 + sigma_t^2),       eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t).

``k`` was chosen on training-pool pairs only (``bench/shrinkage_fit.py``, ``bench/results/shrinkage_fit.md``),
never on the dev pairs the quality report scores. The 20 default steps are a speed trade-off: on those pairs 10 to
50 steps score within 2 % of each other on every metric (50 a little higher on MI and SSIM). It is not a model of
natural images and it knows nothing of texture: everything it adds to EM-only fusion comes through the EM step. For the paper's results use the paper's
prior (``adm256-uncond``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ddfm_fast.schedule import NUM_TRAIN_TIMESTEPS, base_alphas_cumprod

# The contrast k, chosen on training-pool pairs by bench/shrinkage_fit.py, and the default step count (see above).
DEFAULT_CONTRAST = 0.2
DEFAULT_STEPS = 20


class ShrinkagePrior(nn.Module):
    """The x0 predictor of this module's docstring, in the UNet's interface: ``forward(x_t, t) -> eps`` (B, 3, H, W).

    ``t`` holds original timesteps of the linear 1000-step schedule (what the sampler gives a UNet). The model
    has no parameters; its two schedule tables are buffers, so ``.to(device)`` moves them and a compiled or
    CUDA-graphed step reads them without a host sync. Each image and channel uses its own mean, so a batched image
    gets the prediction it gets alone.
    """

    def __init__(self, contrast: float = DEFAULT_CONTRAST, default_steps: int = DEFAULT_STEPS,
                 num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        super().__init__()
        if not 0.0 <= float(contrast) <= 1.0:
            raise ValueError(f"contrast must be in [0, 1], got {contrast!r}")
        self.contrast = float(contrast)
        self.default_steps = int(default_steps)
        abar = base_alphas_cumprod(num_timesteps)
        self.register_buffer("sqrt_abar", torch.from_numpy(np.sqrt(abar)).float(), persistent=False)
        self.register_buffer("sqrt_1m_abar", torch.from_numpy(np.sqrt(1.0 - abar)).float(), persistent=False)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1, 1)
        a = self.sqrt_abar.index_select(0, timesteps.reshape(-1)).view(shape).to(x.dtype)
        s = self.sqrt_1m_abar.index_select(0, timesteps.reshape(-1)).view(shape).to(x.dtype)
        z = x / a
        m = z.mean(dim=(-2, -1), keepdim=True)
        # 1 / (1 + sigma^2) with sigma = s / a is a^2 (a^2 + s^2 = 1).
        x0 = m + (self.contrast * a * a) * (z - m)
        return (x - a * x0) / s

    def extra_repr(self) -> str:
        return f"contrast={self.contrast}, default_steps={self.default_steps}"
