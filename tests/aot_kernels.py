"""Compile the Triton step-tail kernels for NVIDIA GPUs on a machine without one (run by test_kernels_aot.py).

Run as a script in its own process with ``TRITON_INTERPRET=0`` (the test process interprets Triton, and the
choice is made when ``@triton.jit`` runs). The launchers in ``kernels/em_tail.py`` are driven on CPU tensors with
the GPU tile shapes; each kernel launch is captured instead of run, then compiled by Triton's own pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin through the ptxas that ships with Triton) for each target, and ptxas -v
reports registers and spills. Prints one JSON list: kernel, target, constexprs, options, registers, spill bytes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ddfm_fast.em import em_init  # noqa: E402
from ddfm_fast.kernels import em_tail  # noqa: E402
from ddfm_fast.sampler import DDFMSampler  # noqa: E402

KERNELS = ("_em_pre_kernel", "_em_post_kernel", "_tau_finish_kernel")
# (batch, H, W, entry point, tv_prox, tau_reduce, clip): the shapes and switches the product launches.
SCENARIOS = (
    (1, 480, 640, "step", "shrink", "batch", True),
    (8, 480, 640, "step", "soft", "image", True),
    (8, 1024, 1280, "step", "shrink", "batch", False),
    (1, 37, 53, "em", "shrink", "batch", True),
    (2, 37, 53, "em", "soft", "image", True),
)


def _type(a: object) -> str:
    if isinstance(a, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float64: "fp64"}[a.dtype]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -2**31 <= a < 2**31 else "i64"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument type {type(a).__name__}")


def capture() -> list[tuple[object, dict, dict, dict]]:
    """Every distinct (kernel, signature, constexprs, options) the launchers produce for SCENARIOS."""
    launches: dict[str, tuple] = {}

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            signature = {name: _type(a) for name, a in zip(kernel.arg_names, args)}
            constexprs = {k: v for k, v in kwargs.items() if k in kernel.arg_names}
            options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
            signature.update({k: "constexpr" for k in constexprs})
            key = json.dumps([kernel.__name__, signature, constexprs, options], sort_keys=True)
            launches[key] = (kernel, signature, constexprs, options)
        return run

    for name in KERNELS:
        kernel = getattr(em_tail, name)
        kernel.run = recorder(kernel)
    gpu_tiles = em_tail.default_tiles
    em_tail.default_tiles = lambda device, h, w: gpu_tiles("cuda", h, w)
    table = DDFMSampler(10).table(torch.device("cpu"))
    for b, h, w, entry, tv_prox, tau_reduce, clip in SCENARIOS:
        I = torch.rand(b, 1, h, w) * 2 - 1  # noqa: E741
        V = torch.rand(b, 1, h, w) * 2 - 1
        tv = dict(tv_prox=tv_prox, tv_threshold=0.01 if tv_prox == "soft" else None)
        if entry == "step":
            x, eps = torch.randn(b, 3, h, w), torch.randn(b, 3, h, w)
            em_tail.step_tail_triton(x, eps, table.coef[0], I, V, em_init(I), lamb=0.5, rho=0.001,
                                     tau_reduce=tau_reduce, clip_denoised=clip, **tv)
        else:
            em_tail.em_step_triton(torch.rand(b, 1, h, w), I, V, em_init(I), 0.5, 0.001, tau_reduce=tau_reduce,
                                   **tv)
    return list(launches.values())


def ptxas_report(ptx: str, capability: int) -> dict:
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        log = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                             check=True, capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"arch": arch, "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None}


def main(capabilities: list[int]) -> list[dict]:
    rows = []
    for kernel, signature, constexprs, options in capture():
        for cap in capabilities:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", cap, 32), options=dict(options))
            rows.append({"kernel": kernel.__name__, "capability": cap, "constexprs": constexprs,
                         "options": options, "stages": sorted(compiled.asm), **ptxas_report(compiled.asm["ptx"], cap)})
    return rows


if __name__ == "__main__":
    print(json.dumps(main([int(c) for c in sys.argv[1:]] or [90])))
