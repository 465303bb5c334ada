"""ddfm_fast.metrics against the CDDFuse evaluator's numbers (shared/docs/METRICS.md) and its quirks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddfm_fast import metrics as M
from ddfm_fast.metrics import METRIC_NAMES, evaluate, read_gray_eval

# METRICS.md "Known values": the evaluator on F = round((A + B) / 2). Columns: the 12 metrics + SSIM_dr255.
KNOWN = {
    ("ivf/RoadScene/ir/FLIR_00211.jpg", "ivf/RoadScene/vi/FLIR_00211.jpg"): dict(
        EN=6.1902, SD=22.6895, SF=6.9014, AG=2.5876, MI=2.0201, SCD=1.8289, VIF=0.5238, Qabf=0.3524,
        SSIM=0.9063, SSIM_dr255=1.3809, MSE=3286.0571, PSNR=12.9299, CC=0.3888),
    ("ivf/TNO/ir/01.png", "ivf/TNO/vi/01.png"): dict(
        EN=6.2484, SD=23.3161, SF=6.6722, AG=2.6036, MI=1.4550, SCD=1.7660, VIF=0.5083, Qabf=0.3311,
        SSIM=1.0232, SSIM_dr255=1.5245, MSE=1682.6638, PSNR=15.5233, CC=0.3971),
    ("ivf/MSRS/ir/00004N.png", "ivf/MSRS/vi/00004N.png"): dict(
        EN=5.3473, SD=17.2973, SF=3.6399, AG=1.1266, MI=1.7041, SCD=1.1520, VIF=0.6160, Qabf=0.3313,
        SSIM=0.9660, SSIM_dr255=1.6375, MSE=328.9336, PSNR=21.5180, CC=0.7200),
    ("mif/MRI_PET/PET/11.png", "mif/MRI_PET/MRI/11.png"): dict(
        EN=3.9267, SD=45.6580, SF=17.8453, AG=5.2157, MI=2.5363, SCD=1.2579, VIF=1.0087, Qabf=0.4726,
        SSIM=1.2791, SSIM_dr255=1.3310, MSE=1922.4072, PSNR=12.1699, CC=0.7388),
    ("mif/MRI_CT/CT/11.png", "mif/MRI_CT/MRI/11.png"): dict(
        EN=4.7147, SD=55.9949, SF=21.3803, AG=5.6907, MI=2.6722, SCD=0.9552, VIF=0.4448, Qabf=0.3702,
        SSIM=1.2752, SSIM_dr255=1.4379, MSE=1554.5342, PSNR=16.2148, CC=0.8324),
}

# Tolerance against the 4-decimal table: the printed value is within 5e-5 of the evaluator's (rounding), and
# this module reproduces the evaluator to < 3e-7 relative (float32 sums in another order; measured on all
# 61 dev pairs of shared/data against the evaluator's code run with scipy/scikit-image/scikit-learn/OpenCV
# installed aside). 5e-5 absolute + 1e-6 relative therefore fails any wrong definition visible at 4 decimals
# (MI in log2: +44 %; SSIM with L = 255: +0.5; PSNR with peak 255: +1.4 dB). Quirks that move these images
# by only ~1e-6 (SSIM's float32 rounding, Qabf's gA == gF case) have their own tests below.
ABS_TOL, REL_TOL = 5e-5, 1e-6


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= ABS_TOL + REL_TOL * abs(want)


@pytest.fixture(scope="module")
def known_triples(data_dir: Path):
    out = {}
    for (pa, pb), want in KNOWN.items():
        a, b = read_gray_eval(data_dir / pa), read_gray_eval(data_dir / pb)
        out[pa] = (np.round((a + b) / 2), a, b, want)  # numpy's round: half to even, as in METRICS.md
    return out


@pytest.mark.parametrize("pair", [pa for pa, _ in KNOWN])
def test_known_values(known_triples, pair):
    f, a, b, want = known_triples[pair]
    got = evaluate(f, a, b)
    assert list(got) == list(METRIC_NAMES)
    got["SSIM_dr255"] = M.ssim(f, a, b, data_range=255)
    bad = {k: (got[k], want[k]) for k in want if not _close(got[k], want[k])}
    assert not bad, f"{pair}: (got, table) {bad}"


@pytest.mark.parametrize("pair", [pa for pa, _ in KNOWN][:2])
def test_public_functions_agree_with_evaluate(known_triples, pair):
    f, a, b, _ = known_triples[pair]
    got = evaluate(f, a, b)
    single = {
        "EN": M.entropy(f), "SD": M.std(f), "SF": M.spatial_frequency(f), "AG": M.average_gradient(f),
        "MI": M.mutual_information(f, a, b), "SCD": M.scd(f, a, b), "VIF": M.vif(f, a, b), "Qabf": M.qabf(f, a, b),
        "SSIM": M.ssim(f, a, b), "CC": M.correlation(f, a, b), "MSE": M.mse(f, a, b), "PSNR": M.psnr(f, a, b),
    }
    assert single == got


# --------------------------------------------------------------------------------------- synthetic golden
def synthetic(h: int, w: int):
    """Exactly representable test images: integer A and B with flat, ramp, ring and texture parts, and a
    non-integer F (multiples of 1/16) so that MI takes its distinct-value path and float32 rounding matters."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    a = (((x - w // 3) ** 2 + (y - h // 2) ** 2) // 9) % 256
    a = np.where((x > w // 2) & (y < h // 2), (x * 37 + y * 91 + (x * y) % 13) % 256, a)
    b = np.clip(40 + 3 * x + 2 * y - ((x // 8 + y // 8) % 2) * 60, 0, 255)
    a, b = a.astype(np.float32), b.astype(np.float32)
    f = (3 * a + 5 * b) / 8 + ((x + y) % 4).astype(np.float32) / 16
    return f.astype(np.float32), a, b


# The evaluator's code run on synthetic(67, 93) with numpy 2.4, scipy 1.17, scikit-image 0.26,
# scikit-learn 1.9 (odd sizes: the banded filters' tail blocks; 2522 distinct F values).
SYNTHETIC_GOLDEN = dict(
    EN=7.558866422781247, SD=53.4322624206543, SF=32.644004821777344, AG=9.905974388122559,
    MI=8.207246660176498, SCD=1.2619574069976807, VIF=0.6037577627576445, Qabf=0.39458683133125305,
    SSIM=0.8439078939630269, MSE=4327.42138671875, PSNR=11.774896621704102, CC=0.7587635517120361,
)


def test_synthetic_golden():
    got = evaluate(*synthetic(67, 93))
    # Bit-for-bit is not promised (float32 sums may be ordered differently): 1e-6 relative.
    bad = {k: (got[k], v) for k, v in SYNTHETIC_GOLDEN.items() if not math.isclose(got[k], v, rel_tol=1e-6)}
    assert not bad, bad
    assert M.ssim(*synthetic(67, 93), data_range=255) == pytest.approx(0.9796084063663237, rel=1e-6)


def test_ssim_float32_rounding_like_skimage():
    # Near-flat bright images: local variances (~0.02) are a few float32 ulps of E[x^2] (~62500), so
    # scikit-image's float32 arithmetic gives 0.0643 where exact arithmetic gives 0.0371. Golden value:
    # skimage 0.26 structural_similarity(f, a, data_range=2) + (f, b) on float32 input.
    y, x = np.mgrid[0:40, 0:50]
    a = (250 + ((x * 7 + y * 3) % 11 == 0)).astype(np.float32)
    b = (251 - ((x * 5 + y * 2) % 13 == 0)).astype(np.float32)
    f = (250 + ((x * 3 + y * 5) % 7 == 0)).astype(np.float32)
    assert M.ssim(f, a, b) == pytest.approx(0.0643091908616218, rel=1e-6)
    assert M.ssim(f, a, b, data_range=255) == pytest.approx(1.993105984706292, rel=1e-9)


def test_qabf_equal_gradient_quirk():
    # F = A, B = 0: gA == gF everywhere, so G_AF = gF (the quirk) instead of 1, and alpha_A = alpha_F.
    # Qabf = sum(Q_AF gA) / sum(gA) (B has no gradient); with G = 1 it would be ~5e-4 smaller.
    _, a, _ = synthetic(70, 70)
    z = np.zeros_like(a)
    a64 = a.astype(np.float64)
    p = np.pad(a64, 1)
    sx = (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2]) - (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:])
    sy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    g = np.hypot(sx, sy)
    q = 0.9994 / (1 + np.exp(-15 * (g - 0.5))) * 0.9879 / (1 + np.exp(-22 * (1 - 0.8)))
    want = float((q * g).sum() / g.sum())
    assert M.qabf(a, a, z) == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------------------------------ building blocks
def _direct_valid(x: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Plain 2-D 'valid' correlation, shifted-slice sums (the oracle for the banded-matmul filter)."""
    n = w2.shape[0]
    h, wd = x.shape[0] - n + 1, x.shape[1] - n + 1
    out = np.zeros((h, wd))
    for i in range(n):
        for j in range(n):
            out += w2[i, j] * x[i : i + h, j : j + wd]
    return out


@pytest.mark.parametrize("n", [17, 9, 5, 3])
@pytest.mark.parametrize("shape", [(17, 17), (40, 23), (97, 131), (131, 67)])
@pytest.mark.parametrize("step", [1, 2])
def test_filter2_valid_matches_direct(n, shape, step):
    if min(shape) < n:
        pytest.skip("window larger than the image")
    x = np.random.default_rng(3).random(shape) * 255
    w = M._vif_window(n)
    want = _direct_valid(x, np.outer(w, w))[::step, ::step]
    got = M._filter2_valid(x, w, step)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-10)


def test_vif_window_is_fspecial():
    # fspecial('gaussian', 17, 3.4), normalised, built 2-D as the evaluator does.
    m = 8.0
    yy, xx = np.ogrid[-m : m + 1, -m : m + 1]
    h = np.exp(-(xx * xx + yy * yy) / (2 * 3.4**2))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    w = M._vif_window(17)
    np.testing.assert_allclose(np.outer(w, w), h / h.sum(), rtol=1e-13)


def test_box7_matches_uniform_filter_rounding():
    # scipy's uniform_filter on float32 rounds after each axis; a float64 box filter differs in the last bits.
    x = synthetic(40, 50)[0]
    got = M._box7_f32(x)
    assert got.dtype == np.float32 and got.shape == (34, 44)
    exact = _direct_valid(x.astype(np.float64), np.full((7, 7), 1 / 49))
    np.testing.assert_allclose(got, exact, rtol=2e-7)


# ------------------------------------------------------------------------------------------------ variants
def test_variants():
    f, a, b = synthetic(80, 90)
    base = evaluate(f, a, b)
    tang = evaluate(f, a, b, variant="tang_matlab")
    assert tang["MI"] == pytest.approx(base["MI"] / math.log(2), rel=1e-12)
    assert tang["SSIM"] == pytest.approx(base["SSIM"] / 2, rel=1e-12)
    assert tang["PSNR"] == pytest.approx(10 * math.log10(255**2 / base["MSE"]), rel=1e-12)
    assert tang["AG"] == pytest.approx(base["AG"] * 80 * 90 / (79 * 89), rel=1e-6)
    vifb = evaluate(f, a, b, variant="vifb")
    assert vifb["SSIM"] == pytest.approx(M.ssim(f, a, b, data_range=255), rel=1e-12)
    f64 = f.astype(np.float64)
    sf_pixels = math.sqrt((np.sum(np.diff(f64, axis=1) ** 2) + np.sum(np.diff(f64, axis=0) ** 2)) / f.size)
    assert vifb["SF"] == pytest.approx(sf_pixels, rel=1e-6)
    custom = evaluate(f, a, b, mi_base=2, ssim_data_range=255)
    assert custom["MI"] == tang["MI"] and custom["SSIM"] == vifb["SSIM"]
    assert {k: v for k, v in custom.items() if k not in ("MI", "SSIM")} == {
        k: v for k, v in base.items() if k not in ("MI", "SSIM")}


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="matlab"), "unknown metric variant"),
    (dict(mi_base=1), "mi_base"),
    (dict(mi_base="ten"), "mi_base"),
    (dict(ssim_data_range=0), "ssim_data_range"),
    (dict(ssim_reduce="median"), "ssim_reduce"),
    (dict(psnr_peak=-1), "psnr_peak"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(*synthetic(70, 70), **kwargs)


# ------------------------------------------------------------------------------------------------ edge cases
ALL_TRIPLE = [M.mutual_information, M.scd, M.vif, M.qabf, M.ssim, M.correlation, M.mse, M.psnr, evaluate]
ALL_SINGLE = [M.entropy, M.std, M.spatial_frequency, M.average_gradient]


@pytest.mark.filterwarnings("error")  # no RuntimeWarning (0/0, log of 0) may leak
def test_constant_fused_image():
    _, a, b = synthetic(70, 70)
    f = np.full_like(a, 77.0)
    got = evaluate(f, a, b)
    assert all(math.isfinite(v) for v in got.values()), got
    assert got["EN"] == 0 and got["SD"] == 0 and got["SF"] == 0 and got["AG"] == 0
    assert got["MI"] == 0  # a single label carries no information
    assert got["CC"] == 0  # documented: correlation with a constant is 0 (the evaluator: NaN)
    assert got["VIF"] == 0  # F has no variance: g = 0 everywhere, the denominators come from A and B


@pytest.mark.filterwarnings("error")
def test_all_zero_gradients():
    z = np.zeros((70, 70), np.float32)
    got = evaluate(z, z, z)
    # Documented values where the evaluator computes 0/0: Qabf 0, VIF 1 per pair (its own NaN -> 1),
    # CC and SCD 0, PSNR +inf (MSE = 0).
    assert got["Qabf"] == 0 and got["VIF"] == 2 and got["CC"] == 0 and got["SCD"] == 0
    assert got["MSE"] == 0 and got["PSNR"] == math.inf and got["MI"] == 0 and got["EN"] == 0
    c = np.full((70, 70), 200, np.float32)
    got = evaluate(c, c, z)
    assert got["VIF"] == 2 and got["PSNR"] == pytest.approx(10 * math.log10(200**2 / 20000))
    # Zero-padded Sobel sees the image border as an edge, so Qabf of flat non-zero images is not 0.
    assert all(math.isfinite(v) for v in got.values())


@pytest.mark.filterwarnings("error")
def test_scd_term_with_constant_difference():
    _, a, b = synthetic(70, 70)
    # F == B makes F - B constant: that term is 0, the other one corr(B, B - A) stays.
    assert M.scd(b, a, b) == pytest.approx(M._corr(b, b - a))
    assert M.psnr(np.zeros_like(a), a, b) == -math.inf


def test_psnr_peak():
    f, a, b = synthetic(70, 70)
    assert M.psnr(f, a, b) == pytest.approx(10 * math.log10(float(f.max()) ** 2 / M.mse(f, a, b)))
    assert M.psnr(f, a, b, peak=255) == pytest.approx(10 * math.log10(255**2 / M.mse(f, a, b)))
    assert M.psnr(a, a, a) == math.inf


@pytest.mark.parametrize("fn", ALL_TRIPLE)
@pytest.mark.parametrize("shape", [(1, 80), (80, 1)])
def test_one_pixel_wide_rejected(fn, shape):
    x = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="too small"):
        fn(x, x, x)


@pytest.mark.parametrize("fn", [M.spatial_frequency, M.average_gradient])
def test_one_pixel_wide_rejected_single(fn):
    with pytest.raises(ValueError, match="too small"):
        fn(np.zeros((1, 50)))


def test_minimum_sizes():
    f, a, b = synthetic(65, 65)
    assert math.isfinite(evaluate(f, a, b)["VIF"])  # 65 is enough for the 4-scale pyramid
    with pytest.raises(ValueError, match="65x65"):
        evaluate(f[:64], a[:64], b[:64])
    with pytest.raises(ValueError, match="65x65"):
        M.vif(f[:, :64], a[:, :64], b[:, :64])
    assert math.isfinite(M.ssim(f[:7, :7], a[:7, :7], b[:7, :7]))
    with pytest.raises(ValueError, match="7x7"):
        M.ssim(f[:6], a[:6], b[:6])
    assert math.isfinite(M.qabf(f[:2, :2], a[:2, :2], b[:2, :2]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which, name", [(0, "fused image F"), (1, "source A"), (2, "source B")])
def test_non_finite_rejected(bad, which, name):
    imgs = [x.copy() for x in synthetic(70, 70)]
    imgs[which][5, 9] = bad
    with pytest.raises(ValueError, match=f"{name}.*NaN or infinite"):
        evaluate(*imgs)
    with pytest.raises(ValueError, match="NaN or infinite"):
        M.mse(*imgs)


def test_shape_dtype_ndim_rejected():
    f, a, b = synthetic(70, 70)
    with pytest.raises(ValueError, match="shape mismatch"):
        evaluate(f, a[:, :69], b)
    with pytest.raises(ValueError, match="2-D"):
        evaluate(np.stack([f] * 3, -1), a, b)
    with pytest.raises(TypeError, match="numeric"):
        M.entropy(np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="2-D"):
        M.entropy(np.zeros(5))


def test_integer_input_and_entropy_clip():
    f, a, b = synthetic(70, 70)
    fi = np.round(f).astype(np.uint8)
    assert evaluate(fi, a.astype(np.uint8), b.astype(np.int32)) == evaluate(fi.astype(np.float32), a, b)
    # Values outside 0..255 are clipped before binning (the evaluator's uint8 cast would wrap them).
    assert M.entropy(np.array([[-5.0, 300.0], [0.0, 255.0]])) == pytest.approx(1.0)


def test_mutual_information_paths_agree():
    # Integer grey levels (bincount) and arbitrary values (unique) are two routes to the same contingency table.
    _, a, b = synthetic(70, 80)
    f = np.round((a + b) / 2)
    shifted = (f * 0.5 + 0.25).astype(np.float32)  # same partition of the pixels, non-integer values
    assert M.mutual_information(shifted, a, b) == pytest.approx(M.mutual_information(f, a, b), rel=1e-12)
    # Direct definition, in nats.
    joint = np.histogram2d(f.ravel(), a.ravel(), bins=[np.arange(257) - 0.5] * 2)[0] / f.size
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    want = float((joint[nz] * np.log(joint[nz] / (px @ py)[nz])).sum())
    assert M._mi_pair(f, a) == pytest.approx(want, rel=1e-10)


# ------------------------------------------------------------------------------------------------- reading
# (R, G, B) -> round(Y) from OpenCV 5.0 cvtColor(BGR2GRAY) on float32: all exact .5 ties
# (299 R + 587 G + 114 B = 1000 k + 500), where the float32 order of operations decides the rounding
# (a float64 Y with numpy's round gets 3 of these 16 wrong).
CV2_TIES = [(64, 6, 253, 52), (28, 40, 32, 36), (119, 73, 62, 86), (54, 206, 188, 158), (221, 89, 177, 138),
            (36, 144, 72, 104), (170, 28, 81, 76), (99, 25, 116, 58), (62, 222, 32, 152), (171, 43, 45, 82),
            (97, 147, 72, 124), (245, 147, 254, 188), (218, 80, 47, 118), (119, 107, 115, 112),
            (106, 152, 163, 140), (159, 143, 237, 158)]


def test_read_rgb_ties_like_opencv(tmp_path):
    px = np.array([t[:3] for t in CV2_TIES], np.uint8)[None]
    Image.fromarray(px, "RGB").save(tmp_path / "ties.png")
    got = read_gray_eval(tmp_path / "ties.png")
    assert got.dtype == np.float32 and got.shape == (1, 16)
    np.testing.assert_array_equal(got[0], [t[3] for t in CV2_TIES])


def test_read_modes(tmp_path):
    g = (np.arange(64 * 3).reshape(8, 24) % 256).astype(np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "l.png")
    want = g.astype(np.float32)
    np.testing.assert_array_equal(read_gray_eval(tmp_path / "l.png"), want)
    Image.fromarray(np.stack([g] * 3, -1), "RGB").save(tmp_path / "rgb_gray.png")
    np.testing.assert_array_equal(read_gray_eval(tmp_path / "rgb_gray.png"), want)
    rgba = np.dstack([g, g, g, np.full_like(g, 7)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")  # alpha dropped, not composited
    np.testing.assert_array_equal(read_gray_eval(tmp_path / "rgba.png"), want)
    Image.fromarray(g, "L").convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_gray_eval(tmp_path / "p.png"), want)
    Image.fromarray(np.dstack([g, np.full_like(g, 200)]), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_gray_eval(tmp_path / "la.png"), want)
    # 16-bit: the high byte (v >> 8), as OpenCV; Pillow's own conversion would clip at 255 instead.
    v16 = np.array([[0, 255, 256, 32767, 32768, 65535]], np.uint16)
    Image.fromarray(v16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_gray_eval(tmp_path / "g16.png"), [[0, 0, 1, 127, 128, 255]])


def test_read_exif_orientation(tmp_path):
    g = np.zeros((4, 6), np.uint8)
    g[0, 0] = 255
    im = Image.fromarray(g, "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.png", exif=exif.tobytes())
    got = read_gray_eval(tmp_path / "rot.png")
    assert got.shape == (6, 4) and got[0, -1] == 255


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(M.ImageReadError, match="broken.png"):
        read_gray_eval(bad)
    with pytest.raises(M.ImageReadError, match="missing.png"):
        read_gray_eval(tmp_path / "missing.png")
    Image.fromarray(np.zeros((3, 3), np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(M.ImageReadError, match="float.tif"):
        read_gray_eval(tmp_path / "float.tif")


def test_evaluator_reader_has_the_input_checks(tmp_path, monkeypatch):
    """eval and score read through io.open_image: the pixel cap from the header and one frame only."""
    from PIL import Image

    from ddfm_fast.io import ImageReadError

    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setenv("DDFM_FAST_MAX_PIXELS", "1000")
    with pytest.raises(ImageReadError, match="a.png"):
        read_gray_eval(tmp_path / "a.png")
    monkeypatch.delenv("DDFM_FAST_MAX_PIXELS")
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 255)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageReadError, match="anim.gif"):
        read_gray_eval(tmp_path / "anim.gif")
