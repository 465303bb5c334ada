"""The DDFM step tail as two fused Triton kernels around one real FFT pair.

Everything of a sampling step after the UNet (Zhao et al., ICCV 2023, Algorithm 1 with the EM step of
Sec. 3.3) is memory bound: a few float32 planes are read and written, and the only real work is the TV
proximal step's FFT. The plain-torch tail (``ddfm_fast.step.step_tail_torch``) runs several dozen torch
ops, each a pass over one or more planes; this module runs three Triton kernels and three torch ops:

    kernel A  (_em_pre_kernel)   x_t, eps -> x0 = clamp(c1 x_t - c2 eps) -> f_pre = Y(x0)/255          (Eq. 3)
                                 X = f_pre - V, Y = I - V, the E-step C, D with D <= 2C                 (Eq. 16)
                                 per-tile sums of 1/(C+eps) + tau_a/2 and 1/(D+eps) + tau_b/2           (Eq. 17)
                                 the spatial numerator  N = (Y - X) + D1^T F1 + D2^T F2                 (Eq. 25)
    rfft2(N) / (1 + |K1|^2 + |K2|^2) -> irfft2 -> H       (torch.fft, into preallocated buffers)          (Eq. 25)
    kernel B  (_em_post_kernel)  the non-circular differences a1, a2 of H and the F update               (Eqs. 26-27)
                                 C, D again (bitwise as in A), the least squares X                       (Eq. 29)
                                 F = I - X, the inverse colour transform -> x0', eps', x_{t-1} (DDIM)    (Eq. 30)
    kernel C  (_tau_finish_kernel)  the tau means from A's per-tile sums, written into the state         (Eq. 17)

Why one forward FFT instead of the official three: by linearity ``conj(K1) * fft2(F1) = fft2(D1^T F1)`` where
D1 is the circular forward difference whose OTF is K1 (psf2otf of [1, -1]: ``(D1 f)[j] = f[j+1] - f[j]``,
wrapping), so its adjoint is ``(D1^T g)[j] = g[j-1] - g[j]`` (wrapping). Kernel A forms the whole numerator in
space; the input is real and the denominator real and even, so rfft2/irfft2 do half the work.

Why kernel B recomputes instead of reading what A computed: B needs x_t anyway (for eps'), and with eps it
rebuilds x0, f_pre, Cb, Cr, C and D from the same inputs with the same operations, bitwise equal to A. That
costs 3 plane reads (eps), where storing f_pre, Cb, Cr, C, D in A and reading them in B would cost 10.
Kernel C runs after B, so A and B both see the previous step's tau.

Traffic per step in float32 planes of B*H*W (1.23 MB at 480x640): A reads 10 (x_t 3, eps 3, I, V, F1, F2) and
writes 1; the FFT stage moves ~6 (rfft2, in-place divide, irfft2 into the state's H); B reads 9 (H, x_t 3,
eps 3, I, V) and writes 10 (C, D, F1, F2, x_{t-1} 3, x0' 3). About 36 planes, 44 MB at 480x640.

Numerics (faithful to the torch oracle, not just close):
    * divisions and square roots use ``tl.div_rn`` / ``tl.sqrt_rn``: Triton's ``/`` and ``tl.sqrt`` lower to the
      approximate ``div.full.f32`` / ``sqrt.approx.f32`` on NVIDIA GPUs;
    * kernels are launched with ``enable_fp_fusion=False`` so that ``a*b + c`` rounds twice, as torch's separate
      ops do (the colour transform relies on it in float64);
    * the RGB -> YCbCr rows emulate the reference build's float32 FMAs in float64 exactly as ``ddfm_fast.color``
      does; the inverse runs in float64; the float64 matrices are read from a small device buffer because a
      Python float literal inside a Triton kernel is a float32 constant;
    * the tau means are summed in float64 (per tile, then over tiles): within ~1 ulp of ``torch.mean``;
    * the collapsed FFT rounds differently from the official three; H differs from the oracle at the 1e-7 level.

Variables follow ``ddfm_fast.em`` (its module docstring maps them onto the paper's symbols). The kernels also run
in Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before triton is imported), with large tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ddfm_fast import color
from ddfm_fast.em import EMState, TauReduce, TVProx, difference_otfs, resolve_tv_prox

#: True when the kernels below were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED = bool(triton.knobs.runtime.interpret)


# --------------------------------------------------------------------------------------------- device helpers


@triton.jit
def _tile(pid_t, n_tiles_w, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row and column indices (BLOCK_H x BLOCK_W) of tile ``pid_t`` of an H x W image, and the in-image mask."""
    rows = (pid_t // n_tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = (pid_t % n_tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    return rows, cols, (rows < H) & (cols < W)


@triton.jit
def _predict_x0(xt, e, c1, c2, CLIP: tl.constexpr):
    """Eq. 3 / DDIM: ``x0 = c1 * x_t - c2 * eps``, clamped to [-1, 1] when CLIP (the official clip_denoised)."""
    x0 = c1 * xt - c2 * e
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    return x0


@triton.jit
def _ycbcr_row(r, g, b, m_ptr):
    """One row of scikit-image's ``rgb2ycbcr`` without the offset, bitwise as ``ddfm_fast.color``.

    ``fma(B, m2, fma(G, m1, R * m0))`` in float32 with one rounding per FMA, emulated in float64 (the float32
    products are exact there); ``m_ptr`` points at three float64 matrix entries that are float32 values.
    """
    m0 = tl.load(m_ptr)  # scalar loads of the 18-entry colour buffer: always in range
    m1 = tl.load(m_ptr + 1)
    m2 = tl.load(m_ptr + 2)
    acc = (r.to(tl.float64) * m0).to(tl.float32)
    acc = (g.to(tl.float64) * m1 + acc.to(tl.float64)).to(tl.float32)
    return (b.to(tl.float64) * m2 + acc.to(tl.float64)).to(tl.float32)


@triton.jit
def _rgb_row(y, cb, cr, m_ptr):
    """One row of ``ycbcr2rgb`` in float64 (inputs already offset-free): ``(y*m0 + cb*m1) + cr*m2`` -> float32."""
    m0 = tl.load(m_ptr)  # scalar loads of the 18-entry colour buffer: always in range
    m1 = tl.load(m_ptr + 1)
    m2 = tl.load(m_ptr + 2)
    return (y * m0 + cb * m1 + cr * m2).to(tl.float32)


@triton.jit
def _e_step(x, y, tau_a, tau_b):
    """Eq. 16 with the official epsilons: the expectations C and D, then the clamp D <= 2C.

    ``D = sqrt((2/tau_b) / (X^2 + 1e-6))`` and ``C = sqrt((2/tau_a) / (Y - X + 1e-6)^2)``: the 1e-6 is added after
    squaring for D and inside the square for C, as in ``EM_onestep``.
    """
    d = tl.sqrt_rn(tl.div_rn(tl.div_rn(2.0, tau_b), x * x + 1e-6))
    r = y - x + 1e-6
    c = tl.sqrt_rn(tl.div_rn(tl.div_rn(2.0, tau_a), r * r))
    two_c = 2.0 * c
    d = tl.where(d > two_c, two_c, d)
    return c, d


@triton.jit
def _m_step(h_ptr, c_ptr, d_ptr, f1_ptr, f2_ptr, plane, rows, cols, mask, H, W, x, y, tau_a, tau_b,
            shrink, rho, kappa, SOFT: tl.constexpr):
    """From H (Eq. 25): a1, a2, the F update (Eqs. 26-27), C and D (Eq. 16), and the least-squares X (Eq. 29).

    Stores F1, F2, C, D into the state and returns the new X. The differences are not circular: the last
    column (row) keeps H itself, as the official code does.
    """
    h = tl.load(h_ptr + plane, mask=mask, other=0.0)
    h_right = tl.load(h_ptr + plane + 1, mask=mask & (cols + 1 < W), other=0.0)
    h_down = tl.load(h_ptr + plane + W, mask=mask & (rows + 1 < H), other=0.0)
    a1 = tl.where(cols < W - 1, h - h_right, h)
    a2 = tl.where(rows < H - 1, h - h_down, h)
    if SOFT:
        # Eqs. 26-27 as the paper writes them: soft threshold sign(a) * max(|a| - kappa, 0).
        f1 = tl.where(a1 > 0, 1.0, tl.where(a1 < 0, -1.0, 0.0)) * tl.maximum(tl.abs(a1) - kappa, 0.0)
        f2 = tl.where(a2 > 0, 1.0, tl.where(a2 < 0, -1.0, 0.0)) * tl.maximum(tl.abs(a2) - kappa, 0.0)
    else:
        # The official linear shrink rho / (2 lamb + rho) * a (float32 factor, computed in double on the host).
        f1 = shrink * a1
        f2 = shrink * a2
    tl.store(f1_ptr + plane, f1, mask=mask)
    tl.store(f2_ptr + plane, f2, mask=mask)
    c, d = _e_step(x, y, tau_a, tau_b)
    tl.store(c_ptr + plane, c, mask=mask)
    tl.store(d_ptr + plane, d, mask=mask)
    # Eq. 29: X = (2 C Y + rho (Y - H)) / (2 C + 2 D + rho), in the official order of operations.
    return tl.div_rn(2.0 * c * y + rho * (y - h), 2.0 * c + 2.0 * d + rho)


# -------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _em_pre_kernel(
    src_ptr,  # FROM_RGB: x_t (B, 3, H, W); else f_pre (B, 1, H, W); float32, any strides
    s_sb, s_sc, s_sh, s_sw,  # strides of src, in elements (s_sc unused without FROM_RGB)
    eps_ptr,  # FROM_RGB: the UNet's eps (B, 3, H, W) float32, any strides; else unused (any valid pointer)
    e_sb, e_sc, e_sh, e_sw,  # strides of eps, in elements
    coef_ptr,  # this step's StepTable row: c1, c2, sqrt(ac_prev), sqrt(1 - ac_prev), float32
    coef_stride,  # stride of that row, in elements
    colour_ptr,  # float64 (18,): YCbCr-from-RGB (float32 values) then RGB-from-YCbCr, both row-major 3x3
    i_ptr, i_sb, i_sh, i_sw,  # I (B, 1, H, W) float32 and its strides
    v_ptr, v_sb, v_sh, v_sw,  # V (B, 1, H, W) float32 and its strides
    f1_ptr,  # state F1 (B, 1, H, W) contiguous float32: the previous step's horizontal TV variable
    f2_ptr,  # state F2 (B, 1, H, W) contiguous float32: the previous step's vertical TV variable
    tau_a_ptr,  # state tau_a (B,) float32, the previous step's (kernel C overwrites it after kernel B)
    tau_b_ptr,  # state tau_b (B,) float32, the previous step's
    num_ptr,  # out: the Eq. 25 numerator in space (B, 1, H, W) contiguous float32
    part_ptr,  # out: float64 (B, n_tiles, 2), per tile the sums of 1/(C+1e-10) + tau_a/2 and 1/(D+1e-10) + tau_b/2
    H, W,  # image height and width
    n_tiles_w,  # tiles per image row: cdiv(W, BLOCK_W)
    n_tiles,  # tiles per image: cdiv(H, BLOCK_H) * n_tiles_w
    CLIP: tl.constexpr,  # clamp x0 to [-1, 1] (official clip_denoised=True)
    FROM_RGB: tl.constexpr,  # True: the sampler's step (x_t, eps -> f_pre); False: the EM step alone (f_pre given)
    BLOCK_H: tl.constexpr,  # tile height (power of two)
    BLOCK_W: tl.constexpr,  # tile width (power of two)
):
    """Kernel A: f_pre (Eq. 3 + luminance), E-step (Eq. 16), tau partial sums (Eq. 17), TV numerator (Eq. 25)."""
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows, cols, mask = _tile(pid_t, n_tiles_w, H, W, BLOCK_H, BLOCK_W)

    if FROM_RGB:
        c1 = tl.load(coef_ptr)  # scalar loads of the 4-entry coefficient row: always in range
        c2 = tl.load(coef_ptr + coef_stride)
        xo = pid_b * s_sb + rows * s_sh + cols * s_sw
        eo = pid_b * e_sb + rows * e_sh + cols * e_sw
        r = _predict_x0(tl.load(src_ptr + xo, mask=mask, other=0.0), tl.load(eps_ptr + eo, mask=mask, other=0.0),
                        c1, c2, CLIP)
        g = _predict_x0(tl.load(src_ptr + xo + s_sc, mask=mask, other=0.0),
                        tl.load(eps_ptr + eo + e_sc, mask=mask, other=0.0), c1, c2, CLIP)
        b = _predict_x0(tl.load(src_ptr + xo + 2 * s_sc, mask=mask, other=0.0),
                        tl.load(eps_ptr + eo + 2 * e_sc, mask=mask, other=0.0), c1, c2, CLIP)
        # Official luminance: (Y of scikit-image's studio-swing YCbCr) / 255, applied to RGB in [-1, 1].
        f_pre = tl.div_rn(_ycbcr_row(r, g, b, colour_ptr) + 16.0, 255.0)
    else:
        f_pre = tl.load(src_ptr + pid_b * s_sb + rows * s_sh + cols * s_sw, mask=mask, other=0.0)

    i = tl.load(i_ptr + pid_b * i_sb + rows * i_sh + cols * i_sw, mask=mask, other=0.0)
    v = tl.load(v_ptr + pid_b * v_sb + rows * v_sh + cols * v_sw, mask=mask, other=0.0)
    y = i - v  # Eq. 11: Y = I - V
    x = f_pre - v  # X = f_pre - V
    tau_a = tl.load(tau_a_ptr + pid_b)  # scalar loads at the image's own index: always in range
    tau_b = tl.load(tau_b_ptr + pid_b)
    c, d = _e_step(x, y, tau_a, tau_b)

    # Eq. 17's summands, summed over the tile in float64; kernel C finishes the mean.
    sum_a = tl.where(mask, tl.div_rn(1.0, c + 1e-10) + tau_a * 0.5, 0.0).to(tl.float64)
    sum_b = tl.where(mask, tl.div_rn(1.0, d + 1e-10) + tau_b * 0.5, 0.0).to(tl.float64)
    part = (pid_b * n_tiles + pid_t) * 2
    tl.store(part_ptr + part, tl.sum(tl.sum(sum_a, axis=1), axis=0))  # scalar stores, one slot per tile
    tl.store(part_ptr + part + 1, tl.sum(tl.sum(sum_b, axis=1), axis=0))

    # Eq. 25's numerator in space: fft2(N) = fft2(Y - X) + conj(K1) fft2(F1) + conj(K2) fft2(F2), with the
    # adjoint circular differences (D1^T F1)[i, j] = F1[i, j-1] - F1[i, j] and (D2^T F2)[i, j] = F2[i-1, j] - F2[i, j].
    plane = pid_b * H * W + rows * W + cols
    cols_left = tl.where(cols == 0, W - 1, cols - 1)
    rows_up = tl.where(rows == 0, H - 1, rows - 1)
    f1 = tl.load(f1_ptr + plane, mask=mask, other=0.0)
    f1_left = tl.load(f1_ptr + pid_b * H * W + rows * W + cols_left, mask=mask, other=0.0)
    f2 = tl.load(f2_ptr + plane, mask=mask, other=0.0)
    f2_up = tl.load(f2_ptr + pid_b * H * W + rows_up * W + cols, mask=mask, other=0.0)
    tl.store(num_ptr + plane, (y - x) + (f1_left - f1) + (f2_up - f2), mask=mask)


@triton.jit
def _em_post_kernel(
    h_ptr,  # state H (B, 1, H, W) contiguous float32: this step's TV prox solution (Eq. 25), from irfft2
    src_ptr,  # FROM_RGB: x_t (B, 3, H, W); else f_pre (B, 1, H, W); float32, any strides (the same as kernel A's)
    s_sb, s_sc, s_sh, s_sw,  # strides of src, in elements
    eps_ptr,  # FROM_RGB: the UNet's eps (B, 3, H, W) float32, any strides; else unused
    e_sb, e_sc, e_sh, e_sw,  # strides of eps, in elements
    coef_ptr,  # this step's StepTable row: c1, c2, sqrt(ac_prev), sqrt(1 - ac_prev), float32
    coef_stride,  # stride of that row, in elements
    colour_ptr,  # float64 (18,): YCbCr-from-RGB (float32 values) then RGB-from-YCbCr, both row-major 3x3
    i_ptr, i_sb, i_sh, i_sw,  # I (B, 1, H, W) float32 and its strides
    v_ptr, v_sb, v_sh, v_sw,  # V (B, 1, H, W) float32 and its strides
    tau_a_ptr,  # state tau_a (B,) float32, still the previous step's (as in kernel A)
    tau_b_ptr,  # state tau_b (B,) float32
    c_ptr,  # out: state C (B, 1, H, W) contiguous float32
    d_ptr,  # out: state D
    f1_ptr,  # out: state F1 (read by kernel A before this launch)
    f2_ptr,  # out: state F2
    out_ptr,  # out, contiguous float32: FROM_RGB x_{t-1} (B, 3, H, W) (may be x_t itself); else F (B, 1, H, W)
    x0_ptr,  # out: FROM_RGB the rectified x0' (B, 3, H, W) contiguous float32; else unused
    shrink,  # float32 rho / (2 lamb + rho), the official F update factor (tv_prox "shrink")
    rho,  # float32 ADMM penalty rho (Eq. 29)
    kappa,  # float32 soft threshold (tv_prox "soft"); unused otherwise
    H, W,  # image height and width
    n_tiles_w,  # tiles per image row: cdiv(W, BLOCK_W)
    CLIP: tl.constexpr,  # clamp x0 to [-1, 1] (must equal kernel A's)
    FROM_RGB: tl.constexpr,  # True: the sampler's step; False: the EM step alone (writes F)
    SOFT: tl.constexpr,  # True: soft threshold (paper's Eqs. 26-27); False: the official linear shrink
    BLOCK_H: tl.constexpr,  # tile height (power of two)
    BLOCK_W: tl.constexpr,  # tile width (power of two)
):
    """Kernel B: F update (Eqs. 26-27), least squares (Eq. 29), F = I - X, inverse colour, eps', DDIM update."""
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows, cols, mask = _tile(pid_t, n_tiles_w, H, W, BLOCK_H, BLOCK_W)
    plane = pid_b * H * W + rows * W + cols
    i = tl.load(i_ptr + pid_b * i_sb + rows * i_sh + cols * i_sw, mask=mask, other=0.0)
    v = tl.load(v_ptr + pid_b * v_sb + rows * v_sh + cols * v_sw, mask=mask, other=0.0)
    tau_a = tl.load(tau_a_ptr + pid_b)  # scalar loads at the image's own index: always in range
    tau_b = tl.load(tau_b_ptr + pid_b)
    y = i - v

    if FROM_RGB:
        c1 = tl.load(coef_ptr)  # scalar loads of the 4-entry coefficient row: always in range
        c2 = tl.load(coef_ptr + coef_stride)
        sqrt_ac_prev = tl.load(coef_ptr + 2 * coef_stride)
        sqrt_1m_ac_prev = tl.load(coef_ptr + 3 * coef_stride)
        xo = pid_b * s_sb + rows * s_sh + cols * s_sw
        eo = pid_b * e_sb + rows * e_sh + cols * e_sw
        xt_r = tl.load(src_ptr + xo, mask=mask, other=0.0)
        xt_g = tl.load(src_ptr + xo + s_sc, mask=mask, other=0.0)
        xt_b = tl.load(src_ptr + xo + 2 * s_sc, mask=mask, other=0.0)
        r = _predict_x0(xt_r, tl.load(eps_ptr + eo, mask=mask, other=0.0), c1, c2, CLIP)
        g = _predict_x0(xt_g, tl.load(eps_ptr + eo + e_sc, mask=mask, other=0.0), c1, c2, CLIP)
        b = _predict_x0(xt_b, tl.load(eps_ptr + eo + 2 * e_sc, mask=mask, other=0.0), c1, c2, CLIP)
        # The same f_pre as kernel A (same operations on the same inputs), plus the chroma it did not need.
        f_pre = tl.div_rn(_ycbcr_row(r, g, b, colour_ptr) + 16.0, 255.0)
        cb = tl.div_rn(_ycbcr_row(r, g, b, colour_ptr + 3) + 128.0, 255.0)
        cr = tl.div_rn(_ycbcr_row(r, g, b, colour_ptr + 6) + 128.0, 255.0)

        x_new = _m_step(h_ptr, c_ptr, d_ptr, f1_ptr, f2_ptr, plane, rows, cols, mask, H, W, f_pre - v, y,
                        tau_a, tau_b, shrink, rho, kappa, SOFT)
        fused = i - x_new  # F = I - X: the rectified luminance, written into the Y/255 slot

        # ycbcr2rgb(ycc * 255): float32 * 255, then float64 (ycc - offset) @ inv(M).T, then float32.
        y64 = (fused * 255.0).to(tl.float64) - 16.0
        cb64 = (cb * 255.0).to(tl.float64) - 128.0
        cr64 = (cr * 255.0).to(tl.float64) - 128.0
        x0_r = _rgb_row(y64, cb64, cr64, colour_ptr + 9)
        x0_g = _rgb_row(y64, cb64, cr64, colour_ptr + 12)
        x0_b = _rgb_row(y64, cb64, cr64, colour_ptr + 15)

        # eps' = (c1 x_t - x0') / c2, then x_{t-1} = sqrt(ac_prev) x0' + sqrt(1 - ac_prev) eps' (DDIM, eta = 0).
        oo = pid_b * 3 * H * W + rows * W + cols
        tl.store(x0_ptr + oo, x0_r, mask=mask)
        tl.store(x0_ptr + oo + H * W, x0_g, mask=mask)
        tl.store(x0_ptr + oo + 2 * H * W, x0_b, mask=mask)
        tl.store(out_ptr + oo, x0_r * sqrt_ac_prev + sqrt_1m_ac_prev * tl.div_rn(c1 * xt_r - x0_r, c2), mask=mask)
        tl.store(out_ptr + oo + H * W,
                 x0_g * sqrt_ac_prev + sqrt_1m_ac_prev * tl.div_rn(c1 * xt_g - x0_g, c2), mask=mask)
        tl.store(out_ptr + oo + 2 * H * W,
                 x0_b * sqrt_ac_prev + sqrt_1m_ac_prev * tl.div_rn(c1 * xt_b - x0_b, c2), mask=mask)
    else:
        f_pre = tl.load(src_ptr + pid_b * s_sb + rows * s_sh + cols * s_sw, mask=mask, other=0.0)
        x_new = _m_step(h_ptr, c_ptr, d_ptr, f1_ptr, f2_ptr, plane, rows, cols, mask, H, W, f_pre - v, y,
                        tau_a, tau_b, shrink, rho, kappa, SOFT)
        tl.store(out_ptr + plane, i - x_new, mask=mask)


@triton.jit
def _tau_finish_kernel(
    part_ptr,  # float64 (B, n_tiles, 2): kernel A's per-tile sums (tau_a term, tau_b term)
    tau_a_ptr,  # out: state tau_a (B,) float32
    tau_b_ptr,  # out: state tau_b (B,) float32
    seg_len,  # tiles summed by one program: n_tiles ("image") or B * n_tiles ("batch")
    n_out,  # tau entries written by one program: 1 ("image") or B ("batch", every image gets the batch mean)
    count,  # pixels behind one program's sum: H * W ("image") or B * H * W ("batch")
    SEG_ITERS: tl.constexpr,  # cdiv(seg_len, BLOCK) (a constexpr trip count: the interpreter cannot loop to a
                              # runtime bound with numpy >= 2, and it is fixed per shape anyway)
    OUT_ITERS: tl.constexpr,  # cdiv(n_out, BLOCK)
    BLOCK: tl.constexpr,  # tiles (and tau entries) handled per loop iteration (power of two)
):
    """Kernel C: Eq. 17, ``tau = mean(1/(C + 1e-10) + tau_old/2)``, finished on the device (no host sync)."""
    pid = tl.program_id(0)
    acc_a = tl.zeros([BLOCK], dtype=tl.float64)
    acc_b = tl.zeros([BLOCK], dtype=tl.float64)
    for it in range(SEG_ITERS):
        k = it * BLOCK + tl.arange(0, BLOCK)
        m = k < seg_len
        slot = (pid * seg_len + k) * 2
        acc_a += tl.load(part_ptr + slot, mask=m, other=0.0)
        acc_b += tl.load(part_ptr + slot + 1, mask=m, other=0.0)
    mean_a = (tl.sum(acc_a, axis=0) / count).to(tl.float32)
    mean_b = (tl.sum(acc_b, axis=0) / count).to(tl.float32)
    for it in range(OUT_ITERS):
        k = it * BLOCK + tl.arange(0, BLOCK)
        m = k < n_out
        tl.store(tau_a_ptr + pid * n_out + k, tl.zeros([BLOCK], dtype=tl.float32) + mean_a, mask=m)
        tl.store(tau_b_ptr + pid * n_out + k, tl.zeros([BLOCK], dtype=tl.float32) + mean_b, mask=m)


# --------------------------------------------------------------------------------------- host-side layout


@dataclass(frozen=True)
class TileConfig:
    """Tile shape (shared by kernels A and B; powers of two) and the warps of each kernel."""

    block_h: int
    block_w: int
    warps_pre: int  # kernel A
    warps_post: int  # kernel B (more live values: 3 channels of x_t and eps, float64 colour math)

    def __post_init__(self) -> None:
        for name in ("block_h", "block_w"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two, got {value}")


def default_tiles(device: torch.device | str, height: int, width: int) -> TileConfig:
    """The tile shape for ``device``.

    GPU: 4 x 128 tiles (rows of 512 contiguous bytes for coalescing), 4 warps for kernel A (4 elements per
    thread) and 8 for kernel B (2 per thread). ptxas for sm_90 (triton 3.6, no fp fusion, specialised as a GPU
    launch; tests/test_kernels_aot.py) reports 52 and 64 registers and no spills; at 8 elements per thread kernel B needs 176 registers, which caps occupancy at
    2 blocks per SM, too few loads in flight for a memory-bound kernel. (Not yet timed on a GPU.)
    CPU interpreter: tiles of up to 2^18 elements, so that an image takes one or two programs (each program is
    a Python call there; few large ones are fast, many small ones are not).
    """
    pw, ph = triton.next_power_of_2(width), triton.next_power_of_2(height)
    if INTERPRETED or torch.device(device).type == "cpu":
        block_w = min(pw, 1024)
        return TileConfig(min(ph, max(1, 2**18 // block_w)), block_w, 1, 1)
    block_w = min(pw, 128)
    block_h = min(ph, max(1, 512 // block_w))
    n = block_h * block_w
    return TileConfig(block_h, block_w, max(1, min(4, n // 128)), max(1, min(8, n // 64)))


def _colour_constants(device: torch.device) -> torch.Tensor:
    """float64 (18,): the forward matrix cast to float32 (as scikit-image does), then the float64 inverse."""
    fwd = torch.tensor(color.YCBCR_FROM_RGB, dtype=torch.float32).double().flatten()
    inv = torch.tensor(color.RGB_FROM_YCBCR, dtype=torch.float64).flatten()
    return torch.cat([fwd, inv]).to(device)


@dataclass
class TailWorkspace:
    """Buffers of the Triton step tail for one (B, H, W) and device, allocated once and reused every step.

    Nothing is allocated inside a step: with the state, these make the tail's memory static (what CUDA-graph
    capture needs). ``x_prev`` and ``x0`` exist for the sampler's step (``rgb=True``), ``F`` for the EM step alone.
    """

    shape: tuple[int, int, int, int]  # (B, 1, H, W) of the EM planes
    device: torch.device
    tiles: TileConfig
    n_tiles_w: int  # tiles per image row
    n_tiles: int  # tiles per image
    numerator: torch.Tensor  # (B, 1, H, W) float32: Eq. 25's numerator in space (kernel A)
    spectrum: torch.Tensor  # (B, 1, H, W//2 + 1) complex64: its rfft2, divided in place by ``denom``
    denom: torch.Tensor  # (H, W//2 + 1) float32: 1 + |K1|^2 + |K2|^2 on the rfft2 half spectrum
    partials: torch.Tensor  # (B, n_tiles, 2) float64: kernel A's per-tile tau sums
    colour: torch.Tensor  # (18,) float64: the colour matrices
    x_prev: Optional[torch.Tensor]  # (B, 3, H, W) float32: the step's output x_{t-1}
    x0: Optional[torch.Tensor]  # (B, 3, H, W) float32: the rectified x0'
    F: Optional[torch.Tensor]  # (B, 1, H, W) float32: the EM step's fused luminance

    @classmethod
    def create(cls, I: torch.Tensor, *, rgb: bool = True,  # noqa: E741
               tiles: Optional[TileConfig] = None) -> "TailWorkspace":
        """Buffers for sources shaped like ``I`` (B, 1, H, W) on its device; ``rgb`` for the sampler's step."""
        B, _, H, W = I.shape
        dev = I.device
        tiles = tiles or default_tiles(dev, H, W)
        n_tiles_w = triton.cdiv(W, tiles.block_w)
        n_tiles = triton.cdiv(H, tiles.block_h) * n_tiles_w
        k1, k2 = difference_otfs(H, W, dev)
        # (1 + K1sq) + K2sq in the official order (EMState.tv_denom); its imaginary part is exactly zero.
        denom = ((1 + torch.conj(k1) * k1) + torch.conj(k2) * k2).real[:, : W // 2 + 1].contiguous()
        f32 = dict(dtype=torch.float32, device=dev)
        return cls(
            shape=(B, 1, H, W), device=dev, tiles=tiles, n_tiles_w=n_tiles_w, n_tiles=n_tiles,
            numerator=torch.empty(B, 1, H, W, **f32),
            spectrum=torch.empty(B, 1, H, W // 2 + 1, dtype=torch.complex64, device=dev),
            denom=denom,
            partials=torch.zeros(B, n_tiles, 2, dtype=torch.float64, device=dev),
            colour=_colour_constants(dev),
            x_prev=torch.empty(B, 3, H, W, **f32) if rgb else None,
            x0=torch.empty(B, 3, H, W, **f32) if rgb else None,
            F=None if rgb else torch.empty(B, 1, H, W, **f32),
        )

    def matches(self, I: torch.Tensor, rgb: bool) -> bool:  # noqa: E741
        """True when this workspace fits sources shaped like ``I`` and the step kind."""
        return (self.shape == tuple(I.shape) and self.device == I.device
                and (self.x_prev is not None if rgb else self.F is not None))


# ------------------------------------------------------------------------------------------------ launchers


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, channel, row, column) strides of an NCHW tensor, in elements."""
    return tuple(t.stride())  # type: ignore[return-value]


def _plane_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, row, column) strides of a (B, 1, H, W) tensor: its single channel needs none."""
    sb, _, sh, sw = t.stride()
    return sb, sh, sw


def _launch_pre(src, eps, coef, I, V, state: EMState, ws: TailWorkspace, *,  # noqa: E741
                clip: bool, from_rgb: bool) -> None:
    """Kernel A over a (tiles, B) grid."""
    B, _, H, W = ws.shape
    cfg = ws.tiles
    eps = eps if eps is not None else src
    coef = coef if coef is not None else ws.colour
    _em_pre_kernel[(ws.n_tiles, B)](
        src, *_strides4(src), eps, *_strides4(eps), coef, coef.stride(0), ws.colour,
        I, *_plane_strides(I), V, *_plane_strides(V),
        state.F1, state.F2, state.tau_a, state.tau_b, ws.numerator, ws.partials,
        H, W, ws.n_tiles_w, ws.n_tiles,
        CLIP=clip, FROM_RGB=from_rgb, BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w,
        num_warps=cfg.warps_pre, enable_fp_fusion=False,
    )


def _launch_fft(state: EMState, ws: TailWorkspace) -> None:
    """Eq. 25 in the Fourier domain: H = irfft2(rfft2(N) / (1 + |K1|^2 + |K2|^2)), into the state's H."""
    H, W = ws.shape[-2:]
    torch.fft.rfft2(ws.numerator, out=ws.spectrum)
    ws.spectrum.div_(ws.denom)
    torch.fft.irfft2(ws.spectrum, s=(H, W), out=state.H)


def _launch_post(src, eps, coef, I, V, state: EMState, ws: TailWorkspace, out, x0, *, clip: bool,  # noqa: E741
                 from_rgb: bool, shrink: float, rho: float, kappa: float, soft: bool) -> None:
    """Kernel B over the same (tiles, B) grid as kernel A."""
    B, _, H, W = ws.shape
    cfg = ws.tiles
    eps = eps if eps is not None else src
    coef = coef if coef is not None else ws.colour
    x0 = x0 if x0 is not None else out
    _em_post_kernel[(ws.n_tiles, B)](
        state.H, src, *_strides4(src), eps, *_strides4(eps), coef, coef.stride(0), ws.colour,
        I, *_plane_strides(I), V, *_plane_strides(V),
        state.tau_a, state.tau_b, state.C, state.D, state.F1, state.F2, out, x0,
        shrink, rho, kappa, H, W, ws.n_tiles_w,
        CLIP=clip, FROM_RGB=from_rgb, SOFT=soft, BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w,
        num_warps=cfg.warps_post, enable_fp_fusion=False,
    )


def _launch_tau_finish(state: EMState, ws: TailWorkspace, tau_reduce: TauReduce) -> None:
    """Kernel C: one program per image ("image") or one for the whole batch ("batch")."""
    B, _, H, W = ws.shape
    if tau_reduce == "batch":
        grid, seg_len, n_out, count = 1, B * ws.n_tiles, B, B * H * W
    else:
        grid, seg_len, n_out, count = B, ws.n_tiles, 1, H * W
    block = max(16, min(1024, triton.next_power_of_2(max(seg_len, n_out))))
    _tau_finish_kernel[(grid,)](ws.partials, state.tau_a, state.tau_b, seg_len, n_out, count,
                                SEG_ITERS=triton.cdiv(seg_len, block), OUT_ITERS=triton.cdiv(n_out, block),
                                BLOCK=block, num_warps=1 if block <= 256 else 4, enable_fp_fusion=False)


# ------------------------------------------------------------------------------------------ public functions


def _check_plane(t: torch.Tensor, name: str, shape: tuple, device: torch.device) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: the Triton step tail runs in float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all inputs on one device)")


def _check_state(state: EMState, shape: tuple, device: torch.device) -> None:
    for name in ("C", "D", "F1", "F2", "H", "tau_a", "tau_b"):
        t = getattr(state, name)
        want = shape if name not in ("tau_a", "tau_b") else (shape[0], 1, 1, 1)
        _check_plane(t, f"state.{name}", want, device)
        if not t.is_contiguous():
            raise ValueError(
                f"state.{name} must be contiguous for the Triton tail; em_init(I) keeps the memory layout of a "
                "permuted I, so build the state from I.contiguous()")


def _prepare(I, V, state, workspace, rgb: bool) -> TailWorkspace:  # noqa: E741
    if I.ndim != 4 or I.shape[1] != 1:
        raise ValueError(f"I: expected a (B, 1, H, W) tensor, got shape {tuple(I.shape)}")
    if I.shape[-2] < 2 or I.shape[-1] < 2:
        raise ValueError(
            f"I: the EM step needs at least 2 pixels on each axis, got {I.shape[-2]}x{I.shape[-1]} (H x W)")
    _check_plane(I, "I", I.shape, I.device)
    _check_plane(V, "V", I.shape, I.device)
    _check_state(state, tuple(I.shape), I.device)
    if workspace is None:
        return TailWorkspace.create(I, rgb=rgb)
    if not workspace.matches(I, rgb):
        raise ValueError(
            f"workspace was made for {workspace.shape} on {workspace.device} "
            f"({'step' if workspace.x_prev is not None else 'EM-only'}), but the inputs are {tuple(I.shape)} on "
            f"{I.device} ({'step' if rgb else 'EM-only'}); make one with TailWorkspace.create(I, rgb={rgb})")
    return workspace


def _tv_args(lamb: float, rho: float, tv_prox: TVProx, tv_threshold: Optional[float]) -> dict:
    kappa = resolve_tv_prox(tv_prox, tv_threshold)
    # The shrink factor in double precision from Python floats, then float32 (as the official code applies it).
    return dict(shrink=float(rho) / (2 * float(lamb) + float(rho)), rho=float(rho),
                kappa=0.0 if kappa is None else float(kappa), soft=tv_prox == "soft")


def _check_tau_reduce(tau_reduce: str) -> None:
    if tau_reduce not in ("batch", "image"):
        raise ValueError(f"tau_reduce must be 'batch' or 'image', got {tau_reduce!r}")


def step_tail_triton(
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
    workspace: Optional[TailWorkspace] = None,
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything of a DDFM step after the UNet, fused (the Triton twin of ``step_tail_torch``).

    Args:
        x_t: the step's input (B, 3, H, W) float32, any strides.
        eps: the UNet's noise prediction (B, 3, H, W) float32, any strides (e.g. ``model(x)[:, :3]``).
        coef: one row of :class:`~ddfm_fast.schedule.StepTable` (c1, c2, sqrt(ac_prev), sqrt(1 - ac_prev)), on
            the device: read by the kernels, never by the host.
        I, V: the sources (B, 1, H, W) float32 in [-1, 1], any strides.
        state: the EM state (:func:`~ddfm_fast.em.em_init`), updated in place.
        lamb, rho, tau_reduce, clip_denoised, tv_prox, tv_threshold: as in ``step_tail_torch``.
        workspace: buffers from ``TailWorkspace.create(I)``; made on the fly when None (allocates).
        out: where x_{t-1} goes, a contiguous (B, 3, H, W) float32 tensor; it may be ``x_t`` itself. Default:
            ``workspace.x_prev``.

    Returns:
        ``(x_prev, x0)``, views of ``out`` (or ``workspace.x_prev``) and ``workspace.x0``: they are overwritten
        by the next call with the same workspace; clone them to keep them.
    """
    _check_tau_reduce(tau_reduce)
    tv = _tv_args(lamb, rho, tv_prox, tv_threshold)
    ws = _prepare(I, V, state, workspace, rgb=True)
    rgb_shape = (I.shape[0], 3, *I.shape[-2:])
    _check_plane(x_t, "x_t", rgb_shape, I.device)
    _check_plane(eps, "eps", rgb_shape, I.device)
    if coef.ndim != 1 or coef.shape[0] < 4 or coef.dtype != torch.float32 or coef.device != I.device:
        raise ValueError(f"coef must be one float32 StepTable row (4,) on {I.device}, got {tuple(coef.shape)} "
                         f"{coef.dtype} on {coef.device}")
    out = ws.x_prev if out is None else out
    _check_plane(out, "out", rgb_shape, I.device)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    _launch_pre(x_t, eps, coef, I, V, state, ws, clip=clip_denoised, from_rgb=True)
    _launch_fft(state, ws)
    _launch_post(x_t, eps, coef, I, V, state, ws, out, ws.x0, clip=clip_denoised, from_rgb=True, **tv)
    _launch_tau_finish(state, ws, tau_reduce)
    return out, ws.x0


def em_step_triton(
    f_pre: torch.Tensor,
    I: torch.Tensor,  # noqa: E741
    V: torch.Tensor,
    state: EMState,
    lamb: float = 0.5,
    rho: float = 0.001,
    tau_reduce: TauReduce = "batch",
    *,
    tv_prox: TVProx = "shrink",
    tv_threshold: Optional[float] = None,
    workspace: Optional[TailWorkspace] = None,
) -> tuple[torch.Tensor, EMState]:
    """The EM step alone with the same kernels (the Triton twin of ``ddfm_fast.em.em_step``).

    Returns ``(F, state)``; F is ``workspace.F`` (overwritten by the next call with that workspace), or a new
    tensor when no workspace is given.
    """
    _check_tau_reduce(tau_reduce)
    tv = _tv_args(lamb, rho, tv_prox, tv_threshold)
    ws = _prepare(I, V, state, workspace, rgb=False)
    _check_plane(f_pre, "f_pre", tuple(I.shape), I.device)
    _launch_pre(f_pre, None, None, I, V, state, ws, clip=False, from_rgb=False)
    _launch_fft(state, ws)
    _launch_post(f_pre, None, None, I, V, state, ws, ws.F, None, clip=False, from_rgb=False, **tv)
    _launch_tau_finish(state, ws, tau_reduce)
    return ws.F, state
