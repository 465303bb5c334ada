"""RGB <-> YCbCr against ``color.npz`` (the official scikit-image conversion as ``DDIM.p_sample`` uses it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddfm_fast import color


@pytest.fixture(scope="module")
def golden(reference_dir):
    return {k: torch.from_numpy(v) for k, v in np.load(reference_dir / "color.npz").items()}


def test_matrices_are_the_official_values(golden):
    np.testing.assert_array_equal(np.array(color.YCBCR_FROM_RGB), golden["matrix_ycbcr_from_rgb"].numpy())
    np.testing.assert_array_equal(np.array(color.RGB_FROM_YCBCR), golden["matrix_rgb_from_ycbcr"].numpy())
    np.testing.assert_array_equal(np.array(color.OFFSET), golden["offset"].numpy())


def test_forward_bitwise(golden):
    # Bitwise: the FMA emulation reproduces the reference build's float32 matmul exactly (the goldens' color.npz).
    torch.testing.assert_close(color.rgb_to_ycbcr(golden["rgb_in"]), golden["ycbcr_raw"], rtol=0, atol=0)
    torch.testing.assert_close(color.luminance_for_em(golden["rgb_in"]), golden["ycbcr_div255"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "src, dst",
    [("ycbcr_div255", "rgb_roundtrip"), ("ycbcr_div255_ymod", "rgb_from_ymod"), ("ycbcr_div255_in", "rgb_from_ycbcr_in")],
)
def test_inverse_bitwise(golden, src, dst):
    torch.testing.assert_close(color.rgb_from_em(golden[src]), golden[dst], rtol=0, atol=0)


def test_no_device_or_dtype_change(golden):
    out = color.rgb_to_ycbcr(golden["rgb_in"][:, :, :4, :5].contiguous())
    assert out.dtype == torch.float32 and out.device == golden["rgb_in"].device and out.shape == (2, 3, 4, 5)


def test_rejects_wrong_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        color.rgb_to_ycbcr(torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="float32"):
        color.ycbcr_to_rgb(torch.zeros(1, 3, 4, 4, dtype=torch.float64))
