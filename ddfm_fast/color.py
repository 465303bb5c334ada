"""RGB <-> YCbCr exactly as the official DDFM sampler converts, on the tensor's own device.

The official ``p_sample`` sends the x0 prediction through scikit-image's ``rgb2ycbcr`` (on the CPU, in numpy),
divides by 255, hands channel 0 to the EM step, writes the rectified luminance back and converts with
``ycbcr2rgb(ycc * 255)``. The BT.601 "studio swing" matrix is meant for RGB in [0, 1], but DDFM applies it to
RGB in [-1, 1]; the EM step therefore sees a luminance in about [-0.796, 0.922] (the official conversion, reproduced in this module).
We reproduce the arithmetic bit for bit without the CPU round trip:

* forward: float32 ``fma(B, m2, fma(G, m1, R * m0)) + offset`` (what the reference build's matmul computes);
  float64 emulates each fused multiply-add: the float32 product is exact in float64, and one rounding to
  float32 follows, so the result does not depend on whether this device's float32 kernels contract to FMA;
* inverse: float32 input times 255, then float64 ``(ycc - offset) @ inv(M).T`` and a cast back to float32.
"""

from __future__ import annotations

import torch

# scikit-image's ``ycbcr_from_rgb`` (ITU-R BT.601, studio swing, for RGB in [0, 1]).
YCBCR_FROM_RGB = (
    (65.481, 128.553, 24.966),
    (-37.797, -74.203, 112.0),
    (112.0, -93.786, -18.214),
)
# ``scipy.linalg.inv(YCBCR_FROM_RGB)`` as scikit-image computes it; the exact float64 values matter for
# bitwise agreement, so they are written out rather than recomputed with another LAPACK.
RGB_FROM_YCBCR = (
    (0.004566210045662101, 1.1808799898470919e-09, 0.006258928969943936),
    (0.004566210045662101, -0.0015363236860449021, -0.003188110949655707),
    (0.004566210045662101, 0.007910716233554741, 1.1977497040200258e-08),
)
OFFSET = (16.0, 128.0, 128.0)


def _check_rgb(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected an (N, 3, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise TypeError(f"{name}: expected float32 (the official conversion is float32), got {x.dtype}")


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """scikit-image ``rgb2ycbcr`` on an (N,3,H,W) float32 tensor, without the /255 (bitwise, see module doc)."""
    _check_rgb(rgb, "rgb_to_ycbcr")
    x = rgb.double()
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    rows = []
    for (m0, m1, m2), off in zip(YCBCR_FROM_RGB, OFFSET):
        # The matrix is cast to float32 first (``matrix.astype(arr.dtype)`` in scikit-image).
        m0, m1, m2 = (float(torch.tensor(m, dtype=torch.float32)) for m in (m0, m1, m2))
        acc = (r * m0).float().double()  # R*m0 rounded to float32
        acc = (g * m1 + acc).float().double()  # fma(G, m1, acc): one rounding to float32
        acc = (b * m2 + acc).float()  # fma(B, m2, acc)
        rows.append(acc + off)  # float32 add of the offset
    return torch.cat(rows, dim=1)


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    """scikit-image ``ycbcr2rgb`` as the official wrapper calls it: float64 inside, float32 out."""
    _check_rgb(ycbcr, "ycbcr_to_rgb")
    x = ycbcr.double()
    ys = [x[:, c : c + 1] - OFFSET[c] for c in range(3)]
    rows = [ys[0] * m0 + ys[1] * m1 + ys[2] * m2 for (m0, m1, m2) in RGB_FROM_YCBCR]
    return torch.cat(rows, dim=1).float()


def luminance_for_em(rgb: torch.Tensor) -> torch.Tensor:
    """``rgb_to_ycbcr(rgb) / 255``: the three channels as the sampler holds them (channel 0 is EM's f_pre)."""
    return rgb_to_ycbcr(rgb) / 255


def rgb_from_em(ycc_div255: torch.Tensor) -> torch.Tensor:
    """``ycbcr_to_rgb(ycc * 255)``: back to RGB after the EM step rewrote channel 0 (no clipping, as official)."""
    return ycbcr_to_rgb(ycc_div255 * 255)
