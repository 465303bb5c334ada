"""What a run shows while it works: the per-step progress images (``--save-progress``) and progress bars.

:class:`ProgressRecorder` writes, per step, what the official ``p_sample_loop(record=True)`` writes: the
luminance Y of the step's output x_{t-1} (``StepOutput.x_prev``, the official ``out['sample']``), min-max scaled
to [0, 255] and truncated to uint8 (:func:`ddfm_fast.io.to_uint8_truncated`, as ``ddfm_fast.compat`` does), as
``x_<idx:04d>.png`` with the official idx = N-1 ... 0 (it counts down: step j = 1 ... N writes idx = N - j, and
idx 0 is the last step). Beside them it keeps the EM-rectified estimate x0' of each step, named for what it is,
``x0_<idx:04d>.png`` (same conversion). Those per-step files stay unlabelled, as the official code writes them;
the two pictures meant for people are labelled with the step and the UNet's timestep t on every frame:
``diffusion.gif`` (the x_{t-1} frames, looping) and ``progress_strip.png`` (up to :data:`STRIP_FRAMES` steps,
evenly spaced and always the last, x_{t-1} above x0'). Frames are cropped to the output size (no padding).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from ddfm_fast import io
from ddfm_fast.pairing import InputError

if TYPE_CHECKING:  # torch is imported by whoever runs the sampler, not by importing this module
    import torch

    from ddfm_fast.sampler import StepOutput

PROGRESS_GIF = "diffusion.gif"
PROGRESS_STRIP = "progress_strip.png"
STRIP_FRAMES = 8
_FRAME = re.compile(r"^x0?_\d{4,}\.png$")

# tqdm-like: factory(total=..., desc=..., unit=...) with update / close / write(s, file=...); callers pass
# file=sys.stderr to write, since tqdm's write goes to stdout by default and stdout carries --log-json's lines.
BarFactory = Callable[..., Any]


def progress_frame(x: torch.Tensor, out_hw: tuple[int, int]) -> np.ndarray:
    """The official progress image of one RGB sample ``x`` (B, 3, H, W), first image: Y, min-max, truncated."""
    h, w = out_hw
    return io.to_uint8_truncated(io.sample_luma(x[0:1, :, :h, :w]))


class ProgressRecorder:
    """The per-step images of one pair in ``folder`` (see the module docstring); a step callback."""

    def __init__(self, folder: Path, out_hw: tuple[int, int]) -> None:
        self.folder = Path(folder)
        self.out_hw = out_hw
        self.frames: list[np.ndarray] = []  # x_{t-1} per step
        self.estimates: list[np.ndarray] = []  # x0' per step
        self.steps: list[tuple[int, int]] = []  # (loop position j, timestep t) per step
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"progress folder {self.folder}: exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.iterdir():  # frames of an earlier run (maybe with more steps) would mix in
            if is_progress_file(old.name):
                old.unlink()

    def __call__(self, out: StepOutput) -> None:
        frame = progress_frame(out.x_prev, self.out_hw)
        estimate = progress_frame(out.pred_xstart, self.out_hw)
        io.save_png(frame, self.folder / f"x_{out.idx:04d}.png")
        io.save_png(estimate, self.folder / f"x0_{out.idx:04d}.png")
        self.frames.append(frame)
        self.estimates.append(estimate)
        self.steps.append((int(out.j), int(out.timestep)))

    def finish(self) -> Path:
        """Write the labelled GIF of the x_{t-1} frames and the labelled strip; returns the folder."""
        n = len(self.frames)
        gif = [labelled_frame(f, step_label(j, t, n)) for f, (j, t) in zip(self.frames, self.steps)]
        top = max((g.shape[0] for g in gif), default=0)  # a label may wrap onto more lines on a narrow frame
        gif = [np.pad(g, ((top - g.shape[0], 0), (0, 0)), constant_values=g[0, 0]) for g in gif]
        io.save_gif(gif, self.folder / PROGRESS_GIF)
        if n:
            from ddfm_fast.montage import save_image

            save_image(progress_strip(self.frames, self.estimates, self.steps), self.folder / PROGRESS_STRIP)
        return self.folder


def step_label(j: int, timestep: int, total: int) -> str:
    """How a frame is labelled: ``step 3/20  t=849`` (j counts from 0; t is the timestep given to the UNet)."""
    return f"step {j + 1}/{total}  t={timestep}"


def labelled_frame(frame: np.ndarray, text: str) -> np.ndarray:
    """A gray frame (H, W) under a label band (:func:`ddfm_fast.montage.label_above`), still gray uint8."""
    from ddfm_fast.montage import label_above

    return np.asarray(label_above(frame, text).convert("L"))


def is_progress_file(name: str) -> bool:
    """True for the names :class:`ProgressRecorder` writes in its folder (and removes from an earlier run)."""
    return bool(_FRAME.match(name)) or name in (PROGRESS_GIF, PROGRESS_STRIP)


def strip_indices(n: int, k: int = STRIP_FRAMES) -> list[int]:
    """Up to ``k`` of ``n`` step positions, evenly spaced, always the first and the last."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def progress_strip(frames: list[np.ndarray], estimates: list[np.ndarray], steps: list[tuple[int, int]],
                   height: Optional[int] = None) -> Any:
    """The strip picture: chosen steps left to right, x_{t-1} above x0', every panel labelled with its step."""
    from ddfm_fast.montage import montage_grid

    n = len(frames)
    chosen = strip_indices(n)
    h = height or max(96, min(192, frames[0].shape[0]))
    labels = [step_label(*steps[k], n) for k in chosen]
    rows = [[(frames[k], f"{lab}  x_t-1") for k, lab in zip(chosen, labels)],
            [(estimates[k], f"{lab}  x0'") for k, lab in zip(chosen, labels)]]
    return montage_grid(rows, height=h, title="top: x_t-1, the output of each step (x_<idx>.png); bottom: x0', its "
                                              "EM-rectified estimate of the result (x0_<idx>.png)")


class NoBar:
    """A progress bar that shows nothing (its ``write`` still prints to stderr)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(s: str, file: Any = None) -> None:
        print(s, file=sys.stderr if file is None else file)


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
