"""Image-fusion quality metrics, exactly as the community's evaluator computes them.

The fusion literature (DDFM's tables included) scores fused images with the Python evaluator published with
CDDFuse (``utils/Evaluator.py`` of Zhaozixiang1228/MMIF-CDDFuse), whose VIF and Qabf are ports of the MATLAB
``vifp_mscale.m`` / ``analysis_Qabf.m``. This module re-implements those twelve metrics, quirks included
(shared/docs/METRICS.md is the specification), vectorised with numpy: no scipy, scikit-image, scikit-learn or
OpenCV. A 640x480 triple is scored in well under a second on one CPU core (bench/test_bench_metrics.py).

Notation: A = infrared image (IVF) or CT / PET / SPECT (MIF), B = visible image (IVF) or MRI (MIF),
F = fused image; all 2-D, same shape, grey levels on the 0..255 scale.

Numerics. Inputs are cast to float32, as the evaluator's reader produces them. Where the evaluator computes in
float32 (SD, SF, AG, SCD, CC, MSE, PSNR, Qabf, SSIM) the same float32 operations are done here, so results
agree to the last bit or nearly (< 3e-7 relative on all dev pairs of shared/data). SSIM with data_range = 2 is
where this matters most: C2 = 0.0036 is below the float32 rounding of E[x^2] for bright pixels (ulp ~ 0.004),
so in near-flat bright regions float32 and exact SSIM differ a lot (0.064 vs 0.037 on a constructed image,
though only ~4e-6 on the dev images). VIF is float64 in the evaluator and here (its ``E[x^2] - E[x]^2`` needs
it); MI and EN are float64 too.

Degenerate inputs give numbers, never NaN warnings; where the evaluator would divide 0 by 0 this module
returns a documented value instead (see each function): correlations with a constant signal are 0,
Qabf without any source gradient is 0, VIF without any source variance is 1 (the evaluator's own choice),
PSNR of an exact match is +inf. (SSIM keeps scikit-image's float32 arithmetic, whose denominator could in
principle round to exactly 0 in flat bright regions with L = 2; that would give inf there too.)

Image size. EN and SD take any non-empty image; the other metrics need at least 2 pixels per axis, so
1-pixel-wide images are rejected; SSIM needs 7 (its window); VIF needs 65, the smallest size for which all
four scales of its pyramid still hold a 'valid' window (see ``VIF_MIN_SIZE``); ``evaluate`` therefore needs
65x65. Smaller images are rejected with a ValueError rather than scored with a silently broken pyramid (the
evaluator's scipy ``convolve2d`` swaps its arguments there and returns garbage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from os import PathLike
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ddfm_fast.io import ImageReadError, gray_bgr2gray

__all__ = [
    "METRIC_NAMES",
    "MIN_SIZE",
    "SSIM_MIN_SIZE",
    "VARIANTS",
    "VIF_MIN_SIZE",
    "ImageReadError",
    "MetricVariant",
    "average_gradient",
    "correlation",
    "entropy",
    "evaluate",
    "mse",
    "mutual_information",
    "psnr",
    "qabf",
    "read_gray_eval",
    "resolve_variant",
    "scd",
    "spatial_frequency",
    "ssim",
    "std",
    "structural_similarity",
    "vif",
]

METRIC_NAMES = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "CC", "MSE", "PSNR")

MIN_SIZE = 2  # differences (SF, AG, Sobel) need two pixels per axis
SSIM_MIN_SIZE = 7  # the 7x7 window
# VIF: scale s filters with an N_s = 17, 9, 5, 3 window; for s > 1 the previous scale is first filtered
# ('valid', N_s) and subsampled by 2. Sizes per axis: n1 = H, n_s = ceil((n_{s-1} - N_s + 1) / 2), and each
# scale needs n_s >= N_s. Working backwards: n4 >= 3 -> n3 >= 9 -> n2 >= 25 -> H >= 65.
VIF_MIN_SIZE = 65


# --------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class MetricVariant:
    """Where toolboxes disagree. The default preset, ``cddfuse``, is the CDDFuse evaluator (the paper's numbers).

    mi_base: logarithm base of MI, ``math.e`` (sklearn, CDDFuse) or 2 (MATLAB toolboxes).
    ssim_data_range: L in C1 = (0.01 L)^2, C2 = (0.03 L)^2; 2 is what scikit-image <= 0.19 silently used for
        float32 input (the evaluator's), 255 the textbook value for 8-bit images.
    ssim_reduce: "sum" (SSIM(F,A) + SSIM(F,B), CDDFuse, VIFB) or "mean" (their average, Tang et al.).
    psnr_peak: "max" (max(F), CDDFuse) or a number (255: Tang et al.).
    ag_norm: "pixels" (mean over all r*c pixels, CDDFuse) or "interior" (sum / ((r-1)(c-1)), Tang et al.).
    sf_norm: "pairs" (each squared-difference mean over its own count, CDDFuse) or "pixels" (both sums over
        r*c, VIFB).
    """

    name: str
    mi_base: float = math.e
    ssim_data_range: float = 2.0
    ssim_reduce: Literal["sum", "mean"] = "sum"
    psnr_peak: Literal["max"] | float = "max"
    ag_norm: Literal["pixels", "interior"] = "pixels"
    sf_norm: Literal["pairs", "pixels"] = "pairs"


# Only the differences METRICS.md documents are encoded; everything else in a preset stays the CDDFuse
# definition (e.g. Tang's toolbox computes SSIM with its own MATLAB code, which is not reproduced here).
VARIANTS: dict[str, MetricVariant] = {
    "cddfuse": MetricVariant("cddfuse"),
    "tang_matlab": MetricVariant("tang_matlab", mi_base=2.0, ssim_reduce="mean", psnr_peak=255.0, ag_norm="interior"),
    "vifb": MetricVariant("vifb", ssim_data_range=255.0, sf_norm="pixels"),
}


def resolve_variant(
    variant: str | MetricVariant = "cddfuse",
    *,
    mi_base: Literal["e"] | float | None = None,
    ssim_data_range: float | None = None,
    ssim_reduce: Literal["sum", "mean"] | None = None,
    psnr_peak: Literal["max"] | float | None = None,
    ag_norm: Literal["pixels", "interior"] | None = None,
    sf_norm: Literal["pairs", "pixels"] | None = None,
) -> MetricVariant:
    """A preset by name (``VARIANTS``) with the given options overriding it; ``mi_base="e"`` means ``math.e``."""
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f"unknown metric variant {variant!r}; choose one of {sorted(VARIANTS)}")
        variant = VARIANTS[variant]
    changes: dict[str, object] = {}
    if mi_base is not None:
        changes["mi_base"] = _log_base(mi_base)
    if ssim_data_range is not None:
        changes["ssim_data_range"] = _positive(ssim_data_range, "ssim_data_range")
    if ssim_reduce is not None:
        changes["ssim_reduce"] = _choice(ssim_reduce, ("sum", "mean"), "ssim_reduce")
    if psnr_peak is not None:
        changes["psnr_peak"] = psnr_peak if psnr_peak == "max" else _positive(psnr_peak, "psnr_peak")
    if ag_norm is not None:
        changes["ag_norm"] = _choice(ag_norm, ("pixels", "interior"), "ag_norm")
    if sf_norm is not None:
        changes["sf_norm"] = _choice(sf_norm, ("pairs", "pixels"), "sf_norm")
    if changes:
        variant = replace(variant, name=f"{variant.name}+custom", **changes)
    return variant


def _log_base(base: Literal["e"] | float) -> float:
    if base == "e":
        return math.e
    value = _positive(base, "mi_base")
    if value == 1.0:
        raise ValueError("mi_base must not be 1")
    return value


def _positive(value: object, what: str) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number, got {value!r}") from None
    if not (out > 0 and math.isfinite(out)):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return out


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return value


# -------------------------------------------------------------------------------------------------- validation
def _as_image(x: object, name: str) -> np.ndarray:
    """A finite 2-D float32 copy-or-view of ``x`` (the evaluator's images are float32)."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) grey image, got shape {arr.shape}; convert colour images "
                         "to grey first (read_gray_eval does it the evaluator's way)")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values (after casting to float32)")
    return arr


def _check_size(shape: tuple[int, ...], min_size: int, why: str) -> None:
    if min(shape) < min_size:
        raise ValueError(f"image of shape {shape} is too small: {why} needs at least {min_size}x{min_size} pixels")


def _single(img: object, min_size: int = MIN_SIZE, why: str = "this metric") -> np.ndarray:
    f = _as_image(img, "the image")
    _check_size(f.shape, min_size, why)
    return f


def _triple(
    fused: object, a: object, b: object, min_size: int = MIN_SIZE, why: str = "this metric"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = _as_image(fused, "fused image F")
    ia = _as_image(a, "source A (infrared / functional)")
    ib = _as_image(b, "source B (visible / MRI)")
    if not (f.shape == ia.shape == ib.shape):
        raise ValueError(f"shape mismatch: F {f.shape}, A {ia.shape}, B {ib.shape}; all three must be equal")
    _check_size(f.shape, min_size, why)
    return f, ia, ib


# ------------------------------------------------------------------------------------------ single-image metrics
def _entropy(f: np.ndarray) -> float:
    # The evaluator casts np.uint8(np.round(F)); out-of-range values would wrap there, so they are clipped here.
    q = np.clip(np.round(f), 0, 255).astype(np.uint8)
    p = np.bincount(q.ravel(), minlength=256) / q.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 (constant image) into 0.0


def entropy(img: object) -> float:
    """EN: Shannon entropy in bits of the 256-bin histogram of uint8(round(F)), EN = -sum p log2 p over p > 0.

    Values outside 0..255 are clipped before binning. A constant image gives 0.
    """
    return _entropy(_single(img, 1))


def std(img: object) -> float:
    """SD: population standard deviation (ddof = 0) of F, computed in float32 as the evaluator does."""
    return float(np.std(_single(img, 1)))


def _sf(f: np.ndarray, norm: str = "pairs") -> float:
    dx2 = (f[:, 1:] - f[:, :-1]) ** 2
    dy2 = (f[1:, :] - f[:-1, :]) ** 2
    if norm == "pairs":
        return float(np.sqrt(np.mean(dx2) + np.mean(dy2)))
    return float(np.sqrt((np.sum(dx2, dtype=np.float64) + np.sum(dy2, dtype=np.float64)) / f.size))


def spatial_frequency(img: object, *, norm: Literal["pairs", "pixels"] = "pairs") -> float:
    """SF = sqrt(RF^2 + CF^2), RF^2 = mean((F[:, 1:] - F[:, :-1])^2), CF^2 = mean((F[1:, :] - F[:-1, :])^2).

    ``norm="pixels"`` divides both sums by r*c instead (VIFB). float32 like the evaluator.
    """
    return _sf(_single(img), _choice(norm, ("pairs", "pixels"), "norm"))


def _ag(f: np.ndarray, norm: str = "pixels") -> float:
    # np.gradient's scheme: central differences inside, one-sided on the borders, step 1.
    gx = np.empty_like(f)
    gy = np.empty_like(f)
    gx[:, 0] = f[:, 1] - f[:, 0]
    gx[:, -1] = f[:, -1] - f[:, -2]
    gx[:, 1:-1] = (f[:, 2:] - f[:, :-2]) / 2
    gy[0, :] = f[1, :] - f[0, :]
    gy[-1, :] = f[-1, :] - f[-2, :]
    gy[1:-1, :] = (f[2:, :] - f[:-2, :]) / 2
    s = np.sqrt((gx**2 + gy**2) / 2)
    if norm == "pixels":
        return float(np.mean(s))
    r, c = f.shape
    return float(np.sum(s, dtype=np.float64) / ((r - 1) * (c - 1)))


def average_gradient(img: object, *, norm: Literal["pixels", "interior"] = "pixels") -> float:
    """AG = mean over all pixels of sqrt((Gx^2 + Gy^2) / 2).

    Gx = (F[:, j+1] - F[:, j-1]) / 2 inside, forward difference in the first column, backward in the last;
    Gy likewise along rows. ``norm="interior"`` divides the sum by (r-1)(c-1) instead (Tang et al.'s MATLAB).
    """
    return _ag(_single(img), _choice(norm, ("pixels", "interior"), "norm"))


# ---------------------------------------------------------------------------------- correlations, MSE, PSNR
def _corr(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation in float32 (the evaluator's expression); 0.0 if either signal is constant.

    The evaluator returns NaN (0/0) there; a constant signal carries no linear relation, so 0 is returned.
    The test is on the values themselves, because float32 means of constant images need not be exact.
    """
    if x.min() == x.max() or y.min() == y.max():
        return 0.0
    dx = x - np.mean(x)
    dy = y - np.mean(y)
    den = np.sqrt(np.sum(dx**2) * np.sum(dy**2))
    if not den > 0:  # float32 underflow of a nearly constant signal
        return 0.0
    return float(np.sum(dx * dy) / den)


def _correlation(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return (_corr(a, f) + _corr(b, f)) / 2


def correlation(fused: object, a: object, b: object) -> float:
    """CC = (corr(A, F) + corr(B, F)) / 2, Pearson over all pixels (float32 as in the evaluator).

    A correlation with a constant image counts as 0 (the evaluator gives NaN).
    """
    return _correlation(*_triple(fused, a, b))


def _scd(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return _corr(a, f - b) + _corr(b, f - a)


def scd(fused: object, a: object, b: object) -> float:
    """SCD = corr(A, F - B) + corr(B, F - A), the sum of the correlations of differences (Aslantas & Bendes 2015).

    A term whose signals include a constant (e.g. F == B makes F - B constant) counts as 0 (the evaluator: NaN).
    """
    return _scd(*_triple(fused, a, b))


def _mse(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2)


def mse(fused: object, a: object, b: object) -> float:
    """MSE = (mean((A - F)^2) + mean((B - F)^2)) / 2 on the 0..255 scale (float32 as in the evaluator)."""
    return _mse(*_triple(fused, a, b))


def _psnr(f: np.ndarray, a: np.ndarray, b: np.ndarray, peak: str | float = "max") -> float:
    m = _mse(f, a, b)
    if m == 0:
        return math.inf
    p = float(np.max(f)) if peak == "max" else float(peak)
    if p == 0:
        return -math.inf
    return 10.0 * math.log10(p * p / m)


def psnr(fused: object, a: object, b: object, *, peak: Literal["max"] | float = "max") -> float:
    """PSNR = 10 log10(peak^2 / MSE) with peak = max(F) (the evaluator's quirk, not 255) unless given.

    +inf when MSE = 0 (F equals both sources); -inf when the peak is 0 (F all zero) and MSE > 0.
    """
    if peak != "max":
        peak = _positive(peak, "peak")
    return _psnr(*_triple(fused, a, b), peak)


# ------------------------------------------------------------------------------------------- mutual information
def _labels(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer labels 0..n-1 of the distinct values of x, and n (sklearn treats each value as a cluster)."""
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 65536 and np.array_equal(x, np.round(x)):  # grey levels: label by value, no sort needed
        lab = (x - lo).astype(np.intp).ravel()
        return lab, int(hi - lo) + 1
    _, inv = np.unique(x.ravel(), return_inverse=True)
    return inv.ravel(), int(inv.max()) + 1


def _mi_pair(x: np.ndarray, y: np.ndarray) -> float:
    """sklearn.metrics.mutual_info_score(x.ravel(), y.ravel()) in nats, same formula and clipping."""
    lx, nx = _labels(x)
    ly, ny = _labels(y)
    if nx * ny <= (1 << 24):
        joint = np.bincount(lx * ny + ly, minlength=nx * ny).reshape(nx, ny)
    else:  # many distinct float values: count only the occupied cells
        cells, counts = np.unique(lx.astype(np.int64) * ny + ly, return_counts=True)
        joint = None
    if joint is not None:
        pi, pj = joint.sum(axis=1), joint.sum(axis=0)
        nzx, nzy = np.nonzero(joint)
        nz = joint[nzx, nzy]
    else:
        nzx, nzy = np.divmod(cells, ny)
        nz = counts
        pi, pj = np.bincount(nzx, counts, nx), np.bincount(nzy, counts, ny)
    # sklearn's marginals only contain labels that occur; a single occupied label means MI = 0.
    if np.count_nonzero(pi) <= 1 or np.count_nonzero(pj) <= 1:
        return 0.0
    total = float(nz.sum())
    nm = nz / total
    outer = pi[nzx].astype(np.int64) * pj[nzy].astype(np.int64)
    log_outer = -np.log(outer) + math.log(total) + math.log(total)  # sklearn's order of additions
    mi = nm * (np.log(nz) - math.log(total)) + nm * log_outer
    mi = np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi)
    return float(max(mi.sum(), 0.0))


def _mi(f: np.ndarray, a: np.ndarray, b: np.ndarray, base: float = math.e) -> float:
    return (_mi_pair(f, a) + _mi_pair(f, b)) / math.log(base)


def mutual_information(fused: object, a: object, b: object, *, base: Literal["e"] | float = "e") -> float:
    """MI = MI(F, A) + MI(F, B), MI(X, Y) = sum p(x, y) log(p(x, y) / (p(x) p(y))) over the joint histogram of
    the distinct values (integer grey levels for 8-bit images; sklearn's ``mutual_info_score``).

    Natural log by default (the evaluator); ``base=2`` gives the MATLAB toolboxes' bits (x 1.4427).
    A constant image gives 0.
    """
    return _mi(*_triple(fused, a, b), _log_base(base))


# ---------------------------------------------------------------------------------- separable 'valid' filtering
def _band(w: np.ndarray, n_out: int, step: int) -> np.ndarray:
    """Matrix M (n_out, span) with M[i, i*step : i*step + len(w)] = w: n_out outputs of a strided correlation."""
    n = len(w)
    span = (n_out - 1) * step + n
    m = np.zeros((n_out, span))
    rows = np.repeat(np.arange(n_out), n)
    cols = (np.arange(n_out)[:, None] * step + np.arange(n)).ravel()
    m[rows, cols] = np.tile(w, n_out)
    return m


def _block(n: int, step: int) -> int:
    # Outputs per matmul block: big enough for BLAS, small enough that the band's zeros cost little.
    # Measured on (8, 480, 640) float64 maps, 17 taps, one core: 16-24 outputs ~7 ms per pass, 64 ~11-20 ms,
    # 17 shifted whole-array multiply-adds ~20 ms.
    return 16 if n <= 9 or step > 1 else 24


def _correlate_rows(x: np.ndarray, w: np.ndarray, step: int = 1) -> np.ndarray:
    """'valid' correlation of each column of x (..., H, W) with w, keeping every step-th output row.

    Done as a banded matrix product per block of output rows (BLAS), ~2x faster than shifted adds.
    """
    x = np.ascontiguousarray(x)
    n, h = len(w), x.shape[-2]
    n_out = (h - n) // step + 1
    b = min(_block(n, step), n_out)
    nb = n_out // b
    m = _band(w, b, step)
    out = np.empty(x.shape[:-2] + (n_out, x.shape[-1]))
    st = x.strides
    view = as_strided(x, x.shape[:-2] + (nb, m.shape[1], x.shape[-1]), st[:-2] + (b * step * st[-2], st[-2], st[-1]),
                      writeable=False)
    out[..., : nb * b, :] = np.matmul(m, view).reshape(x.shape[:-2] + (nb * b, x.shape[-1]))
    r = n_out - nb * b
    if r:
        start = nb * b * step
        mr = m[:r, : (r - 1) * step + n]
        out[..., nb * b :, :] = np.matmul(mr, x[..., start : start + mr.shape[1], :])
    return out


def _correlate_cols(x: np.ndarray, w: np.ndarray, step: int = 1) -> np.ndarray:
    """'valid' correlation of each row of x (..., H, W) with w, keeping every step-th output column."""
    x = np.ascontiguousarray(x)
    lead, wid = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, wid)
    n = len(w)
    n_out = (wid - n) // step + 1
    b = min(_block(n, step), n_out)
    nb = n_out // b
    mt = np.ascontiguousarray(_band(w, b, step).T)
    out = np.empty((x2.shape[0], n_out))
    st = x2.strides
    # Block j is the (rows, span) sub-matrix starting at column j*b*step: a BLAS-compatible strided view.
    view = as_strided(x2, (nb, x2.shape[0], mt.shape[0]), (b * step * st[1], st[0], st[1]), writeable=False)
    np.matmul(view, mt, out=out[:, : nb * b].reshape(x2.shape[0], nb, b).transpose(1, 0, 2))
    r = n_out - nb * b
    if r:
        start = nb * b * step
        span = (r - 1) * step + n
        out[:, nb * b :] = x2[:, start : start + span] @ mt[:span, :r]
    return out.reshape(lead + (n_out,))


def _filter2_valid(x: np.ndarray, w: np.ndarray, step: int = 1) -> np.ndarray:
    """2-D 'valid' correlation with the separable window outer(w, w), subsampled by ``step`` on both axes."""
    return _correlate_cols(_correlate_rows(x, w, step), w, step)


# ------------------------------------------------------------------------------------------------------- VIF
def _vif_window(n: int) -> np.ndarray:
    """1-D factor of MATLAB's fspecial('gaussian', n, n/5), normalised.

    exp(-(x^2 + y^2) / 2s^2) = exp(-x^2 / 2s^2) exp(-y^2 / 2s^2), so the 2-D window is outer(w, w) up to
    rounding. fspecial zeroes entries below eps * max; the smallest entry (corner of the 17x17 window,
    exp(-128 / 23.12) ~ 4e-3) is far above that, so the threshold never applies and is not reproduced.
    """
    x = np.arange(n) - (n - 1) / 2
    g = np.exp(-(x * x) / (2 * (n / 5.0) ** 2))
    return g / g.sum()


def _vif(dist: np.ndarray, refs: Sequence[np.ndarray]) -> list[float]:
    """VIFp(ref, dist) for each ref, sharing the work on the distorted image (vifp_mscale.m, 4 scales)."""
    sigma_nsq, eps = 2.0, 1e-10
    k = len(refs)
    num, den = np.zeros(k), np.zeros(k)
    imgs = [*refs, dist]
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        w = _vif_window(n)
        if scale == 1:
            # The evaluator's images are float32 at scale 1, so its products ref*ref etc. are float32 too.
            prods = [r * r for r in refs] + [dist * dist] + [r * dist for r in refs]
            stack = np.stack(imgs + prods).astype(np.float64)
        else:
            # Filter, then keep rows and columns 0, 2, 4, ... (x[::2, ::2]): computed directly at those positions.
            down = _filter2_valid(np.stack(imgs), w, step=2)
            imgs = list(down)
            r_, d_ = down[:k], down[k]
            stack = np.concatenate([down, r_ * r_, (d_ * d_)[None], r_ * d_[None]])
        filt = _filter2_valid(stack, w)
        mu1, mu2 = filt[:k], filt[k]
        rr, dd, rd = filt[k + 1 : 2 * k + 1], filt[2 * k + 1], filt[2 * k + 2 :]
        sigma1_sq = np.maximum(rr - mu1 * mu1, 0.0)
        sigma2_sq = np.maximum(dd - mu2 * mu2, 0.0)
        sigma12 = rd - mu1 * mu2
        g = sigma12 / (sigma1_sq + eps)
        sv_sq = sigma2_sq - g * sigma12
        # The evaluator's masked assignments, in its order, are: where sigma1^2 < eps (low1) g = 0,
        # sv^2 = sigma2^2, sigma1^2 = 0; then where sigma2^2 < eps (low2) g = 0, sv^2 = 0; then where g < 0
        # (only possible outside low1 and low2, whose g is 0 by then) sv^2 = sigma2^2, g = 0. Folded:
        low1 = sigma1_sq < eps
        low2 = sigma2_sq < eps
        neg = g < 0
        sv_sq = np.where(low2, 0.0, np.where(low1 | neg, sigma2_sq, sv_sq))
        g = np.where(low1 | low2 | neg, 0.0, g)
        sigma1_sq = np.where(low1, 0.0, sigma1_sq)
        sv_sq = np.maximum(sv_sq, eps)
        num += np.log10(1 + g * g * sigma1_sq / (sv_sq + sigma_nsq)).sum(axis=(1, 2))
        den += np.log10(1 + sigma1_sq / sigma_nsq).sum(axis=(1, 2))
    # den = 0 (no source variance anywhere) forces num = 0; the evaluator maps that 0/0 = NaN to 1.
    return [float(nu / de) if de > 0 else 1.0 for nu, de in zip(num, den)]


def vif(fused: object, a: object, b: object) -> float:
    """VIF = VIFp(A, F) + VIFp(B, F), pixel-domain multiscale VIF (Sheikh & Bovik 2006, ``vifp_mscale.m``).

    Scales s = 1..4 use Gaussian windows N = 17, 9, 5, 3 (sigma = N/5) and 'valid' filtering; for s > 1 both
    images are first filtered with that window and subsampled by 2. With local statistics mu, sigma^2,
    sigma12 (negative variances clipped to 0), eps = 1e-10, sigma_n^2 = 2:
    g = sigma12 / (sigma1^2 + eps), sv^2 = sigma2^2 - g sigma12, then where sigma1^2 < eps: g = 0,
    sv^2 = sigma2^2, sigma1^2 = 0; where sigma2^2 < eps: g = 0, sv^2 = 0; where g < 0: sv^2 = sigma2^2, g = 0;
    sv^2 = max(sv^2, eps). VIFp = sum_s sum log10(1 + g^2 sigma1^2 / (sv^2 + sigma_n^2))
    / sum_s sum log10(1 + sigma1^2 / sigma_n^2), and 1 where that is 0/0 (a source without any variance).
    Needs at least ``VIF_MIN_SIZE`` (65) pixels per axis.
    """
    f, ia, ib = _triple(fused, a, b, VIF_MIN_SIZE, "VIF's 4-scale pyramid")
    return sum(_vif(f, [ia, ib]))


# ------------------------------------------------------------------------------------------------------ Qabf
def _sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edge strength g and orientation alpha from zero-padded 'same' Sobel *convolutions*, in float32.

    convolve2d(x, [[-1,0,1],[-2,0,2],[-1,0,1]]) = (left - right) smoothed [1,2,1] down the column, and
    convolve2d(x, [[1,2,1],[0,0,0],[-1,-2,-1]]) = (below - above) smoothed along the row.
    """
    p = np.pad(img, 1)
    dx = p[:, :-2] - p[:, 2:]
    sx = dx[:-2] + 2 * dx[1:-1] + dx[2:]
    dy = p[2:, :] - p[:-2, :]
    sy = dy[:, :-2] + 2 * dy[:, 1:-1] + dy[:, 2:]
    g = np.sqrt(sx * sx + sy * sy)
    zero = sx == 0
    ratio = np.divide(sy, sx, out=np.zeros_like(sy), where=~zero)
    alpha = np.where(zero, np.float32(math.pi / 2), np.arctan(ratio))
    return g, alpha


def _edge_preservation(g_s: np.ndarray, a_s: np.ndarray, g_f: np.ndarray, a_f: np.ndarray) -> np.ndarray:
    lo, hi = np.minimum(g_s, g_f), np.maximum(g_s, g_f)
    # gF/gA where gA > gF, gA/gF where gA < gF (both min/max), and the evaluator's quirk: gF where equal.
    ratio = np.divide(lo, hi, out=np.zeros_like(lo), where=hi > 0)
    g_sf = np.where(g_s == g_f, g_f, ratio)
    a_sf = 1 - np.abs(a_s - a_f) / (math.pi / 2)
    q_g = 0.9994 / (1 + np.exp(-15 * (g_sf - 0.5)))
    q_a = 0.9879 / (1 + np.exp(-22 * (a_sf - 0.8)))
    return q_g * q_a


def _qabf(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    g_a, a_a = _sobel(a)
    g_b, a_b = _sobel(b)
    g_f, a_f = _sobel(f)
    q_af = _edge_preservation(g_a, a_a, g_f, a_f)
    q_bf = _edge_preservation(g_b, a_b, g_f, a_f)
    den = np.sum(g_a + g_b, dtype=np.float64)
    if den == 0:  # no edge in either source: nothing to transfer (the evaluator divides 0 by 0)
        return 0.0
    return float(np.sum(q_af * g_a + q_bf * g_b, dtype=np.float64) / den)


def qabf(fused: object, a: object, b: object) -> float:
    """Qabf, Xydeas & Petrovic's gradient-based edge-transfer metric (``analysis_Qabf.m``), in float32.

    Sobel (zero-padded 'same' convolution) gives g = sqrt(Sx^2 + Sy^2) and alpha = arctan(Sy / Sx)
    (pi/2 where Sx = 0) for A, B, F. G_AF = min(gA, gF) / max(gA, gF), except gF where gA == gF (the quirk);
    A_AF = 1 - |alphaA - alphaF| / (pi/2); Q_AF = 0.9994 / (1 + e^(-15 (G_AF - 0.5)))
    * 0.9879 / (1 + e^(-22 (A_AF - 0.8))); likewise Q_BF. Qabf = sum(Q_AF gA + Q_BF gB) / sum(gA + gB),
    and 0 when both sources have no gradient at all (the evaluator: NaN).
    """
    return _qabf(*_triple(fused, a, b))


# ------------------------------------------------------------------------------------------------------ SSIM
def _box7_f32(x: np.ndarray) -> np.ndarray:
    """Interior of scipy.ndimage.uniform_filter(x, 7) for float32 x: a 7-mean down the columns rounded to
    float32, then a 7-mean along the rows rounded to float32 (scipy filters axis by axis into a float32 output,
    accumulating each line in double). Only the 'valid' part is computed: SSIM crops the border anyway.
    """
    x64 = x.astype(np.float64)
    h, w = x.shape
    t = x64[0 : h - 6].copy()
    for k in range(1, 7):  # 7 taps, not pixels: shifted whole-array adds
        t += x64[k : h - 6 + k]
    t = (t / 7).astype(np.float32).astype(np.float64)
    u = t[:, 0 : w - 6].copy()
    for k in range(1, 7):
        u += t[:, k : w - 6 + k]
    return (u / 7).astype(np.float32)


def _ssim_pairs(x: np.ndarray, ys: Sequence[np.ndarray], data_range: float) -> list[float]:
    """skimage.metrics.structural_similarity(x, y, data_range=R) for each y, in its float32 arithmetic."""
    ux, uxx = _box7_f32(x), _box7_f32(x * x)
    cov_norm = 49 / 48  # sample covariance, NP / (NP - 1)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    vx = cov_norm * (uxx - ux * ux)
    out = []
    for y in ys:
        uy, uyy, uxy = _box7_f32(y), _box7_f32(y * y), _box7_f32(x * y)
        vy = cov_norm * (uyy - uy * uy)
        vxy = cov_norm * (uxy - ux * uy)
        # Same expressions and evaluation order as scikit-image, so float32 rounding matches it.
        a1, a2, b1, b2 = (2 * ux * uy + c1, 2 * vxy + c2, ux**2 + uy**2 + c1, vx + vy + c2)
        with np.errstate(divide="ignore", invalid="ignore"):  # b2 can round to 0 exactly as in the evaluator
            s = (a1 * a2) / (b1 * b2)
        out.append(float(s.mean(dtype=np.float64)))
    return out


def structural_similarity(x: object, y: object, *, data_range: float = 255.0) -> float:
    """SSIM(x, y) as scikit-image's ``structural_similarity`` defaults compute it (Wang et al. 2004):

    7x7 uniform window, sample covariance (x 49/48), K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2, C2 = (K2 L)^2,
    S = (2 mux muy + C1)(2 sxy + C2) / ((mux^2 + muy^2 + C1)(sx^2 + sy^2 + C2)) averaged over the map
    without a 3-pixel border; float32 arithmetic. One pair, not summed. Needs at least 7x7 pixels.
    """
    ix = _as_image(x, "first image")
    iy = _as_image(y, "second image")
    if ix.shape != iy.shape:
        raise ValueError(f"shape mismatch: {ix.shape} vs {iy.shape}")
    _check_size(ix.shape, SSIM_MIN_SIZE, "SSIM's 7x7 window")
    return _ssim_pairs(ix, [iy], _positive(data_range, "data_range"))[0]


def _ssim(f: np.ndarray, a: np.ndarray, b: np.ndarray, data_range: float = 2.0, reduce: str = "sum") -> float:
    s_a, s_b = _ssim_pairs(f, [a, b], data_range)
    return s_a + s_b if reduce == "sum" else (s_a + s_b) / 2


def ssim(
    fused: object, a: object, b: object, *, data_range: float = 2.0, reduce: Literal["sum", "mean"] = "sum"
) -> float:
    """SSIM = SSIM(F, A) + SSIM(F, B) (a sum: up to 2), see ``structural_similarity``.

    data_range = 2 is the evaluator's (what scikit-image 0.19 silently used for float32 input); 255 is the
    textbook L for 8-bit images. ``reduce="mean"`` averages the two instead (Tang et al.).
    """
    f, ia, ib = _triple(fused, a, b, SSIM_MIN_SIZE, "SSIM's 7x7 window")
    return _ssim(f, ia, ib, _positive(data_range, "data_range"), _choice(reduce, ("sum", "mean"), "reduce"))


# -------------------------------------------------------------------------------------------------- evaluate
def evaluate(
    fused: object,
    a: object,
    b: object,
    *,
    variant: str | MetricVariant = "cddfuse",
    mi_base: Literal["e"] | float | None = None,
    ssim_data_range: float | None = None,
    ssim_reduce: Literal["sum", "mean"] | None = None,
    psnr_peak: Literal["max"] | float | None = None,
    ag_norm: Literal["pixels", "interior"] | None = None,
    sf_norm: Literal["pairs", "pixels"] | None = None,
) -> dict[str, float]:
    """All twelve metrics of one triple: {"EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "CC",
    "MSE", "PSNR"} -> float, in that order.

    fused, a, b: 2-D arrays on the 0..255 scale (A = infrared / functional, B = visible / MRI), same shape,
    at least 65x65 (VIF), finite. ``variant`` picks a preset of ``VARIANTS`` (default "cddfuse", the
    evaluator behind the published numbers); the keyword options override single choices of it.
    """
    opt = resolve_variant(variant, mi_base=mi_base, ssim_data_range=ssim_data_range, ssim_reduce=ssim_reduce,
                          psnr_peak=psnr_peak, ag_norm=ag_norm, sf_norm=sf_norm)
    f, ia, ib = _triple(fused, a, b, VIF_MIN_SIZE, "evaluate (VIF's 4-scale pyramid)")
    return {
        "EN": _entropy(f),
        "SD": float(np.std(f)),
        "SF": _sf(f, opt.sf_norm),
        "AG": _ag(f, opt.ag_norm),
        "MI": _mi(f, ia, ib, opt.mi_base),
        "SCD": _scd(f, ia, ib),
        "VIF": sum(_vif(f, [ia, ib])),
        "Qabf": _qabf(f, ia, ib),
        "SSIM": _ssim(f, ia, ib, opt.ssim_data_range, opt.ssim_reduce),
        "CC": _correlation(f, ia, ib),
        "MSE": _mse(f, ia, ib),
        "PSNR": _psnr(f, ia, ib, opt.psnr_peak),
    }


# ------------------------------------------------------------------------------------------------- reading
def _gray_y(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's float32 BGR2GRAY (bitwise, ``io.gray_bgr2gray``), rounded half to even as the evaluator does.

    The rounding order matters only at exact .5 ties, but those exist (299 R + 587 G + 114 B = 1000 k + 500);
    checked against cv2 4.14 and 5.0 on all 492 images of shared/data: same rounded grey.
    """
    return np.round(gray_bgr2gray(rgb.astype(np.float32)))


def read_gray_eval(path: str | PathLike[str]) -> np.ndarray:
    """Read an image as the evaluator's ``image_read_cv2(path, "GRAY")``: float32 grey levels 0..255.

    Decoded by :func:`ddfm_fast.io.open_image` (the same checks as every input: the pixel cap read from the
    header, one frame only, odd files refused with a one-line :class:`ImageReadError` naming the file; EXIF
    orientation applied as cv2.imread does), then to 8 bits as OpenCV does (16-bit data keeps its high byte),
    then Y = 0.299 R + 0.587 G + 0.114 B in float32 (OpenCV's order of operations), rounded half to even. Grey
    files give their values unchanged (R = G = B = v gives Y within 2e-5 of v, which rounds back to v).
    """
    from ddfm_fast.io import open_image

    pixels = open_image(path).pixels
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    if pixels.ndim == 2:
        return pixels.astype(np.float32)
    return _gray_y(pixels)
