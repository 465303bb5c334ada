"""Speed of ddfm_fast.metrics.evaluate on one 640x480 triple (pytest-benchmark), beside its accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/test_bench_metrics.py --benchmark-columns=min,median,max

Uses the MSRS pair 00004N of shared/data (640x480, F = round((A + B) / 2)) when it is there and checks the
result against METRICS.md's known values, so a fast-but-wrong change cannot post a good time; without the
data it falls back to a synthetic triple of the same size. Threads: OMP_NUM_THREADS also limits the BLAS
behind the VIF filters; set it to 1 for per-core numbers.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pytest

from ddfm_fast.metrics import evaluate, read_gray_eval

SHARED = Path(os.environ.get("DDFM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MSRS = SHARED / "data" / "ivf" / "MSRS"
# METRICS.md, "Known values", row "ivf/MSRS 00004N.png (ir, vi)".
MSRS_KNOWN = dict(EN=5.3473, SD=17.2973, SF=3.6399, AG=1.1266, MI=1.7041, SCD=1.1520, VIF=0.6160, Qabf=0.3313,
                  SSIM=0.9660, MSE=328.9336, PSNR=21.5180, CC=0.7200)


def _triple():
    ir, vi = MSRS / "ir" / "00004N.png", MSRS / "vi" / "00004N.png"
    if ir.exists() and vi.exists():
        a, b = read_gray_eval(ir), read_gray_eval(vi)
        return "MSRS 00004N", np.round((a + b) / 2), a, b
    y, x = np.mgrid[0:480, 0:640]
    rng = np.random.default_rng(0)
    a = np.clip((x // 3 + y // 2) % 256 + rng.integers(0, 30, (480, 640)), 0, 255).astype(np.float32)
    b = np.clip(128 + 100 * np.sin(x / 40) * np.cos(y / 30) + rng.normal(0, 5, (480, 640)), 0, 255)
    b = np.round(b).astype(np.float32)
    return "synthetic", np.round((a + b) / 2), a, b


def test_bench_evaluate_640x480(benchmark):
    name, f, a, b = _triple()
    assert f.shape == (480, 640)
    benchmark.extra_info.update(image=name, shape="480x640", cpu=platform.processor() or platform.machine(),
                                numpy=np.__version__, omp_num_threads=os.environ.get("OMP_NUM_THREADS", "unset"))
    got = benchmark(evaluate, f, a, b)
    if name.startswith("MSRS"):
        worst = max(abs(got[k] - v) for k, v in MSRS_KNOWN.items())
        benchmark.extra_info["max_abs_dev_from_known"] = worst
        assert all(got[k] == pytest.approx(v, abs=5e-5, rel=1e-6) for k, v in MSRS_KNOWN.items()), got
