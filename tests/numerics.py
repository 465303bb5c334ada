"""Tolerances derived from float32 arithmetic, shared by the numeric tests (one definition, not copies)."""

from __future__ import annotations

import math

import torch
from torch import nn

EPS32 = torch.finfo(torch.float32).eps  # 2**-23: one ulp at 1.0


def float32_network_atol(model: nn.Module, reference: torch.Tensor) -> float:
    """What two correct float32 runs of ``model`` may differ by, absolutely, on an output like ``reference``.

    Every convolution or linear layer sums K products; two CPUs (AVX2 against AVX-512, oneDNN against the native
    kernels, 1 against 2 threads) sum them in other orders and blockings, each differing by about
    ``EPS32 * sqrt(K)`` of the activations' scale (random-walk rounding). Over L layers those add in quadrature:
    ``EPS32 * sqrt(K_max * L)``, taken relative to the largest output. For the reference tiny UNet (K_max = 2304,
    L = 89) that is 1.5e-4 at |out| <= 2.83; measured between kernels and machines: 6e-6 to 1.7e-5. A real bug
    is far above it: GroupNorm's eps at 1e-6 instead of 1e-5 moves the output by 4.4e-4, one layer's weights
    scaled by 1 + 1e-4 by 4.5e-4.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    k_max = max(m.weight[0].numel() for m in layers)
    return EPS32 * math.sqrt(k_max * len(layers)) * float(reference.abs().max())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
