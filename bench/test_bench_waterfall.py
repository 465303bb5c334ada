"""The fast-path waterfall as a pytest-benchmark suite (the same rows as ``ddfm-fast bench``).

    pytest bench/test_bench_waterfall.py --benchmark-only                 # CUDA: paper-size model, 480x640
    DDFM_BENCH_SIZE=64x64 pytest bench/test_bench_waterfall.py ...        # any size; CPU runs the CPU-able rows
    DDFM_UPSTREAM=~/MMIF-DDFM pytest bench/test_bench_waterfall.py ...    # also time the official sampler

Each benchmark records, beside its time, the PSNR of its 8-bit output against the fp32 row's output and the
device / versions (``benchmark.extra_info``). Random weights with the paper model's cost (see benchmarks.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ddfm_fast import benchmarks
from ddfm_fast.fast import FastDDFMSampler
from ddfm_fast.unet import ADM256_UNCOND_CONFIG, UNetConfig

from conftest import device_info

SIZE = tuple(int(v) for v in os.environ.get("DDFM_BENCH_SIZE", "480x640").split("x"))
STEPS = int(os.environ.get("DDFM_BENCH_STEPS", "100" if torch.cuda.is_available() else "2"))
ROWS = {row.name: row for row in (*benchmarks.WATERFALL, *benchmarks.GPU_VARIANTS, *benchmarks.CPU_VARIANTS)}
UPSTREAM = os.environ.get("DDFM_UPSTREAM")


@pytest.fixture(scope="module")
def setup(bench_device):
    # The official code cannot build the shipped small prior's layout; with DDFM_UPSTREAM the CPU uses the tiny ADM.
    cpu_config = (UNetConfig.from_create_model_args(benchmarks.TINY_ADM_ARGS) if UPSTREAM
                  else benchmarks._small_config())
    config = ADM256_UNCOND_CONFIG if bench_device.type == "cuda" else cpu_config
    base = benchmarks.random_model(config, device=bench_device)
    inputs = benchmarks._inputs(1, *SIZE, bench_device)
    with torch.no_grad():
        reference = FastDDFMSampler(STEPS, backend="torch").sample(base, *inputs).sample
    return config, inputs, reference


@pytest.mark.parametrize("name", list(ROWS))
def test_waterfall_row(benchmark, setup, bench_device, name):
    row = ROWS[name]
    if bench_device.type != "cuda" and (row.backend == "triton" or row.options.cuda_graphs
                                        or row.options.dtype == torch.float16):
        pytest.skip(f"{name}: a CUDA row")
    if bench_device.type == "cuda" and row in benchmarks.CPU_VARIANTS:
        pytest.skip(f"{name}: a CPU variant")
    config, inputs, reference = setup
    torch._dynamo.reset()
    model = benchmarks.random_model(config, device=bench_device)  # each row casts its own copy
    sampler = FastDDFMSampler(STEPS, backend=row.backend, options=row.options)

    def run():
        with benchmarks._attention(row.math_attention), torch.no_grad():
            out = sampler.sample(model, *inputs).sample
        if bench_device.type == "cuda":
            torch.cuda.synchronize()
        return out

    try:
        run()  # compile / capture outside the timed rounds
        out = benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        sampler.close()  # free this row's buffers and graph pool before the next row
    benchmark.extra_info.update(device_info(), row=name, size=f"{SIZE[0]}x{SIZE[1]}", steps=STEPS,
                                psnr_vs_fp32_db=benchmarks.psnr_8bit(out, reference))


def test_official_sampler(benchmark, setup, bench_device):
    """The official MMIF-DDFM sampler itself (``DDFM_UPSTREAM`` = a clone), same model weights and inputs."""
    if not UPSTREAM:
        pytest.skip("set DDFM_UPSTREAM to a clone of github.com/Zhaozixiang1228/MMIF-DDFM to time the official code")
    from ddfm_fast import upstream

    config, inputs, reference = setup
    model = benchmarks.random_model(config, device=bench_device)
    root = upstream.check_clone(Path(UPSTREAM))
    with upstream.OfficialSampler(root, config, model.state_dict(), bench_device) as official:

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
