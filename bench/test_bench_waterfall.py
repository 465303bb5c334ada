"""The fast-path waterfall as a pytest-benchmark suite (the same rows as ``ddfm-fast bench``).

    pytest bench/test_bench_waterfall.py --benchmark-only                 # CUDA: paper-size model, 480x640
    DDFM_BENCH_SIZE=64x64 pytest bench/test_bench_waterfall.py ...        # any size; CPU runs the CPU-able rows

Each benchmark records, beside its time, the PSNR of its 8-bit output against the fp32 row's output and the
device / versions (``benchmark.extra_info``). Random weights with the paper model's cost (see benchmarks.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from ddfm_fast import benchmarks
from ddfm_fast.fast import FastDDFMSampler
from ddfm_fast.unet import ADM256_UNCOND_CONFIG

from conftest import device_info

SIZE = tuple(int(v) for v in os.environ.get("DDFM_BENCH_SIZE", "480x640").split("x"))
STEPS = int(os.environ.get("DDFM_BENCH_STEPS", "100" if torch.cuda.is_available() else "2"))
ROWS = {row.name: row for row in benchmarks.WATERFALL}


@pytest.fixture(scope="module")
def setup(bench_device):
    config = ADM256_UNCOND_CONFIG if bench_device.type == "cuda" else benchmarks._small_config()
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

    run()  # compile / capture outside the timed rounds
    out = benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(device_info(), row=name, size=f"{SIZE[0]}x{SIZE[1]}", steps=STEPS,
                                psnr_vs_fp32_db=benchmarks.psnr_8bit(out, reference))
