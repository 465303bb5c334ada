"""ddfm-fast: DDFM (Zhao et al., ICCV 2023) image fusion, faithful to the official code and fast.

The public names are loaded on first use (a module ``__getattr__``, PEP 562): ``import ddfm_fast`` and the
command line's ``--help`` do not import torch, while ``ddfm_fast.fuse`` and ``from ddfm_fast import fuse``
work as before. Submodules are reachable as attributes too (``ddfm_fast.io`` after ``import ddfm_fast``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "AccelConfig": "ddfm_fast.config",
    "SamplerConfig": "ddfm_fast.config",
    "CheckpointError": "ddfm_fast.checkpoint",
    "load_model": "ddfm_fast.checkpoint",
    "UNetConfig": "ddfm_fast.unet",
    "UNetModel": "ddfm_fast.unet",
    "FusionResult": "ddfm_fast.api",
    "fuse": "ddfm_fast.api",
    "DDFMSampler": "ddfm_fast.sampler",
    "NonFiniteError": "ddfm_fast.sampler",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from ddfm_fast.api import FusionResult, fuse
    from ddfm_fast.checkpoint import CheckpointError, load_model
    from ddfm_fast.config import AccelConfig, SamplerConfig
    from ddfm_fast.sampler import DDFMSampler, NonFiniteError
    from ddfm_fast.unet import UNetConfig, UNetModel


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # the submodule exists but imports something missing
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
