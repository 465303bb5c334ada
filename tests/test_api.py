"""``ddfm_fast.fuse`` with PyTorch habits: any image form, batches, colour, clear device errors, warnings that
point at the caller, and the caller's model left as it was."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ddfm_fast
from ddfm_fast.config import SamplerConfig
from ddfm_fast.plan import BackendError

EM3 = dict(prior="none", steps=3)  # EM only: the input handling is the same, without a model's cost


@pytest.fixture(scope="module")
def pair(data_dir):
    ir = np.asarray(Image.open(data_dir / "ivf/MSRS/ir/00004N.png").convert("L"))[:64, :96].copy()
    vis = np.asarray(Image.open(data_dir / "ivf/MSRS/vi/00004N.png").convert("RGB"))[:64, :96].copy()
    return ir, vis


def test_tensors_hw_chw_and_arrays_give_the_same_fusion(pair, tmp_path):
    ir, vis = pair
    Image.fromarray(ir).save(tmp_path / "ir.png")
    Image.fromarray(vis).save(tmp_path / "vis.png")
    ref = ddfm_fast.fuse(tmp_path / "ir.png", tmp_path / "vis.png", **EM3).fused
    as_arrays = ddfm_fast.fuse(ir, vis, **EM3).fused
    as_tensors = ddfm_fast.fuse(torch.from_numpy(ir), torch.from_numpy(vis).permute(2, 0, 1), **EM3).fused
    as_float = ddfm_fast.fuse(torch.from_numpy(ir)[None].float() / 255, torch.from_numpy(vis).permute(2, 0, 1),
                              **EM3).fused
    np.testing.assert_array_equal(as_arrays, ref)
    np.testing.assert_array_equal(as_tensors, ref)
    np.testing.assert_array_equal(as_float, ref)


def test_a_batched_tensor_gives_one_result_per_image(pair):
    ir, vis = pair
    irs = torch.stack([torch.from_numpy(ir)[None], torch.from_numpy(np.ascontiguousarray(ir[::-1]))[None]])
    viss = torch.from_numpy(vis).permute(2, 0, 1)[None].expand(2, -1, -1, -1)
    out = ddfm_fast.fuse(irs, viss, **EM3)
    assert isinstance(out, list) and len(out) == 2
    np.testing.assert_array_equal(out[0].fused, ddfm_fast.fuse(ir, vis, **EM3).fused)
    with pytest.raises(ValueError, match="ir holds 2 image"):
        ddfm_fast.fuse(irs, viss[:1], **EM3)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        ddfm_fast.fuse(torch.zeros(5, 8, 8), torch.zeros(5, 8, 8), **EM3)


def test_colour_output_keeps_the_visible_chroma(pair, tmp_path):
    ir, vis = pair
    res = ddfm_fast.fuse(ir, vis, color=True, **EM3)
    assert res.color is not None and res.color.shape == (64, 96, 3) and res.color.dtype == np.uint8
    assert not np.array_equal(res.color[..., 0], res.color[..., 1]), "the visible image's chroma was lost"
    # Its luminance is the fused image: each channel is rounded (+-0.5, so Y moves <= 0.5), except where the new
    # colour leaves the RGB cube and is clipped to 0 or 255.
    y = 0.299 * res.color[..., 0] + 0.587 * res.color[..., 1] + 0.114 * res.color[..., 2]
    inside = ((res.color > 0) & (res.color < 255)).all(axis=-1)
    assert inside.mean() > 0.5 and np.abs(y - res.fused)[inside].max() <= 0.5 + 1e-9
    res.save(tmp_path / "c.png")
    assert np.asarray(Image.open(tmp_path / "c.png")).shape == (64, 96, 3)
    gray = ddfm_fast.fuse(ir, vis, **EM3)
    assert gray.color is None and gray.image is gray.fused


def test_colour_from_a_functional_image_when_the_anatomy_is_gray(pair):
    ir, vis = pair
    pet = np.stack([ir, ir // 2, 255 - ir], axis=-1).astype(np.uint8)  # a coloured "functional" map
    mri = vis.mean(axis=-1).astype(np.uint8)
    res = ddfm_fast.fuse(pet, mri, color=True, **EM3)
    assert not np.array_equal(res.color[..., 0], res.color[..., 2])


def test_resize_is_an_argument_and_the_mismatch_error_says_so(pair):
    ir, vis = pair
    with pytest.raises(ValueError, match="resize='ir'"):
        ddfm_fast.fuse(ir[:32], vis, **EM3)
    res = ddfm_fast.fuse(ir[:32, :48], vis, resize="vis", color=True, **EM3)
    assert res.size == (64, 96) and res.color.shape == (64, 96, 3)


def test_unavailable_devices_are_clear_errors(pair):
    ir, vis = pair
    for device, message in (("meta", "runs on 'cpu' or 'cuda'"), ("mps", "runs on 'cpu' or 'cuda'")):
        with pytest.raises(BackendError, match=message):
            ddfm_fast.fuse(ir, vis, device=device, **EM3)
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA is not available"):
            ddfm_fast.fuse(ir, vis, device="cuda", **EM3)


def test_the_default_prior_notice_points_at_the_caller(pair):
    ir, vis = pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddfm_fast.fuse(ir[:32, :32], vis[:32, :32], steps=1)
    notices = [w for w in caught if issubclass(w.category, ddfm_fast.api.DefaultPriorNotice)]
    assert notices and notices[0].filename == __file__


def test_the_callers_model_is_not_modified(reference_dir, pair):
    model = ddfm_fast.load_model(reference_dir / "tiny_unet.pt", config=reference_dir / "tiny_unet_config.json")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ir, vis = pair
    ddfm_fast.fuse(ir[:32, :32], vis[:32, :32], model=model, steps=1, accel=ddfm_fast.AccelConfig(dtype="bf16"))
    assert next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_and_keyword_overrides_are_one_type(pair):
    ir, vis = pair
    cfg = SamplerConfig(prior="none", steps=3, lamb=0.4)
    a = ddfm_fast.fuse(ir, vis, config=cfg).fused
    b = ddfm_fast.fuse(ir, vis, prior="none", steps=3, lamb=0.4).fused
    np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ddfm_fast.fuse(ir, vis, lambda_=0.4, **EM3)


def test_em_only_calls_the_step_callback_once_an_iteration(pair):
    """With ``prior="none"`` the callback sees every EM iteration (a progress bar advances, a cancel can land), and
    the last one's estimate is the result; no timestep, as no UNet runs."""
    ir, vis = pair
    seen = []
    res = ddfm_fast.fuse(ir, vis, callback=lambda out: seen.append((out.j, out.idx, out.timestep,
                                                                    out.pred_xstart.clone())), **EM3)
    assert [(j, idx, t) for j, idx, t, _ in seen] == [(0, 2, None), (1, 1, None), (2, 0, None)]
    last = seen[-1][3]
    assert last.shape[1] == 3 and torch.equal(last[:, 0], last[:, 2])  # grey: its luminance is F
    from ddfm_fast.em_only import postprocess_em_only

    np.testing.assert_array_equal(postprocess_em_only(last[:, :1, :64, :96]), res.fused)

    class Stop(Exception):
        pass

    def stop_at_second(out):
        seen.append(out.j)
        if out.j == 1:
            raise Stop

    seen = []
    with pytest.raises(Stop):
        ddfm_fast.fuse(ir, vis, callback=stop_at_second, prior="none", steps=50)
    assert seen == [0, 1]  # the exception ended the iterations where it was raised


@pytest.mark.parametrize("kind, size", [("ivf", (480, 640)), ("mif", (256, 256))])
def test_the_shipped_examples_fuse(kind, size):
    from ddfm_fast.samples import example_pair

    ir, vis = example_pair(kind)
    res = ddfm_fast.fuse(ir, vis, color=True, **EM3)
    assert res.size == size and res.color is not None
    with pytest.raises(ValueError, match="unknown example"):
        example_pair("xray")


def test_odd_inputs_and_options_fail_before_any_work(pair):
    ir, vis = pair
    with pytest.raises(ValueError, match="color must be"):
        ddfm_fast.fuse(ir, vis, color="rgb", **EM3)
    with pytest.raises(ValueError, match="resize must be"):
        ddfm_fast.fuse(ir, vis, resize="bogus", **EM3)
    half = torch.from_numpy(ir)[None].to(torch.bfloat16) / 255
    res = ddfm_fast.fuse(half, vis, **EM3)  # bf16 tensors are read as float
    assert res.size == (64, 96)
    nhwc = np.stack([vis, vis])  # a 4-D array is a batch, as a 4-D tensor is
    out = ddfm_fast.fuse(np.stack([ir, ir])[..., None], nhwc, **EM3)
    assert isinstance(out, list) and len(out) == 2
    assert isinstance(ddfm_fast.fuse(ir[None, ..., None], vis[None], **EM3), list)


def test_wrong_argument_types_are_one_clear_error(tmp_path) -> None:
    from ddfm_fast.plan import BackendError
    from ddfm_fast.samples import example_pair

    ir, vis = example_pair("ivf")
    with pytest.raises(TypeError, match="bytes that are not a file name"):
        ddfm_fast.fuse(ir.read_bytes(), vis, steps=2)
    with pytest.raises(ValueError, match="model_config describes a checkpoint"):
        ddfm_fast.fuse(ir, vis, steps=2, model_config={"num_channels": 8})
    with pytest.raises(ValueError, match="uses no model"):
        ddfm_fast.fuse(ir, vis, steps=2, prior="none", model_config={"num_channels": 8})
    with pytest.raises(TypeError, match="floating torch dtype"):
        ddfm_fast.load_model("ddfm-small", dtype="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA is not available"):
            ddfm_fast.load_model("ddfm-small", device="cuda")
