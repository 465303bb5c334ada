"""ddfm-fast: DDFM (Zhao et al., ICCV 2023) image fusion, faithful to the official code and fast."""

from __future__ import annotations

__version__ = "0.1.0"

from ddfm_fast.checkpoint import CheckpointError, load_model  # noqa: E402
from ddfm_fast.unet import UNetConfig, UNetModel  # noqa: E402
from ddfm_fast.config import AccelConfig, SamplerConfig  # noqa: E402
from ddfm_fast.api import FusionResult, fuse  # noqa: E402
from ddfm_fast.sampler import DDFMSampler, NonFiniteError  # noqa: E402

__all__ = ["AccelConfig", "CheckpointError", "DDFMSampler", "FusionResult", "NonFiniteError", "SamplerConfig",
           "UNetConfig", "UNetModel", "fuse", "load_model"]
