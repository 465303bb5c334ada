"""Sample image pairs shipped inside the package, so a fresh install fuses a real pair with no data of its own.

* ``ivf``: MSRS test pair 00004N (640x480, night; infrared L, visible RGB), from the MSRS test split as
  redistributed in Linfeng-Tang/SuperFusion (MIT License).
* ``mif``: Harvard Whole Brain Atlas slice 11 (256x256), PET in colour and MRI, as redistributed in the
  MMIF-CDDFuse test images.

The files are the originals re-encoded losslessly (pixel-identical; the gray-content MRI stored as one channel).
"""

from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent

# kind -> (the ir side: infrared / functional image, the vis side: visible / MRI image)
EXAMPLES: dict[str, tuple[str, str]] = {
    "ivf": ("msrs_00004N_ir.png", "msrs_00004N_vis.png"),
    "mif": ("harvard_pet_11.png", "harvard_mri_11.png"),
}


def example_pair(kind: str = "ivf") -> tuple[Path, Path]:
    """Paths of a shipped pair, ``(ir, vis)`` in the roles of :func:`ddfm_fast.fuse`: ``"ivf"`` (infrared,
    visible) or ``"mif"`` (PET, MRI)."""
    if kind not in EXAMPLES:
        raise ValueError(f"unknown example {kind!r}; choose one of {', '.join(EXAMPLES)}")
    ir, vis = (SAMPLES_DIR / name for name in EXAMPLES[kind])
    for path in (ir, vis):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the sample image is missing from this installation of ddfm-fast")
    return ir, vis
