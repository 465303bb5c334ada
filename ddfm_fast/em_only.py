"""DDFM without a diffusion prior: the EM step iterated on its own (the paper's ablation I, Zhao et al. 2023, Tab. 3).

With the prior removed, nothing proposes f_{0|t}; each EM step is fed the previous step's output instead:

    f_0     = (I + V) / 2
    F_k     = EM_step(f_k, I, V, state)           (Eqs. 16-30, ``ddfm_fast.em.em_step``; state carried along)
    f_{k+1} = F_k                                 for k = 0 .. steps - 1

and the result is F_{steps-1}. The official post-processing then applies to F itself (there is no RGB sample):
min-max to 0..255 and the reference-era rounding (:func:`postprocess_em_only`).

The EM's input scale. I and V are the sources in [-1, 1] (gray / 127.5 - 1). In the full sampler f_pre is
``Y(x0) / 255`` with the BT.601 studio-swing matrix applied to an x0 in [-1, 1] (the official colour conversion),
i.e. ``16/255 + 219/255 * g`` for a gray x0 = g, an affine image of [-1, 1] onto about [-0.80, 0.92]. That offset
and gain are an accident of the official colour conversion, not part of the EM model: the model (Eq. 11) compares
f directly with I and V (X = f - V, Y - X = I - f), and its output F = I - X lives in the scale of I and V. So
here f_0 = (I + V) / 2 is taken in the sources' own [-1, 1] scale, and because F_k is already in that scale the
iteration f_{k+1} = F_k never leaves it (in the sampler, too, a rectified Y = F passes back through
RGB -> Y / 255 unchanged when x0' is not clipped). The final min-max stretch makes the output independent of any
affine rescaling of F, so only f_0's relation to I and V matters, and (I + V) / 2 in [-1, 1] is the one
the ablation describes ("the average of the sources").

F is not clamped between iterations (the sampler clamps the network's x0 prediction, which does not exist here).

What it computes, in practice: the average is a near-fixed point of the EM step. With f = (I + V) / 2,
X = f - V = Y / 2 = Y - X, so the E-step's C and D (Eq. 16) are equal while tau_a = tau_b (both start at 1 and
their updates, Eq. 17, stay equal), and the least-squares X (Eq. 29) is Y / 2 again up to the rho-weighted TV
term. Measured: max |F - (I + V) / 2| <= 1.4e-4 after 1 to 100 steps (random sources, and TNO pair 01), i.e.
EM-only fusion from f_0 = (I + V) / 2 is the average fusion to within 1/50 of a grey level. The paper's
ablation I reports numbers above the plain average's (Tab. 3), so its unpublished EM-only run must have started
elsewhere; this module does what the ablation describes and says so.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ddfm_fast import io
from ddfm_fast.config import SamplerConfig
from ddfm_fast.em import EMState, em_init, em_step


class EMOnlyNonFiniteError(RuntimeError):
    """EM-only fusion went NaN or infinite."""


@torch.no_grad()
def fuse_em_only(I: torch.Tensor, V: torch.Tensor, config: SamplerConfig,  # noqa: E741
                 callback: Optional[Callable[[int, torch.Tensor, EMState], None]] = None) -> torch.Tensor:
    """EM-only fusion (ablation I): ``config.steps`` EM iterations from ``f_0 = (I + V) / 2``; the final F (B, 1, H, W).

    Args:
        I, V: the sources (B, 1, H, W) float32 in [-1, 1], in the official driver's roles (I = visible / MRI,
            V = infrared / functional; see ``ddfm_fast.api``).
        config: a ``prior="none"`` config: ``steps`` EM iterations (None: 100), ``lamb``, ``rho``,
            ``tau_reduce`` and the TV proximal operator (``tv_prox``, ``tv_threshold``) as in the sampler.
        callback: called after every iteration with its index (0 .. N-1), the estimate F and the EM state (valid
            during the call); an exception raised in it ends the fusion there (how a progress bar advances and a
            cancel between two iterations lands).
    """
    if config.prior != "none":
        raise ValueError("fuse_em_only takes a SamplerConfig with prior='none'")
    if I.shape != V.shape:
        raise ValueError(f"I and V must have the same shape, got {tuple(I.shape)} and {tuple(V.shape)}")
    config = config.for_model(None)
    state = em_init(I)
    f = (I + V) / 2
    for i in range(config.num_steps()):
        f, state = em_step(f, I, V, state, config.lamb, config.rho, config.tau_reduce, config.tv_prox,
                           config.tv_threshold)
        if callback is not None:
            callback(i, f, state)
    if not bool(torch.isfinite(f).all()):
        raise EMOnlyNonFiniteError("EM-only fusion went non-finite (NaN or inf); nothing was written. "
                                   "Check the lamb / rho values")
    return f


def postprocess_em_only(F: torch.Tensor) -> np.ndarray:
    """The official output of one F (1, 1, H, W) or (H, W): min-max to 0..255, rounded as reference imageio did."""
    y = F.detach().float().cpu().reshape(F.shape[-2:]).numpy()
    return io.to_uint8_official(io.minmax_0_255(y))
