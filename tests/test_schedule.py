"""Schedule and respacing against ``schedule.npz`` (made by the official guided-diffusion code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddfm_fast.schedule import SQRT_1M_AC_PREV, SQRT_AC_PREV, C1, C2, Schedule, linear_betas, space_timesteps

FIELDS = ["timestep_map", "betas", "alphas_cumprod", "alphas_cumprod_prev",
          "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"]


@pytest.fixture(scope="module")
def golden(reference_dir):
    return dict(np.load(reference_dir / "schedule.npz"))


def test_base_betas_bitwise(golden):
    np.testing.assert_array_equal(linear_betas(), golden["base/betas"])
    np.testing.assert_array_equal(np.cumprod(1.0 - linear_betas()), golden["base/alphas_cumprod"])


@pytest.mark.parametrize("respacing", [10, 25, 50, 100, 1000, "10", "100"])
def test_respaced_schedule_bitwise(golden, respacing):
    s = Schedule.create(respacing)
    r = int(respacing)
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(s, field), golden[f"r{r}/{field}"], err_msg=field)


@pytest.mark.parametrize("r", [10, 25, 50, 100, 1000])
def test_step_table_matches_float32_values(golden, r):
    """The table rows are the float32 values the official sampler multiplies, in loop order (idx N-1 .. 0)."""
    table = Schedule.create(r).table()
    order = np.arange(r - 1, -1, -1)
    np.testing.assert_array_equal(table.coef[:, C1].numpy(), golden[f"r{r}/sqrt_recip_alphas_cumprod_f32"][order])
    np.testing.assert_array_equal(table.coef[:, C2].numpy(), golden[f"r{r}/sqrt_recipm1_alphas_cumprod_f32"][order])
    ac_prev = torch.from_numpy(golden[f"r{r}/alphas_cumprod_prev_f32"][order])
    np.testing.assert_array_equal(table.coef[:, SQRT_AC_PREV].numpy(), torch.sqrt(ac_prev).numpy())
    np.testing.assert_array_equal(table.coef[:, SQRT_1M_AC_PREV].numpy(), torch.sqrt(1 - ac_prev).numpy())
    np.testing.assert_array_equal(table.model_t.numpy(), golden[f"r{r}/timestep_map"][order])
    assert table.coef.dtype == torch.float32 and table.model_t.dtype == torch.int64


def test_model_timesteps_of_the_goldens(sampler_golden):
    for n in (10, 100):
        table = Schedule.create(n).table()
        np.testing.assert_array_equal(table.model_t.numpy(), sampler_golden[f"ddim{n}/model_t"])
        np.testing.assert_array_equal(table.spaced_idx.numpy(), sampler_golden[f"ddim{n}/step_idx"])


def test_ddim_stride_differs_from_fractional():
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 10) == space_timesteps(1000, "10") == space_timesteps(1000, [10])


def test_comma_sections():
    # guided-diffusion's docstring example: 300 steps in three sections of 10, 15 and 20.
    steps = space_timesteps(300, "10,15,20")
    assert len(steps) == 45
    assert steps[:2] == [0, 11] and steps[10] == 100 and steps[-1] == 299


@pytest.mark.parametrize("bad", ["ddim999", "abc", "ddimX", "2000", 0])
def test_bad_respacing_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="respacing|steps|section|stride"):
        space_timesteps(1000, bad)
