"""The DDFM loop, the drop-in ``p_sample_loop`` and ``fuse`` against ``sampler_tiny.npz`` (official runs).

Tolerances. The goldens come from the official code on another CPU; one UNet forward of the tiny model
already differs from them by up to 7.6e-6 here (kernel rounding, see tests/test_unet.py), and the EM step's FFTs
by ~1 ulp. Over the 10-step run the difference measured here grows to 1e-4 (x_prev) and 4e-4 (x0' at the noisy
first steps, where the EM amplifies it); the reference README suggests atol 1e-3 end to end, which we use.
A wrong coefficient, a missing clamp or a misplaced EM step moves these values by 1e-2 or more.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import ddfm_fast
from ddfm_fast import io
from ddfm_fast.api import DefaultPriorNotice, initial_noise, postprocess
from ddfm_fast.compat import create_sampler
from ddfm_fast.config import AccelConfig, ConfigError, SamplerConfig
from ddfm_fast.sampler import DDFMSampler

ATOL = 1e-3


@pytest.fixture(scope="module")
def tiny(reference_dir):
    return ddfm_fast.load_model(reference_dir / "tiny_unet.pt", config=reference_dir / "tiny_unet_config.json")


def _t(golden, key):
    return torch.from_numpy(golden[key])


@pytest.fixture(scope="module")
def run10(tiny, sampler_golden):
    records = []

    def record(out):
        records.append({"x0": out.pred_xstart.clone(), "x_prev": out.x_prev.clone(),
                        "tau_a": out.state.tau_a.flatten()[0].clone(), "tau_b": out.state.tau_b.flatten()[0].clone(),
                        "idx": out.idx})

    g = sampler_golden
    sampler = DDFMSampler(SamplerConfig(steps=10, tau_reduce="batch"), AccelConfig(backend="torch"))
    result = sampler.sample(tiny, _t(g, "x_start"), _t(g, "I"), _t(g, "V"), callback=record)
    return result, records


def test_ten_step_intermediates(run10, sampler_golden):
    result, records = run10
    g = sampler_golden
    assert [r["idx"] for r in records] == g["ddim10/step_idx"].tolist()
    for j, rec in enumerate(records):
        if j + 1 < len(records):  # the next step's input is this step's output
            torch.testing.assert_close(rec["x_prev"], _t(g, "ddim10/x_t")[j + 1:j + 2], rtol=0, atol=ATOL)
        torch.testing.assert_close(rec["x0"], _t(g, "ddim10/pred_xstart_after_em")[j:j + 1], rtol=0, atol=ATOL)
        torch.testing.assert_close(rec["x_prev"], _t(g, "ddim10/x_prev")[j:j + 1], rtol=0, atol=ATOL)
        assert rec["tau_a"].item() == pytest.approx(float(g["ddim10/tau_a"][j]), rel=1e-4)
        assert rec["tau_b"].item() == pytest.approx(float(g["ddim10/tau_b"][j]), rel=1e-4)
    torch.testing.assert_close(result.sample, _t(g, "ddim10/final"), rtol=0, atol=ATOL)
    # At idx 0, ac_prev = 1: the output is x0' itself (the official loop returns x_prev there).
    torch.testing.assert_close(records[-1]["x_prev"], records[-1]["x0"], rtol=0, atol=0)


def test_one_step_tail_from_golden_eps(sampler_golden):
    """The step tail alone, fed the goldens' own UNet output, isolates the EM/colour/DDIM arithmetic."""
    from ddfm_fast.em import em_init
    from ddfm_fast.schedule import Schedule
    from ddfm_fast.step import step_tail_torch

    g = sampler_golden
    table = Schedule.create(10).table("cpu")
    state = em_init(_t(g, "I"))
    for j in range(3):
        x_t = _t(g, "ddim10/x_t")[j:j + 1]
        x_prev, x0 = step_tail_torch(x_t, _t(g, "ddim10/model_eps")[j:j + 1], table.coef[j], _t(g, "I"), _t(g, "V"),
                                     state, SamplerConfig.paper(steps=10))
        # Only the FFT rounding separates us from the goldens here: far below the end-to-end tolerance.
        torch.testing.assert_close(x0, _t(g, "ddim10/pred_xstart_after_em")[j:j + 1], rtol=0, atol=2e-5)
        torch.testing.assert_close(x_prev, _t(g, "ddim10/x_prev")[j:j + 1], rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def compat_runs(tiny, sampler_golden, tmp_path_factory):
    g = sampler_golden
    out = {}
    for n in (10, 100):
        s = create_sampler(timestep_respacing=n)  # everything else: the official diffusion_config.yaml
        out[n] = s.p_sample_loop(model=tiny, x_start=_t(g, "x_start"), record=False, I=_t(g, "I"), V=_t(g, "V"),
                                 save_root=None, img_index="x", lamb=0.5, rho=0.001)
    return out


@pytest.mark.parametrize("n", [10, 100])
def test_compat_finals(compat_runs, sampler_golden, n):
    torch.testing.assert_close(compat_runs[n], _t(sampler_golden, f"ddim{n}/final"), rtol=0, atol=ATOL)


def test_sampler_equals_compat(run10, compat_runs):
    torch.testing.assert_close(run10[0].sample, compat_runs[10], rtol=0, atol=0)


def test_hundred_steps_through_the_sampler(tiny, sampler_golden):
    g = sampler_golden
    seen = {}

    def every10(out):
        if out.idx % 10 == 0:
            seen[out.idx] = out.x_prev.clone()

    result = DDFMSampler(SamplerConfig.paper()).sample(tiny, _t(g, "x_start"), _t(g, "I"), _t(g, "V"), callback=every10)
    torch.testing.assert_close(result.sample, _t(g, "ddim100/final"), rtol=0, atol=ATOL)
    for k, idx in enumerate(g["ddim100/x_prev_every10_idx"].tolist()):
        torch.testing.assert_close(seen[idx], _t(g, "ddim100/x_prev_every10")[k:k + 1], rtol=0, atol=ATOL)
    assert result.state.tau_a.flatten()[0].item() == pytest.approx(float(g["ddim100/tau_a"][-1]), rel=1e-4)


@pytest.mark.parametrize("n", [10, 100])
def test_postprocessing_of_the_golden_final_is_bitwise(sampler_golden, n):
    g = sampler_golden
    res = postprocess(_t(g, f"ddim{n}/final")[0], (64, 96))
    np.testing.assert_array_equal(res.luma, g[f"ddim{n}/post_Y_opencv"])
    np.testing.assert_array_equal(io.minmax_0_255(res.luma), g[f"ddim{n}/post_minmax_0_255"])
    np.testing.assert_array_equal(res.fused, g[f"ddim{n}/post_png_uint8"])


@pytest.mark.parametrize("n", [10, 100])
def test_postprocessing_of_our_final(compat_runs, sampler_golden, n):
    ours = postprocess(compat_runs[n][0], (64, 96)).fused.astype(int)
    ref = sampler_golden[f"ddim{n}/post_png_uint8"].astype(int)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"{(diff > 0).sum()} pixels differ"


def test_record_writes_the_official_progress_images(tiny, sampler_golden, tmp_path):
    g = sampler_golden
    s = create_sampler(timestep_respacing=10)
    s.p_sample_loop(model=tiny, x_start=_t(g, "x_start"), record=True, I=_t(g, "I"), V=_t(g, "V"),
                    save_root=str(tmp_path), img_index="FLIR_00001", lamb=0.5, rho=0.001)
    folder = tmp_path / "progress" / "FLIR_00001"
    assert sorted(os.listdir(folder)) == [f"x_{i:04d}.png" for i in range(10)]
    for j, idx in enumerate(g["ddim10/step_idx"].tolist()):
        img = np.asarray(Image.open(folder / f"x_{idx:04d}.png"))
        assert img.dtype == np.uint8 and img.shape == (64, 96)
        ref = io.to_uint8_truncated(io.sample_luma(_t(g, "ddim10/x_prev")[j:j + 1])).astype(int)
        diff = np.abs(img.astype(int) - ref)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-2  # truncation turns tiny float gaps into 0/1 flips


# ------------------------------------------------------------------------------------------------ fuse


def _crop_pair(data_dir, tmp_path, h, w, name="00004N", folder="ivf/MSRS"):
    paths = {}
    tmp_path.mkdir(parents=True, exist_ok=True)
    for role in ("ir", "vi"):
        img = Image.open(data_dir / folder / role / f"{name}.png")
        p = tmp_path / f"{role}.png"
        img.crop((200, 150, 200 + w, 150 + h)).save(p)
        paths[role] = p
    return paths["ir"], paths["vi"]


def test_fuse_crop_policy_reproduces_the_official_driver(tiny, data_dir, tmp_path):
    ir, vi = _crop_pair(data_dir, tmp_path, 70, 100)
    res = ddfm_fast.fuse(ir, vi, model=tiny, steps=3, size_policy="crop", device="cpu")
    assert res.fused.shape == (64, 96) and res.fused.dtype == np.uint8
    # The official driver: I from vi/, V from ir/, grey/255*2-1, top-left crop, manual_seed(3407) then randn.
    I = io.crop_to_multiple(io.to_model_range(io.read_gray(vi)))  # noqa: E741
    V = io.crop_to_multiple(io.to_model_range(io.read_gray(ir)))
    torch.manual_seed(3407)
    x_start = torch.randn(1, 3, 64, 96)
    ref = create_sampler(timestep_respacing=3).p_sample_loop(tiny, x_start, False, I, V, None, "0", 0.5, 0.001)
    torch.testing.assert_close(res.sample, ref[0], rtol=0, atol=0)
    np.testing.assert_array_equal(res.fused, postprocess(ref[0], (64, 96)).fused)


def test_fuse_pad_policy_keeps_every_pixel(tiny, data_dir, tmp_path):
    ir, vi = _crop_pair(data_dir, tmp_path, 70, 100)
    res = ddfm_fast.fuse(str(ir), str(vi), model=tiny, steps=3, device="cpu")
    assert res.fused.shape == (70, 100) and res.luma.shape == (70, 100) and res.sample.shape == (3, 70, 100)
    assert res.fused.min() == 0 and res.fused.max() == 255  # stretched over the kept pixels only
    out = res.save(tmp_path / "out.png")
    assert np.array_equal(np.asarray(Image.open(out)), res.fused)


def test_fuse_accepts_arrays_and_pil(tiny, data_dir, tmp_path):
    ir, vi = _crop_pair(data_dir, tmp_path, 64, 64)
    a = ddfm_fast.fuse(ir, vi, model=tiny, steps=2, device="cpu")
    b = ddfm_fast.fuse(Image.open(ir), np.asarray(Image.open(vi)), model=tiny, steps=2, device="cpu")
    np.testing.assert_array_equal(a.fused, b.fused)


def test_a_batch_of_two_equals_two_single_runs(tiny, data_dir, tmp_path):
    ir1, vi1 = _crop_pair(data_dir, tmp_path / "a", 64, 96, "00004N")
    ir2, vi2 = _crop_pair(data_dir, tmp_path / "b", 64, 96, "00055D")
    batch = ddfm_fast.fuse([ir1, ir2], [vi1, vi2], model=tiny, steps=3, device="cpu")
    for single_pair, res in zip([(ir1, vi1), (ir2, vi2)], batch):
        single = ddfm_fast.fuse(*single_pair, model=tiny, steps=3, device="cpu")
        # One tau per image keeps the EM independent, but batched convolutions round differently from single
        # ones (~1e-6) and the EM amplifies that where I - f_pre ~ 0 (measured 2.1e-4): the end-to-end tolerance.
        torch.testing.assert_close(res.sample, single.sample, rtol=0, atol=ATOL)
        assert np.abs(res.fused.astype(int) - single.fused.astype(int)).max() <= 1


def test_fuse_rejects_mismatched_sizes(tiny, data_dir, tmp_path):
    ir, vi = _crop_pair(data_dir, tmp_path, 64, 96)
    Image.open(vi).crop((0, 0, 90, 64)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"differ in size.*96x64.*90x64"):
        ddfm_fast.fuse(ir, tmp_path / "small.png", model=tiny, steps=2, device="cpu")


def test_fuse_without_a_model_uses_the_shipped_prior_and_says_so(data_dir, tmp_path):
    ir, vi = _crop_pair(data_dir, tmp_path, 64, 64)
    with pytest.warns(DefaultPriorNotice, match="ddfm-shrink.*adm256-uncond"):
        res = ddfm_fast.fuse(ir, vi, device="cpu", steps=2)
    assert res.fused.shape == (64, 64)


def test_the_default_prior_needs_no_file_and_a_missing_packaged_one_says_reinstall(data_dir, tmp_path, monkeypatch):
    from ddfm_fast import checkpoint

    monkeypatch.setattr(checkpoint, "PACKAGED_WEIGHTS_DIR", tmp_path / "nowhere")
    ir, vi = _crop_pair(data_dir, tmp_path, 64, 64)
    with pytest.warns(DefaultPriorNotice):
        assert ddfm_fast.fuse(ir, vi, device="cpu", steps=2).fused.shape == (64, 64)
    with pytest.raises(checkpoint.CheckpointError, match="missing.*Reinstall"):
        ddfm_fast.fuse(ir, vi, model="ddfm-small", device="cpu", steps=2)


def test_prior_none_is_em_only(data_dir, tmp_path, tiny):
    from ddfm_fast.em_only import fuse_em_only

    ir, vi = _crop_pair(data_dir, tmp_path, 50, 70)
    res = ddfm_fast.fuse(ir, vi, prior="none", steps=5, device="cpu")
    I = io.reflect_pad_to_multiple(io.to_model_range(io.read_gray(vi)))  # noqa: E741
    V = io.reflect_pad_to_multiple(io.to_model_range(io.read_gray(ir)))
    F = fuse_em_only(I, V, SamplerConfig(prior="none", steps=5))[0, 0, :50, :70]
    np.testing.assert_array_equal(res.fused, io.to_uint8_official(io.minmax_0_255(F.numpy())))
    with pytest.raises(ValueError, match="no model"):
        ddfm_fast.fuse(ir, vi, prior="none", model=tiny)


def test_missing_image_is_named(tiny, tmp_path):
    with pytest.raises(io.ImageReadError, match="nope.png: no such file"):
        ddfm_fast.fuse(tmp_path / "nope.png", tmp_path / "nope2.png", model=tiny, steps=2, device="cpu")


def test_initial_noise_is_the_official_cpu_draw(sampler_golden):
    torch.testing.assert_close(initial_noise((1, 3, 64, 96), 3407), _t(sampler_golden, "x_start"), rtol=0, atol=0)


def test_sampler_rejects_bad_inputs(tiny):
    s = DDFMSampler(SamplerConfig(steps=2))
    with pytest.raises(ValueError, match="x_start must be"):
        s.sample(tiny, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="I must be"):
        s.sample(tiny, torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="tau_reduce"):
        SamplerConfig(steps=2, tau_reduce="pixel")


def test_compat_rejects_what_ddfm_does_not_use():
    with pytest.raises(NotImplementedError, match="ddpm"):
        create_sampler(sampler="ddpm", timestep_respacing=10)
    with pytest.raises(NotImplementedError, match="dynamic_threshold"):
        create_sampler(dynamic_threshold=True, timestep_respacing=10)


def test_compat_create_model_is_strict(reference_dir, tmp_path):
    from ddfm_fast.checkpoint import CheckpointError
    from ddfm_fast.compat import create_model

    import json
    cfg = json.loads((reference_dir / "tiny_unet_config.json").read_text())
    model = create_model(**cfg, model_path=str(reference_dir / "tiny_unet.pt"))
    assert sum(p.numel() for p in model.parameters()) == 4_474_662
    with pytest.raises(CheckpointError, match="missing.pt"):
        create_model(**cfg, model_path=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="model_path"):
        create_model(**cfg)
