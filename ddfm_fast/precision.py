"""True fp32 or TF32 for the float32 parts of a run: one switch, recorded, restored.

On NVIDIA GPUs since Ampere, cuDNN convolutions default to TF32 (a 10-bit mantissa) for float32 tensors, and
``torch.set_float32_matmul_precision("high")`` lets cuBLAS matmuls do the same. A float32 run compared with
golden vectors made on a CPU (23-bit mantissa throughout) then compares TF32 results: on the tiny reference UNet
an emulation of TF32 convolutions moves one forward by about 9e-3 and a 10-step sample by about 7e-2, far past
the 1e-3 the sampler tests allow. :func:`tf32` turns all three switches one way for the duration of a block and
:func:`tf32_flags` records them, so a test or a benchmark row says which arithmetic it measured.

The switches are process-wide PyTorch settings; on a CPU they exist and change nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def tf32_flags() -> dict[str, Any]:
    """The current float32 switches: cuBLAS matmul TF32, cuDNN TF32 and the float32 matmul precision."""
    flags: dict[str, Any] = {
        "cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    flags["tf32"] = flags["cuda.matmul.allow_tf32"] or flags["cudnn.allow_tf32"] \
        or flags["float32_matmul_precision"] != "highest"
    return flags


def set_tf32(enabled: bool) -> None:
    """Allow (``True``) or forbid (``False``, true fp32) TF32 in cuBLAS matmuls and cuDNN convolutions."""
    # set_float32_matmul_precision also sets cuda.matmul.allow_tf32 ("high" -> True), so it goes first and
    # the explicit flag after it.
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[dict[str, Any]]:
    """Run a block with TF32 allowed or forbidden; yields the flags in force, restores the previous ones."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32)
    set_tf32(enabled)
    try:
        yield tf32_flags()
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]
        torch.backends.cudnn.allow_tf32 = before[2]
