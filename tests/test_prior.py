"""The small prior: training (train-prior), the shipped ddfm-small weights, and EM-only fusion (ablation I)."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddfm_fast
from ddfm_fast.checkpoint import PACKAGED_WEIGHTS_DIR, PRESETS, read_checkpoint, resolve_preset
from ddfm_fast.em import em_init, em_step
from ddfm_fast.config import SamplerConfig
from ddfm_fast.em_only import fuse_em_only, postprocess_em_only
from ddfm_fast.train import (
    META_TRAINING,
    Diffusion,
    TrainSettings,
    build_model,
    read_training_record,
    state_path,
    train_prior,
    training_step,
)
from ddfm_fast.unet import DDFM_SMALL_ARGS, UNetConfig, UNetModel

# A UNet small enough to train a few steps in a test (about 60 k parameters).
TINY_ARGS = {
    "image_size": 32, "num_channels": 16, "num_res_blocks": 1, "channel_mult": "1,2", "learn_sigma": False,
    "attention_resolutions": "", "use_scale_shift_norm": True, "norm_groups": 4, "middle_attention": False,
}
SHIPPED = PACKAGED_WEIGHTS_DIR / "ddfm-small.safetensors"


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """Two small images (one gray, one colour) with some structure, in a nested folder."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    yy, xx = np.mgrid[0:40, 0:48]
    gray = (127 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 5, xx.shape)).clip(0, 255)
    Image.fromarray(gray.astype(np.uint8), mode="L").save(root / "a.png")
    rgb = np.stack([gray, gray[::-1], 255 - gray], axis=-1)
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(root / "sub" / "b.png")
    return root


def _settings(image_folder: Path, out: Path, steps: int, **kw) -> TrainSettings:
    return TrainSettings(data=[str(image_folder)], out=str(out), steps=steps, batch_size=2, crop=16, lr=1e-3,
                         warmup=1, checkpoint_every=0, model_args=dict(TINY_ARGS), progress=False,
                         command="test", **kw)


# -- the UNet options for small models ----------------------------------------------------------


def test_middle_attention_option_defaults_to_the_official_layout() -> None:
    assert UNetConfig.from_create_model_args({"image_size": 64, "num_channels": 32, "num_res_blocks": 1}) \
        .middle_attention is True
    cfg = UNetConfig.from_create_model_args(DDFM_SMALL_ARGS)
    assert cfg.middle_attention is False and cfg.attention_resolutions == () and cfg.out_channels == 3
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with torch.device("meta"):
        model = UNetModel(cfg)
    keys = list(model.state_dict())
    assert not any(".qkv." in k or ".proj_out." in k for k in keys)  # no attention anywhere
    assert "middle_block.1.in_layers.0.weight" in keys and not any(k.startswith("middle_block.2") for k in keys)


# -- training -------------------------------------------------------------------------------------


def test_training_images_gray_or_colour(image_folder: Path) -> None:
    from ddfm_fast.train import find_images, read_training_image

    files = find_images([image_folder])
    assert [p.name for p in files] == ["a.png", "b.png"]  # recursive, sorted
    gray_file = read_training_image(files[0], gray=False)
    assert gray_file.shape == (3, 40, 48) and gray_file.dtype == torch.uint8
    assert torch.equal(gray_file[0], gray_file[1]) and torch.equal(gray_file[1], gray_file[2])
    colour = read_training_image(files[1], gray=False)
    assert not torch.equal(colour[0], colour[2])  # colour kept
    made_gray = read_training_image(files[1], gray=True)
    assert torch.equal(made_gray[0], made_gray[2])
    rgb = colour.double()  # BGR2GRAY within rounding
    assert (made_gray[0].double() - (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])).abs().max() <= 0.5 + 1e-6


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = UNetModel(UNetConfig.from_create_model_args(TINY_ARGS))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    diffusion = Diffusion()
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    x0 = torch.sin(xx / 3 + torch.arange(4.0).view(4, 1, 1, 1)) * torch.cos(yy / 4)
    x0 = x0.expand(4, 3, 16, 16).contiguous()
    t = torch.tensor([50, 200, 400, 700])
    noise = torch.randn(x0.shape, generator=gen)
    losses = [training_step(model, opt, diffusion, x0, t, noise) for _ in range(12)]
    print("losses:", [round(v, 4) for v in losses])
    assert losses[-1] < 0.9 * losses[0]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_train_round_trip_metadata_load_and_resume(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run" / "p.safetensors"
    train_prior(_settings(image_folder, out, steps=3), log=lambda m: None)
    assert out.is_file() and state_path(out).is_file()

    _, meta = read_checkpoint(out)
    record = json.loads(meta[META_TRAINING])
    assert record == read_training_record(out)
    assert record["steps_done"] == 3 and record["command"] == "test" and record["num_images"] == 2
    assert record["settings"]["model_args"] == TINY_ARGS and record["settings"]["data"] == [str(image_folder)]
    assert sum(len(range(a, b + 1)) for a, b in (c["steps"] for c in record["loss_curve"])) == 3

    model = ddfm_fast.load_model(out)  # no config argument: the metadata carries it
    assert model.config == UNetConfig.from_create_model_args(TINY_ARGS) and model.default_steps == 10
    assert model(torch.zeros(1, 3, 16, 24), torch.tensor([5])).shape == (1, 3, 16, 24)

    # Resume continues the step count and gives what one uninterrupted run gives.
    train_prior(_settings(image_folder, out, steps=5), log=lambda m: None)
    assert read_training_record(out)["steps_done"] == 5
    straight = tmp_path / "straight" / "p.safetensors"
    train_prior(_settings(image_folder, straight, steps=5), log=lambda m: None)
    resumed, direct = read_checkpoint(out)[0], read_checkpoint(straight)[0]
    for key in direct:
        torch.testing.assert_close(resumed[key], direct[key], rtol=0, atol=0)


def test_resume_refuses_another_architecture(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    train_prior(_settings(image_folder, out, steps=1), log=lambda m: None)
    other = _settings(image_folder, out, steps=2)
    other.model_args = {**TINY_ARGS, "num_channels": 8}
    with pytest.raises(ValueError, match="another architecture"):
        train_prior(other, log=lambda m: None)


def test_resume_refuses_other_training_settings(image_folder: Path, tmp_path: Path) -> None:
    """A resumed run may train longer, not otherwise: another crop, learning rate, seed or data would be recorded
    as if the whole model had been trained with them."""
    out = tmp_path / "p.safetensors"
    train_prior(_settings(image_folder, out, steps=1), log=lambda m: None)
    other_data = tmp_path / "other"
    shutil.copytree(image_folder, other_data)
    for change, words in ((dict(lr=2e-3), "lr 0.001 -> 0.002"), (dict(seed=5), "seed 0 -> 5"),
                          (dict(data=[str(other_data)]), "data [")):
        s = _settings(image_folder, out, steps=2)
        for k, v in change.items():
            setattr(s, k, v)
        with pytest.raises(ValueError, match=re.escape(words)) as err:
            train_prior(s, log=lambda m: None)
        assert "--no-resume" in str(err.value)
    assert read_training_record(out)["steps_done"] == 1  # nothing was trained or saved by the refused runs
    ok = _settings(image_folder, out, steps=2)
    ok.threads, ok.checkpoint_every = 1, 0
    train_prior(ok, log=lambda m: None)
    assert read_training_record(out)["steps_done"] == 2


def test_a_resume_state_of_0_1_0_is_checked_against_its_weights_record(image_folder: Path, tmp_path: Path) -> None:
    """0.1.0 did not keep the settings in the resume state; the weights file beside it records them."""
    out = tmp_path / "p.safetensors"
    train_prior(_settings(image_folder, out, steps=1), log=lambda m: None)
    state = torch.load(state_path(out), weights_only=True)
    del state["settings"]
    torch.save(state, state_path(out))
    changed = _settings(image_folder, out, steps=2)
    changed.seed = 9
    with pytest.raises(ValueError, match="seed 0 -> 9"):
        train_prior(changed, log=lambda m: None)
    train_prior(_settings(image_folder, out, steps=2), log=lambda m: None)
    assert read_training_record(out)["steps_done"] == 2
    out.unlink()  # no record to check against: refused, not trusted
    torch.save(state, state_path(out))
    with pytest.raises(ValueError, match="does not record the settings"):
        train_prior(_settings(image_folder, out, steps=3), log=lambda m: None)


def test_crop_must_fit_the_downsample_factor(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="downsample factor"):
        build_model(TrainSettings(data=[str(image_folder)], out=str(tmp_path / "p.safetensors"), crop=15,
                                  model_args=dict(TINY_ARGS)))


def test_cli_command_records_its_command_line(image_folder: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ddfm_fast.cli_train import train_prior_command

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_ARGS))
    out = tmp_path / "cli.safetensors"
    args = ["--data", str(image_folder), "--out", str(out), "--steps", "2", "--batch-size", "2", "--crop", "16",
            "--model-config", str(cfg), "--default-steps", "7", "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(train_prior_command, args)
    assert result.exit_code == 0, result.output
    record = read_training_record(out)
    assert record["steps_done"] == 2 and record["settings"]["default_steps"] == 7 and record["command"]
    assert ddfm_fast.load_model(out).default_steps == 7
    bad = CliRunner().invoke(train_prior_command, ["--data", str(tmp_path / "nope"), "--out", str(out)])
    assert bad.exit_code != 0 and "nope" in bad.output


# -- the shipped prior ----------------------------------------------------------------------------


def test_packaged_file_is_small_and_needs_nothing_outside_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SHIPPED.is_file(), f"{SHIPPED} is missing: the ddfm-small prior must ship with the package"
    assert SHIPPED.stat().st_size < 10 * 1024 * 1024
    # No network, and an empty weights home: the preset resolves to the package's own file.
    monkeypatch.setenv("DDFM_FAST_HOME", str(tmp_path / "empty-home"))

    def no_network(*args, **kwargs):
        raise AssertionError("loading the shipped prior tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert resolve_preset("ddfm-small") == SHIPPED
    model = ddfm_fast.load_model("ddfm-small")
    assert model.config == UNetConfig.from_create_model_args(PRESETS["ddfm-small"].create_model_args)
    assert model.default_steps == PRESETS["ddfm-small"].default_steps


def test_shipped_prior_was_trained_on_the_training_pool_only() -> None:
    record = read_training_record(SHIPPED)
    assert record["steps_done"] > 0 and record["command"]
    for folder in record["settings"]["data"]:
        parts = Path(folder).parts
        assert "train" in parts and "ivf" not in parts and "mif" not in parts, folder


def test_shipped_prior_fuses_a_real_pair(data_dir: Path) -> None:
    ir = np.asarray(Image.open(data_dir / "ivf/MSRS/ir/00004N.png").convert("L"))[100:196, 200:328]
    vis = np.asarray(Image.open(data_dir / "ivf/MSRS/vi/00004N.png").convert("RGB"))[100:196, 200:328]
    steps = []
    result = ddfm_fast.fuse(ir, vis, model="ddfm-small", device="cpu", callback=lambda s: steps.append(s.j))
    assert len(steps) == ddfm_fast.load_model("ddfm-small").default_steps
    assert result.fused.shape == (96, 128) and result.fused.dtype == np.uint8
    assert result.fused.min() == 0 and result.fused.max() == 255 and result.fused.std() > 10
    # The fused image follows both sources (Pearson correlation with each clearly positive).
    f = result.fused.astype(np.float64).ravel()
    vis_gray = vis.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    for src in (ir.astype(np.float64).ravel(), vis_gray.ravel()):
        assert np.corrcoef(f, src)[0, 1] > 0.3


# -- EM only (ablation I) -------------------------------------------------------------------------


def _sources(shape=(2, 1, 24, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    I = torch.rand(shape, generator=gen) * 2 - 1  # noqa: E741
    V = torch.rand(shape, generator=gen) * 2 - 1
    return I, V


@pytest.mark.parametrize("tau_reduce", ["batch", "image"])
@pytest.mark.parametrize("steps", [1, 5])
def test_em_only_matches_a_hand_rolled_loop(steps: int, tau_reduce: str) -> None:
    I, V = _sources()  # noqa: E741
    got = fuse_em_only(I, V, SamplerConfig(prior="none", steps=steps, lamb=0.4, rho=0.002, tau_reduce=tau_reduce))
    state = em_init(I)
    f = (I + V) / 2
    for _ in range(steps):
        f, state = em_step(f, I, V, state, 0.4, 0.002, tau_reduce)
    assert got.shape == I.shape
    torch.testing.assert_close(got, f, rtol=0, atol=0)


def test_em_only_stays_at_the_average_and_postprocesses() -> None:
    # From f_0 = (I + V) / 2, X = Y / 2: the E-step gives C = D (tau_a = tau_b = 1 at the start and they stay
    # equal), so the least-squares X is Y / 2 again up to the rho-weighted TV term (rho = 0.001). The average is
    # a near-fixed point: measured max |F - (I + V) / 2| = 1.4e-4 after 1 step, 6.8e-5 after 10 (random sources).
    I, V = _sources((1, 1, 24, 40))  # noqa: E741
    F = fuse_em_only(I, V, SamplerConfig(prior="none", steps=10))
    deviation = (F - (I + V) / 2).abs().max().item()
    assert 0 < deviation < 1e-3
    out = postprocess_em_only(F)
    assert out.dtype == np.uint8 and out.shape == (24, 40) and out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_em_only_rejects_bad_steps(bad) -> None:
    I, V = _sources()  # noqa: E741
    with pytest.raises(ValueError, match="steps"):
        fuse_em_only(I, V, SamplerConfig(prior="none", steps=bad))


def test_em_only_soft_tv_differs_from_shrink() -> None:
    """The TV options reach EM-only fusion (they once did not): soft thresholding changes the result."""
    I, V = _sources((1, 1, 24, 40))  # noqa: E741
    shrink = fuse_em_only(I, V, SamplerConfig(prior="none", steps=5))
    soft = fuse_em_only(I, V, SamplerConfig(prior="none", steps=5, tv_prox="soft", tv_threshold=0.01))
    # Measured 2.2e-5 here (EM only stays near the average, so the TV term moves little); ignoring the options
    # gives exactly 0. 1e-6 sits far above float noise of one deterministic run and far below the effect.
    assert (soft - shrink).abs().max().item() > 1e-6


# -- train-prior: bad data, bad options, nothing untrained saved, damaged resume state --------------


def test_unreadable_training_images_are_all_named(image_folder: Path, tmp_path: Path) -> None:
    from ddfm_fast.train import TrainingDataError

    good = (image_folder / "a.png").read_bytes()
    (image_folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (image_folder / "sub" / "text.jpg").write_text("not an image")
    out = tmp_path / "p.safetensors"
    with pytest.raises(TrainingDataError) as err:
        train_prior(_settings(image_folder, out, steps=1), log=lambda m: None)
    msg = str(err.value)
    assert "truncated.png" in msg and "text.jpg" in msg and "2 of 4" in msg and "\n" not in msg
    assert not out.exists() and not state_path(out).exists()


def _cli(args: list[str]):
    from click.testing import CliRunner

    from ddfm_fast.cli_train import train_prior_command

    return CliRunner().invoke(train_prior_command, args)


def test_cli_names_an_unreadable_image_without_a_traceback(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "zero.png").write_bytes(b"")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_ARGS))
    result = _cli(["--data", str(image_folder), "--out", str(tmp_path / "p.safetensors"), "--steps", "1",
                   "--crop", "16", "--model-config", str(cfg), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 1 and "zero.png" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option", ["--steps", "--batch-size", "--crop"])
def test_cli_rejects_zero_sizes(option: str, image_folder: Path, tmp_path: Path) -> None:
    result = _cli(["--data", str(image_folder), "--out", str(tmp_path / "p.safetensors"), option, "0"])
    assert result.exit_code == 2 and option in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.safetensors").exists()


def test_settings_validate_names_the_field(image_folder: Path, tmp_path: Path) -> None:
    for field_name, value, flag in [("steps", 0, "--steps"), ("batch_size", 0, "--batch-size"), ("crop", 0, "--crop"),
                                    ("lr", float("nan"), "--lr"), ("schedule_fraction", 1.5, "--schedule-fraction")]:
        s = _settings(image_folder, tmp_path / "p.safetensors", steps=1)
        setattr(s, field_name, value)
        with pytest.raises(ValueError, match=flag):
            s.validate()


def test_nothing_untrained_is_saved(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    # A time limit that has passed before the first step: no step is done, so no model may be written.
    s = _settings(image_folder, out, steps=5, max_minutes=1e-9)
    with pytest.raises(ValueError, match="no training step"):
        train_prior(s, log=lambda m: None)
    assert not out.exists() and not state_path(out).exists()


def test_truncated_resume_state_is_one_line_naming_the_file(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    train_prior(_settings(image_folder, out, steps=1), log=lambda m: None)
    state = state_path(out)
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        train_prior(_settings(image_folder, out, steps=2), log=lambda m: None)
    assert str(state) in str(err.value) and "\n" not in str(err.value) and "--no-resume" in str(err.value)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_ARGS))
    result = _cli(["--data", str(image_folder), "--out", str(out), "--steps", "2", "--batch-size", "2", "--crop",
                   "16", "--model-config", str(cfg), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 1 and state.name in result.output and "Traceback" not in result.output


def test_holdout_keeps_both_images_of_a_pair_together(tmp_path: Path) -> None:
    from ddfm_fast.train import holdout_pairs

    files = [tmp_path / d / m / f"{k:02d}.png" for d in ("A", "B") for m in ("ir", "vi") for k in range(5)]
    train, held = holdout_pairs(files, 3)
    # Pairs in (folder, stem) order: A/00..A/04, B/00..B/04; indices 0, 3, 6, 9 are held out.
    assert sorted((p.parts[-3], p.stem) for p in held) == sorted(
        [(d, s) for d, s in [("A", "00"), ("A", "03"), ("B", "01"), ("B", "04")] for _ in range(2)])
    assert not set(train) & set(held) and len(train) + len(held) == len(files)
    assert holdout_pairs(files, 0) == (files, [])


def test_schedule_timesteps_share() -> None:
    from ddfm_fast.schedule import space_timesteps
    from ddfm_fast.train import sample_timesteps

    sched = torch.tensor(space_timesteps(1000, 10))
    gen = torch.Generator().manual_seed(0)
    assert set(sample_timesteps(256, gen, sched, 1.0).tolist()) <= set(sched.tolist())
    uniform = sample_timesteps(4096, gen, sched, 0.0)
    # Uniform on 0..999: 4096 draws land on the 10 scheduled values about 41 times; 200 would mean a bias.
    assert int(torch.isin(uniform, sched).sum()) < 200 and uniform.max() > 900 and uniform.min() < 100


# -- the optional architecture features of small priors -------------------------------------------------


def test_v_prediction_returns_epsilon_and_trains_on_v(image_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = UNetConfig.from_create_model_args({**TINY_ARGS, "prediction": "v"})
    model = UNetModel(cfg)
    for p in model.out.parameters():  # the output conv starts at zero; give it weights so v is not 0
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    ac = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))[t].float().view(-1, 1, 1, 1)
    v = model.net_output(x, t)
    torch.testing.assert_close(model(x, t), (1 - ac).sqrt() * x + ac.sqrt() * v)
    assert "sqrt_ac" not in model.state_dict()  # the schedule is not part of the weights
    out = tmp_path / "v.safetensors"
    s = _settings(image_folder, out, steps=2)
    s.model_args = {**TINY_ARGS, "prediction": "v"}
    train_prior(s, log=lambda m: None)
    assert ddfm_fast.load_model(out).config.prediction == "v"
    assert read_training_record(out)["objective"].startswith("v MSE")


def test_stem_unshuffle_keeps_the_keys_and_runs_at_half_resolution() -> None:
    plain = UNetModel(UNetConfig.from_create_model_args(TINY_ARGS))
    cfg = UNetConfig.from_create_model_args({**TINY_ARGS, "stem_unshuffle": 2})
    folded = UNetModel(cfg)
    assert cfg.downsample_factor == 4 and list(plain.state_dict()) == list(folded.state_dict())
    assert folded.input_blocks[0][0].weight.shape[1] == 12 and folded.out[2].weight.shape[0] == 12
    assert folded(torch.randn(1, 3, 16, 24), torch.tensor([5])).shape == (1, 3, 16, 24)
    with pytest.raises(ValueError, match="stem_unshuffle"):
        UNetConfig.from_create_model_args({**TINY_ARGS, "stem_unshuffle": 0})
    with pytest.raises(ValueError, match="prediction"):
        UNetConfig.from_create_model_args({**TINY_ARGS, "prediction": "x0"})


# -- the allocator setting of the command line -----------------------------------------------------------


def test_malloc_tuning_in_a_fresh_process() -> None:
    import os
    import platform
    import subprocess
    import sys

    code = "from ddfm_fast._alloc import keep_freed_memory as k; r = k(); print(r.applied, '|', r.reason)"
    env = {**os.environ}
    env.pop("DDFM_FAST_MALLOC", None)
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    expect_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert got.startswith(str(expect_glibc)), got
    off = subprocess.run([sys.executable, "-c", code], env={**env, "DDFM_FAST_MALLOC": "default"},
                         capture_output=True, text=True, check=True).stdout
    assert off.startswith("False") and "DDFM_FAST_MALLOC=default" in off


def test_the_command_line_tunes_malloc_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import ddfm_fast._alloc as alloc
    from ddfm_fast.cli import main

    calls = []
    monkeypatch.setattr(alloc, "keep_freed_memory", lambda **kw: calls.append(kw))
    CliRunner().invoke(main, ["train-prior", "--data", str(tmp_path), "--out", str(tmp_path / "p"), "--steps", "0"])
    assert calls == [{"announce": True}]
