"""GPU correctness: the Triton kernels compiled for real, the fp16 / compiled / graphed paths against fp32.

Skipped without CUDA. ``ddfm-fast bench --suite gpu`` runs this file (with TRITON_INTERPRET=0, the goldens from
``--reference`` and DDFM_REQUIRE_REFERENCE=1, so a missing golden fails) before its benchmarks. Tolerances:
cuFFT and cuDNN round differently from the CPU libraries the goldens were made with, by the same order as two
CPUs do (see test_em.py / test_sampler.py), so the CPU bounds apply unchanged -- in true fp32 only. cuDNN
convolutions default to TF32 on Ampere and later, which on the tiny UNet moves one forward by ~9e-3 and a
10-step sample by ~7e-2 (an emulation of TF32 convolutions on the CPU), far past the 1e-3 bound; every test here
runs with TF32 off (``precision.tf32(False)``, also set for the whole session by conftest) and checks it is off.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import ddfm_fast
from ddfm_fast import precision
from ddfm_fast.benchmarks import psnr_8bit
from ddfm_fast.config import AccelConfig, SamplerConfig
from ddfm_fast.em import em_init, em_step
from ddfm_fast.sampler import DDFMSampler

TEN = SamplerConfig(steps=10, tau_reduce="batch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by ddfm-fast bench --suite gpu)"),
]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def true_fp32():
    """Every comparison with the CPU goldens runs in true fp32: no TF32 in cuDNN or cuBLAS."""
    with precision.tf32(False) as flags:
        assert not flags["tf32"], flags
        yield flags


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tiny(tiny_unet_files):
    weights, config = tiny_unet_files
    return ddfm_fast.load_model(weights, config=config, device=CUDA)


@pytest.fixture(scope="module")
def tiny(tiny_unet_files):
    return _tiny(tiny_unet_files)


@pytest.fixture(scope="module")
def inputs(sampler_golden):
    return tuple(torch.from_numpy(sampler_golden[k]).to(CUDA) for k in ("x_start", "I", "V"))


def test_true_fp32_is_in_force(true_fp32):
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [f"case{i}" for i in range(6)])
def test_em_chain_on_cuda(em_golden, case, backend):
    if backend == "triton" and _interpreted():
        pytest.skip("TRITON_INTERPRET=1: the kernels would not be compiled for the GPU")
    g = {k: torch.from_numpy(v).to(CUDA) if isinstance(v, np.ndarray) and v.ndim else v for k, v in em_golden.items()}
    I, V = g[f"{case}/in/I"], g[f"{case}/in/V"]  # noqa: E741
    lamb, rho = float(em_golden[f"{case}/param/lamb"]), float(em_golden[f"{case}/param/rho"])
    state = em_init(I)
    f = g[f"{case}/in/f_pre_step1"]
    for step in (1, 2, 3):
        f = g.get(f"{case}/in/f_pre_step{step}", f)
        F, state = em_step(f, I, V, state, lamb, rho, backend=backend)
        torch.testing.assert_close(F, g[f"{case}/out/F_step{step}"], rtol=0, atol=1e-6)
        torch.testing.assert_close(state.H, g.get(f"{case}/out/H_step{step}", state.H), rtol=0, atol=1.5e-6)
        f = F


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tiny_sampler_on_cuda_matches_the_official_run(tiny, inputs, sampler_golden, backend):
    if backend == "triton" and _interpreted():
        pytest.skip("TRITON_INTERPRET=1")
    res = DDFMSampler(TEN, AccelConfig(backend=backend)).sample(tiny, *inputs)
    assert res.plan.backend == backend and res.plan.dtype == "fp32" and not res.plan.fallbacks, res.plan.describe()
    torch.testing.assert_close(res.sample.cpu(), torch.from_numpy(sampler_golden["ddim10/final"]), rtol=0,
                               atol=1e-3)


def test_graphs_replay_the_compiled_step_exactly(tiny_unet_files, inputs):
    """A captured graph replays the same kernels: bitwise equal to the compiled step run without graphs."""
    def run(graphs: bool) -> torch.Tensor:
        torch._dynamo.reset()
        # Inductor's default mode (what --fast uses): max-autotune's kernel search would take minutes of the
        # suite's time limit and is not what this test is about (the bench command measures it on request).
        opts = AccelConfig(dtype="fp16", compile=True, compile_mode="default", cuda_graphs=graphs)
        res = DDFMSampler(TEN, opts).sample(_tiny(tiny_unet_files), *inputs)
        assert res.plan.cuda_graphs == graphs and res.plan.compile and not res.plan.fallbacks, res.plan.describe()
        return res.sample

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=0)


def test_fast_path_stays_close_to_fp32(tiny_unet_files, tiny, inputs):
    """fp16 + compile + Triton tail + graphs (the --fast preset, default compile mode) against the true-fp32 eager
    path, on the 8-bit output.

    The tiny model's random weights make it far more sensitive than a trained one (CPU fp16: 60 dB)."""
    ref = DDFMSampler(TEN, AccelConfig(backend="torch")).sample(tiny, *inputs).sample
    res = DDFMSampler(TEN, AccelConfig.fast()).sample(_tiny(tiny_unet_files), *inputs)
    plan = res.plan
    assert (plan.dtype, plan.compile, plan.compile_mode, plan.cuda_graphs, plan.backend) == (
        "fp16", True, "default", True, "triton"), plan.describe()
    assert not plan.fallbacks, plan.describe()
    assert psnr_8bit(res.sample, ref) >= 40.0


def test_paper_size_model_at_1280x1024_fits_in_12_gib():
    from ddfm_fast.benchmarks import random_model

    torch.cuda.reset_peak_memory_stats()
    model = random_model(device=CUDA)
    x = torch.randn(1, 3, 1024, 1280, device=CUDA)
    I, V = torch.rand(2, 1, 1, 1024, 1280, device=CUDA) * 2 - 1  # noqa: E741
    DDFMSampler(SamplerConfig(steps=2), AccelConfig(dtype="fp16")).sample(model, x, I, V)
    peak = torch.cuda.max_memory_allocated() / 2**30
    assert peak < 12.0, f"peak {peak:.2f} GiB"


def test_graphs_with_one_step(tiny, inputs):
    """The capture's warm-up calls stay inside a one-row step table."""
    res = DDFMSampler(SamplerConfig(steps=1), AccelConfig(cuda_graphs=True)).sample(tiny, *inputs)
    assert res.plan.cuda_graphs and not res.plan.fallbacks, res.plan.describe()
    ref = DDFMSampler(SamplerConfig(steps=1)).sample(tiny, *inputs).sample
    torch.testing.assert_close(res.sample, ref, rtol=0, atol=0)
