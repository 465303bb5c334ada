"""The shipped analytic prior (``ddfm_fast.shrinkage``): its closed form, how it loads, and what it is for."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddfm_fast
from ddfm_fast.checkpoint import PRESETS, CheckpointError
from ddfm_fast.config import DEFAULT_PRIOR, AccelConfig
from ddfm_fast.schedule import linear_betas
from ddfm_fast.shrinkage import DEFAULT_CONTRAST, DEFAULT_STEPS, ShrinkagePrior

ABAR = np.cumprod(1.0 - linear_betas(1000))


def _x0_of(prior: ShrinkagePrior, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The x0 the returned epsilon implies (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)), in float64."""
    a = torch.from_numpy(np.sqrt(ABAR[t.numpy()])).view(-1, 1, 1, 1)
    s = torch.from_numpy(np.sqrt(1 - ABAR[t.numpy()])).view(-1, 1, 1, 1)
    return (x.double() - s * prior(x, t).double()) / a


@pytest.mark.parametrize("contrast", [0.0, DEFAULT_CONTRAST, 1.0])
def test_the_prediction_is_the_shrunk_gaussian_posterior_mean(contrast: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 20, generator=g) * 0.5 + 0.1
    t = torch.tensor([3, 600])
    z = x.double() / torch.from_numpy(np.sqrt(ABAR[t.numpy()])).view(-1, 1, 1, 1)
    m = z.mean(dim=(-2, -1), keepdim=True)
    expected = m + contrast * torch.from_numpy(ABAR[t.numpy()]).view(-1, 1, 1, 1) * (z - m)
    got = _x0_of(ShrinkagePrior(contrast), x, t)
    # float32 arithmetic on values up to |z| ~ 6: errors ~1e-6; a contrast off by 0.01 moves x0 by ~1e-2.
    assert torch.allclose(got, expected, atol=2e-5, rtol=0)
    if contrast == 0.0:
        assert torch.allclose(got, m.expand_as(got), atol=2e-5)  # a flat image at the mean of each channel


def test_each_image_of_a_batch_gets_its_own_prediction() -> None:
    x = torch.randn(3, 3, 12, 14, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([50, 50, 50])
    prior = ShrinkagePrior()
    batched = prior(x, t)
    for i in range(3):
        assert torch.allclose(prior(x[i:i + 1], t[i:i + 1]), batched[i:i + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("contrast", [-0.1, 1.5, float("nan")])
def test_contrast_outside_0_1_is_refused(contrast: float) -> None:
    with pytest.raises(ValueError, match="contrast"):
        ShrinkagePrior(contrast)


def test_the_default_prior_is_this_prior_built_from_code() -> None:
    assert DEFAULT_PRIOR == "ddfm-shrink" and PRESETS[DEFAULT_PRIOR].analytic
    model = ddfm_fast.load_model(DEFAULT_PRIOR)
    assert isinstance(model, ShrinkagePrior) and model.contrast == DEFAULT_CONTRAST
    assert model.default_steps == DEFAULT_STEPS == PRESETS[DEFAULT_PRIOR].default_steps
    assert sum(p.numel() for p in model.parameters()) == 0
    with pytest.raises(CheckpointError, match="analytic.*no model config"):
        ddfm_fast.load_model(DEFAULT_PRIOR, config={"num_channels": 8})


def _pair(data_dir: Path, h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    def crop(role: str) -> np.ndarray:
        img = Image.open(data_dir / "ivf" / "MSRS" / role / "00004N.png").convert("L")
        return np.asarray(img.crop((200, 150, 200 + w, 150 + h)))

    return crop("ir"), crop("vi")


def test_fuse_without_a_model_runs_it_compiled_or_not(data_dir: Path) -> None:
    ir, vis = _pair(data_dir)
    with pytest.warns(ddfm_fast.api.DefaultPriorNotice, match="ddfm-shrink"):
        default = ddfm_fast.fuse(ir, vis, device="cpu", steps=5)
    explicit = ddfm_fast.fuse(ir, vis, model=ShrinkagePrior(), device="cpu", steps=5)
    assert np.array_equal(default.fused, explicit.fused)
    em_only = ddfm_fast.fuse(ir, vis, prior="none", steps=5, device="cpu")
    assert np.abs(default.fused.astype(int) - em_only.fused.astype(int)).mean() > 1  # not the average
    compiled = ddfm_fast.fuse(ir, vis, model=ShrinkagePrior(), device="cpu", steps=5,
                              accel=AccelConfig(compile=True, compile_backend="eager"))
    assert not compiled.plan.fallbacks and compiled.plan.compile
    assert np.abs(compiled.fused.astype(int) - default.fused.astype(int)).max() <= 1


def test_it_beats_em_only_on_training_pool_pairs(data_dir: Path) -> None:
    """The reason this prior ships: on training-pool pairs (never the dev pairs) it beats EM-only fusion on most
    of the paper's six metrics (bench/results/shrinkage_fit.md: all six on 24 pairs, by 1-30 %)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import shrinkage_fit

    root = data_dir / "train"
    if not root.is_dir():
        pytest.skip(f"{root} is absent (the training pool of ../shared/data)")
    data = shrinkage_fit.training_pairs(per_set=2, max_side=192, root=root)
    prior = ddfm_fast.load_model(DEFAULT_PRIOR)
    rows: dict[str, dict[str, list]] = {"prior": {}, "em": {}}
    for name, pairs in data.items():
        rows["prior"][name] = [shrinkage_fit.qr._score(shrinkage_fit.qr._fuse_prior(prior, a, b, 20)[0], a, b)
                               for a, b in pairs]
        rows["em"][name] = [shrinkage_fit.qr._score(shrinkage_fit.qr._fuse_em(a, b, 20)[0], a, b) for a, b in pairs]
    wins, _ = shrinkage_fit._compare(shrinkage_fit._set_means(rows["prior"]), shrinkage_fit._set_means(rows["em"]))
    assert wins >= 4, wins
