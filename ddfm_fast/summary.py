"""The record of a folder run: ``OUTDIR/ddfm_summary.json``.

Its ``settings`` are :meth:`ddfm_fast.runner.RunConfig.to_dict` (the sampler and acceleration configs whole and
the run-level fields) and its ``plan`` is the execution plan that ran (``ExecutionPlan.to_dict()``, run-time
fallbacks included). ``outputs`` holds one record per output file in the folder, of this run and every earlier
one, saying what made it (``ddfm_fast.resume``: the settings digest, the inputs' and the output's SHA-256),
``identities`` the output identity behind each settings digest, and ``runs`` one line per run in the folder;
a resumed run reads all three back and keeps them. ``done`` / ``skipped`` / ``failed`` are this run's pairs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from ddfm_fast import io

SUMMARY_NAME = "ddfm_summary.json"
SUMMARY_SCHEMA = 3  # 3: per-output records (outputs, identities, runs); 2: settings as {"sampler", "accel", "run"}


def versions() -> dict[str, Optional[str]]:
    """Versions of ddfm-fast and what it runs on (triton: None when it is not installed)."""
    import numpy as np
    import torch

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


def output_name(record: dict[str, Any]) -> str:
    """The file name an output record is kept under."""
    return Path(record["output"]).name


@dataclass
class RunSummary:
    """What a folder run did; written as ``OUTDIR/ddfm_summary.json``.

    ``kept`` are the records of outputs from earlier runs (verified and skipped, or of pairs this run did not
    touch), ``done`` this run's new ones; ``outputs`` in the file is both. ``pending`` counts the pairs an
    interrupted or stopped run did not reach; ``stopped`` says why a run stopped early (a full disk), and
    ``write_error`` why the summary itself could not be written (set by :meth:`write_safely`).
    """

    settings: dict[str, Any]
    inputs: dict[str, str]
    output_dir: str
    plan: Optional[dict[str, Any]] = None  # the execution plan that ran (None: EM only, no UNet step)
    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    replaced: list[dict[str, Any]] = field(default_factory=list)  # existing files fused again, with the reason
    unpaired: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # earlier runs in this folder
    settings_digest: Optional[str] = None
    pending: int = 0
    stopped: Optional[str] = None
    write_error: Optional[str] = None
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

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        """Every output record of the folder: the kept ones, this run's on top."""
        merged = dict(self.kept)
        merged.update({output_name(rec): rec for rec in self.done if "output" in rec})
        return merged

    def counts(self) -> dict[str, int]:
        return {
            "pairs": len(self.done) + len(self.skipped) + len(self.failed) + self.pending,
            "done": len(self.done),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "pending": self.pending,
            "unpaired": len(self.unpaired),
            "ignored": len(self.ignored),
            "outputs": len(self.outputs),
        }

    def run_entry(self) -> dict[str, Any]:
        """This run's line in ``runs``."""
        c = self.counts()
        return {"started": self.started, "finished": self.finished, "complete": self.complete,
                "done": c["done"], "skipped": c["skipped"], "failed": c["failed"], "pending": c["pending"],
                "settings": self.settings_digest, "stopped": self.stopped}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SUMMARY_SCHEMA,
            "complete": self.complete,
            "started": self.started,
            "finished": self.finished,
            "counts": self.counts(),
            "timing": {
                "wall_s": round(self.wall_s, 3),
                "fusion_s": round(self.fusion_s, 3),
                "images_per_s": None if self.images_per_s is None else round(self.images_per_s, 4),
            },
            "inputs": self.inputs,
            "output_dir": self.output_dir,
            "settings": self.settings,
            "settings_digest": self.settings_digest,
            "plan": self.plan,
            "versions": versions(),
            "stopped": self.stopped,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "replaced": self.replaced,
            "unpaired": self.unpaired,
            "ignored": self.ignored,
            "warnings": self.warnings,
            "outputs": dict(sorted(self.outputs.items())),
            "identities": self.identities,
            "runs": [*self.runs, self.run_entry()],
        }

    def write(self, out_dir: Path) -> Path:
        return write_summary(self.to_dict(), Path(out_dir) / SUMMARY_NAME)

    def write_safely(self, out_dir: Path) -> Optional[Path]:
        """:meth:`write`, with a failure (a full disk, a folder gone read-only) kept in ``write_error`` as one
        line instead of raised: the outputs are on disk and their records stay in the journal."""
        try:
            return self.write(out_dir)
        except OSError as exc:
            self.write_error = f"{Path(out_dir) / SUMMARY_NAME}: cannot write it ({exc.strerror or exc})"
            return None


def write_summary(doc: dict[str, Any], dest: Path) -> Path:
    """Write a summary atomically as UTF-8 JSON; names that are not valid UTF-8 (undecodable bytes in a file
    name) are written as JSON escapes instead of failing the write."""
    try:
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = (json.dumps(doc, indent=2, ensure_ascii=True) + "\n").encode("ascii")
    with io.atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return dest
