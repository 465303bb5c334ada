"""The record of a folder run: ``OUTDIR/ddfm_summary.json``.

Its ``settings`` are :meth:`ddfm_fast.runner.RunConfig.to_dict` (the sampler and acceleration configs whole and
the run-level fields) and its ``plan`` is the execution plan that ran (``ExecutionPlan.to_dict()``, run-time
fallbacks included); :func:`ddfm_fast.runner.check_resume` reads both back when a run resumes in the folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ddfm_fast import io

SUMMARY_NAME = "ddfm_summary.json"
SUMMARY_SCHEMA = 2  # 2: settings as {"sampler", "accel", "run"} and the plan that ran


def versions() -> dict[str, Optional[str]]:
    """Versions of ddfm-fast and what it runs on (triton: None when it is not installed)."""
    import ddfm_fast

    def dist(name: str) -> Optional[str]:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    triton = dist("triton") if importlib.util.find_spec("triton") is not None else None
    return {
        "ddfm_fast": ddfm_fast.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": dist("pillow"),
        "platform": platform.platform(),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunSummary:
    """What a folder run did; written as ``OUTDIR/ddfm_summary.json``."""

    settings: dict[str, Any]
    inputs: dict[str, str]
    output_dir: str
    plan: Optional[dict[str, Any]] = None  # the execution plan that ran (None: EM only, no UNet step)
    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    unpaired: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: str = field(default_factory=now)
    finished: Optional[str] = None
    complete: bool = False
    wall_s: float = 0.0
    fusion_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no pair failed (unpaired files alone do not fail a run)."""
        return not self.failed

    @property
    def images_per_s(self) -> Optional[float]:
        return len(self.done) / self.fusion_s if self.done and self.fusion_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SUMMARY_SCHEMA,
            "complete": self.complete,
            "started": self.started,
            "finished": self.finished,
            "counts": {
                "pairs": len(self.done) + len(self.skipped) + len(self.failed),
                "done": len(self.done),
                "skipped": len(self.skipped),
                "failed": len(self.failed),
                "unpaired": len(self.unpaired),
                "ignored": len(self.ignored),
            },
            "timing": {
                "wall_s": round(self.wall_s, 3),
                "fusion_s": round(self.fusion_s, 3),
                "images_per_s": None if self.images_per_s is None else round(self.images_per_s, 4),
            },
            "inputs": self.inputs,
            "output_dir": self.output_dir,
            "settings": self.settings,
            "plan": self.plan,
            "versions": versions(),
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "unpaired": self.unpaired,
            "ignored": self.ignored,
            "warnings": self.warnings,
        }

    def write(self, out_dir: Path) -> Path:
        return io.save_json(self.to_dict(), Path(out_dir) / SUMMARY_NAME)
