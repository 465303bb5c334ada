"""Compile the Triton step-tail kernels for NVIDIA GPUs on a machine without one (run by test_kernels_aot.py).

Run as a script in its own process with ``TRITON_INTERPRET=0`` (the test process interprets Triton, and the
choice is made when ``@triton.jit`` runs). The launchers in ``kernels/em_tail.py`` are driven on CPU tensors with
the GPU tile shapes; each kernel launch is captured instead of run, specialised exactly as ``JITFunction.run``
does on a GPU (Triton's own binder and ``_pack_args`` with the target's backend: integer arguments equal to 1
become constants, pointers and integers divisible by 16 get the divisibility attribute), and compiled by Triton's
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the ptxas that ships with Triton); ptxas -v reports
registers and spills. Prints one JSON list: kernel, target, constexprs, options, registers, spill bytes.
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
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from ddfm_fast.em import em_init  # noqa: E402
from ddfm_fast.kernels import em_tail  # noqa: E402
from ddfm_fast.schedule import Schedule  # noqa: E402

KERNELS = ("_em_pre_kernel", "_em_post_kernel", "_tau_finish_kernel")
# (batch, H, W, entry point, tv_prox, tau_reduce, clip): the shapes and switches the product launches.
SCENARIOS = (
    (1, 480, 640, "step", "shrink", "batch", True),
    (8, 480, 640, "step", "soft", "image", True),
    (8, 1024, 1280, "step", "shrink", "batch", False),
    (1, 37, 53, "em", "shrink", "batch", True),
    (2, 37, 53, "em", "soft", "image", True),
)


def capture() -> list[tuple[object, tuple, dict]]:
    """Every distinct kernel launch (kernel, positional args, keyword args) the launchers make for SCENARIOS."""
    launches: dict[str, tuple] = {}

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            described = [(type(a).__name__, a.dtype, a.stride(), a.data_ptr() % 16) if isinstance(a, torch.Tensor)
                         else a for a in args]
            launches[repr((kernel.__name__, described, sorted(kwargs.items())))] = (kernel, args, kwargs)
        return run

    for name in KERNELS:
        kernel = getattr(em_tail, name)
        kernel.run = recorder(kernel)
    gpu_tiles = em_tail.default_tiles
    em_tail.default_tiles = lambda device, h, w: gpu_tiles("cuda", h, w)
    table = Schedule.create(10).table("cpu")
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


def specialise(kernel, args: tuple, kwargs: dict, backend) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as ``JITFunction.run`` computes them for ``backend``'s target."""
    kwargs = {**kwargs, "debug": False}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


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
    seen: set[str] = set()
    for kernel, args, kwargs in capture():
        for cap in capabilities:
            target = GPUTarget("cuda", cap, 32)
            signature, constexprs, attrs, options = specialise(kernel, args, kwargs, make_backend(target))
            key = repr((kernel.__name__, cap, signature, sorted(constexprs.items()), sorted(attrs.items())))
            if key in seen:
                continue
            seen.add(key)
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            named = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
            rows.append({"kernel": kernel.__name__, "capability": cap,
                         "constexprs": {k: v for k, v in named.items() if k in kwargs},
                         "specialised_to_1": sorted(k for k, v in named.items() if k not in kwargs),
                         "divisible_by_16": len(attrs),
                         "options": {k: kwargs[k] for k in ("num_warps", "enable_fp_fusion") if k in kwargs},
                         "stages": sorted(compiled.asm), **ptxas_report(compiled.asm["ptx"], cap)})
    return rows


if __name__ == "__main__":
    print(json.dumps(main([int(c) for c in sys.argv[1:]] or [90])))
