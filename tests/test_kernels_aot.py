"""The Triton kernels compile for real GPUs, on this GPU-less machine.

The rest of the kernel tests run Triton's interpreter, which accepts programs the GPU compiler rejects (and says
nothing about registers). Here ``tests/aot_kernels.py`` drives the launchers with the GPU tile shapes, captures
every launch, specialises it as Triton does for a GPU launch, and compiles it with Triton's own pipeline down to a cubin for sm_80 (A100) and sm_90 (H100/H200),
through the ptxas that ships in the Triton wheel. Running the cubins still needs a GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="this Triton build has no NVIDIA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(HERE / "aot_kernels.py"), "80", "90"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_variant_compiles_to_a_cubin(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_em_pre_kernel", "_em_post_kernel", "_tau_finish_kernel"}
    assert {r["arch"] for r in compiled} == {"sm_80", "sm_90a"}
    for r in compiled:
        assert {"ttir", "ttgir", "llir", "ptx", "cubin"} <= set(r["stages"]), r
        assert r["options"]["enable_fp_fusion"] is False  # the bitwise-faithful arithmetic needs no FMA contraction
    post = [r["constexprs"] for r in compiled if r["kernel"] == "_em_post_kernel"]
    # The switches the product uses, both ways: sampler step and EM-only step, soft and shrink, clip or not.
    for switch in ("FROM_RGB", "SOFT", "CLIP"):
        assert {c[switch] for c in post} == {True, False}, switch
    assert any(r["constexprs"].get("SEG_ITERS", 1) > 1 for r in compiled)  # the looping tau reduction
    # Specialised as a GPU launch is: unit column strides become constants, aligned pointers get divisibility 16
    # (what lets the compiler vectorise the loads); otherwise the registers below would describe another kernel.
    for r in compiled:
        if r["kernel"] != "_tau_finish_kernel":
            assert {"s_sw", "i_sw", "v_sw"} <= set(r["specialised_to_1"]) and r["divisible_by_16"] >= 20, r


def test_no_register_spills_and_room_for_two_blocks_per_sm(compiled):
    for r in compiled:
        assert r["spill_bytes"] == 0, r
        # 65536 registers per SM: <= 128 per thread keeps two 8-warp blocks resident (memory-bound kernels
        # need loads in flight).
        assert r["registers"] is not None and r["registers"] <= 128, r
