"""The sampling rows of ``ddfm-fast bench`` as a pytest-benchmark suite, at one size.

    pytest bench/test_bench_waterfall.py --benchmark-only                 # CUDA: paper-size model, 480x640
    DDFM_BENCH_SIZE=64x64 pytest bench/test_bench_waterfall.py ...        # any size; a CPU runs the CPU rows
    DDFM_UPSTREAM=~/MMIF-DDFM pytest bench/test_bench_waterfall.py ...    # also time the official sampler

On CUDA the rows are the gpu suite's sampling rows at batch 1 (fp32 reference in true fp32, the fast path, without
graphs, fp16 eager, TF32, and the opt-in max-autotune and channels_last rows); on a CPU the cpu suite's rows.
Each benchmark records, beside its time, the PSNR of its 8-bit output against the true-fp32 reference, the float32
switches and the device / versions (``benchmark.extra_info``). Random weights with the model's cost (see
``ddfm_fast.benchmarks``). The bench command's gate and report are not here: this is for repeated, focused runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import device_info
from ddfm_fast import benchmarks, precision
from ddfm_fast.config import SamplerConfig
from ddfm_fast.sampler import DDFMSampler
from ddfm_fast.unet import ADM256_UNCOND_CONFIG, UNetConfig

SIZE = tuple(int(v) for v in os.environ.get("DDFM_BENCH_SIZE", "480x640").split("x"))
STEPS = int(os.environ.get("DDFM_BENCH_STEPS", "100" if torch.cuda.is_available() else "2"))
UPSTREAM = os.environ.get("DDFM_UPSTREAM")


def _rows() -> dict[str, benchmarks.Row]:
    if torch.cuda.is_available():
        jobs = benchmarks.gpu_plan(max_autotune=True, channels_last=True).jobs()
        rows = [r for r in jobs if r.kind == benchmarks.SAMPLE and r.batch == 1 and r.size == benchmarks.GPU_SIZE]
    else:
        rows = list(benchmarks.plan_for("cpu").jobs())
    named: dict[str, benchmarks.Row] = {}
    for r in rows:
        named.setdefault(r.name, r)
    return named


ROWS = _rows()


@pytest.fixture(scope="module")
def setup(bench_device):
    # The official code cannot build the shipped small prior's layout; with DDFM_UPSTREAM the CPU uses the tiny ADM.
    cpu_config = (UNetConfig.from_create_model_args(benchmarks.TINY_ADM_ARGS) if UPSTREAM
                  else benchmarks._small_config())
    config = ADM256_UNCOND_CONFIG if bench_device.type == "cuda" else cpu_config
    base = benchmarks.random_model(config, device=bench_device)
    inputs = benchmarks._inputs(1, *SIZE, bench_device)
    with torch.no_grad(), precision.tf32(False):
        reference = DDFMSampler(SamplerConfig(steps=STEPS, tau_reduce="image"),
                                benchmarks.REFERENCE_ROW.accel).sample(base, *inputs).sample
    return config, base, inputs, reference


@pytest.mark.parametrize("name", list(ROWS))
def test_waterfall_row(benchmark, setup, bench_device, name):
    row = ROWS[name]
    config, base, inputs, reference = setup
    torch._dynamo.reset()
    sampler = DDFMSampler(SamplerConfig(steps=STEPS, tau_reduce="image"), row.accel)

    def run():
        with torch.no_grad():
            res = sampler.sample(base, *inputs)
        if bench_device.type == "cuda":
            torch.cuda.synchronize()
        return res

    try:
        with precision.tf32(row.tf32) as flags:
            warm = run()  # compile / capture outside the timed rounds
            res = benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        sampler.close()  # free this row's buffers and graph pool before the next row
    assert not res.plan.fallbacks, res.plan.describe()  # a fallback would time the slow path under this name
    benchmark.extra_info.update(device_info(), row=name, size=f"{SIZE[0]}x{SIZE[1]}", steps=STEPS, precision=flags,
                                plan=res.plan.describe(), compile_s=warm.compile_seconds,
                                psnr_vs_fp32_db=benchmarks.psnr_8bit(res.sample, reference))


def test_official_sampler(benchmark, setup, bench_device):
    """The official MMIF-DDFM sampler itself (``DDFM_UPSTREAM`` = a clone), same model weights and inputs."""
    if not UPSTREAM:
        pytest.skip("set DDFM_UPSTREAM to a clone of github.com/Zhaozixiang1228/MMIF-DDFM to time the official code")
    from ddfm_fast import upstream

    config, base, inputs, reference = setup
    root = upstream.check_clone(Path(UPSTREAM))
    with precision.tf32(False), upstream.OfficialSampler(root, config, base.state_dict(), bench_device) as official:

        def run():
            out = official.sample(*inputs, STEPS)
            if bench_device.type == "cuda":
                torch.cuda.synchronize()
            return out

        official.sample(*inputs, 2)  # cuDNN / allocator warm-up
        out = benchmark.pedantic(run, rounds=3, iterations=1)
        notes = official.notes
    benchmark.extra_info.update(device_info(), row=benchmarks.UPSTREAM_ROW, size=f"{SIZE[0]}x{SIZE[1]}",
                                steps=STEPS, psnr_vs_fp32_db=benchmarks.psnr_8bit(out, reference), notes=notes)
