"""End-to-end sampler benchmark: the tiny reference UNet, 10 DDIM+EM steps, 64x96, plain-torch path.

    OMP_NUM_THREADS=1 pytest bench/test_bench_sampler.py --benchmark-only

The tiny model has random weights; the cost is what matters here. The paper model's waterfall is the GPU suite.
"""

from __future__ import annotations

import pytest
import torch

import ddfm_fast
from ddfm_fast.config import AccelConfig, SamplerConfig
from ddfm_fast.sampler import DDFMSampler

from conftest import device_info


@pytest.fixture(scope="module")
def tiny(reference_dir, bench_device):
    ref = reference_dir
    return ddfm_fast.load_model(ref / "tiny_unet.pt", config=ref / "tiny_unet_config.json", device=bench_device)


@pytest.mark.parametrize("steps", [10])
def test_sampler_tiny(benchmark, tiny, bench_device, steps):
    h, w = 64, 96
    gen = torch.Generator().manual_seed(0)
    x_start = torch.randn(1, 3, h, w, generator=gen).to(bench_device)
    I = (torch.rand(1, 1, h, w, generator=gen) * 2 - 1).to(bench_device)  # noqa: E741
    V = (torch.rand(1, 1, h, w, generator=gen) * 2 - 1).to(bench_device)
    sampler = DDFMSampler(SamplerConfig(steps=steps, tau_reduce="batch"), AccelConfig(backend="torch"))
    benchmark.extra_info.update(device_info(), size=f"{h}x{w}", steps=steps, model="tiny_unet (4.47 M)")
    result = benchmark.pedantic(lambda: sampler.sample(tiny, x_start, I, V), rounds=5, iterations=1, warmup_rounds=1)
    assert not result.plan.fallbacks, result.plan.describe()
    assert torch.isfinite(result.sample).all()
