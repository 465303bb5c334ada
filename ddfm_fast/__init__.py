"""ddfm-fast: DDFM (Zhao et al., ICCV 2023) image fusion, faithful to the official code and fast."""

from __future__ import annotations

__version__ = "0.1.0"
