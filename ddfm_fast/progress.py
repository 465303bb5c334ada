"""What a run shows while it works: the per-step progress images (``--save-progress``) and progress bars.

:class:`ProgressRecorder` writes, per step, what the official ``p_sample_loop(record=True)`` writes: the
luminance Y of the step's output x_{t-1} (``StepOutput.x_prev``, the official ``out['sample']``), min-max scaled
to [0, 255] and truncated to uint8 (:func:`ddfm_fast.io.to_uint8_truncated`, as ``ddfm_fast.compat`` does), as
``x_<idx:04d>.png`` with the official idx = N-1 ... 0. Beside them it keeps the EM-rectified estimate x0' of each
step, named for what it is, ``x0_<idx:04d>.png`` (same conversion), and one looping ``diffusion.gif`` of the
x_{t-1} frames. Frames are cropped to the output size (no padding in the images).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ddfm_fast import io
from ddfm_fast.pairing import InputError
from ddfm_fast.sampler import StepOutput

PROGRESS_GIF = "diffusion.gif"
_FRAME = re.compile(r"^x0?_\d{4,}\.png$")

BarFactory = Callable[..., Any]  # tqdm-like: factory(total=..., desc=..., unit=...) with update / close / write


def progress_frame(x: torch.Tensor, out_hw: tuple[int, int]) -> np.ndarray:
    """The official progress image of one RGB sample ``x`` (B, 3, H, W), first image: Y, min-max, truncated."""
    h, w = out_hw
    return io.to_uint8_truncated(io.sample_luma(x[0:1, :, :h, :w]))


class ProgressRecorder:
    """The per-step images of one pair in ``folder`` (see the module docstring); a step callback."""

    def __init__(self, folder: Path, out_hw: tuple[int, int]) -> None:
        self.folder = Path(folder)
        self.out_hw = out_hw
        self.frames: list[np.ndarray] = []
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"progress folder {self.folder}: exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.iterdir():  # frames of an earlier run (maybe with more steps) would mix in
            if _FRAME.match(old.name) or old.name == PROGRESS_GIF:
                old.unlink()

    def __call__(self, out: StepOutput) -> None:
        frame = progress_frame(out.x_prev, self.out_hw)
        io.save_png(frame, self.folder / f"x_{out.idx:04d}.png")
        io.save_png(progress_frame(out.pred_xstart, self.out_hw), self.folder / f"x0_{out.idx:04d}.png")
        self.frames.append(frame)

    def finish(self) -> Path:
        """Write the GIF of the x_{t-1} frames; returns the folder."""
        io.save_gif(self.frames, self.folder / PROGRESS_GIF)
        return self.folder


class NoBar:
    """A progress bar that shows nothing (its ``write`` still prints to stderr)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(s: str) -> None:
        print(s, file=sys.stderr)


def step_callback(recorder: Optional[ProgressRecorder], steps: Any) -> Optional[Callable[[StepOutput], None]]:
    """The per-step callback for progress images and / or a step bar; None when neither is wanted."""
    if recorder is None and steps is None:
        return None

    def callback(out: StepOutput) -> None:
        if recorder is not None:
            recorder(out)
        if steps is not None:
            steps.update(1)

    return callback
