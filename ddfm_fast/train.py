"""Training a small unconditional diffusion prior for DDFM (``ddfm-fast train-prior``).

DDFM (Zhao et al., ICCV 2023) samples any unconditional epsilon-prediction DDPM and rectifies every x0 prediction
with one EM step, so a prior small enough for a CPU can be trained by this project itself. The objective is the
"simple" loss of Ho et al. 2020 (Eq. 14), on the linear 1000-step schedule the sampler uses
(:func:`ddfm_fast.schedule.linear_betas`):

    t ~ U{0, ..., 999},  eps ~ N(0, I),  x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) eps,  loss = |eps - eps_theta(x_t, t)|^2

or, for a model with ``prediction="v"`` (Salimans & Ho 2022), the same loss on v = sqrt(ac_t) eps - sqrt(1 - ac_t) x0
(the network's own output, :meth:`~ddfm_fast.unet.UNetModel.net_output`). With ``schedule_fraction`` p > 0, a
fraction p of each batch's timesteps is drawn from the ones the sampler visits at the model's default step count
(``schedule.space_timesteps(1000, default_steps)``) and the rest uniformly, so the steps that make the default
fusion get more of the training while every other step count stays covered.

Notation (variable -> paper): ``x0`` a training crop in [-1, 1]; ``ac`` alpha_bar; ``ema`` the exponential moving
average of the weights (what is shipped and sampled). Only the first three output channels are trained
(``learn_sigma=False`` gives exactly three; with ``learn_sigma=True`` the variance channels are ignored, as the
DDIM sampler ignores them).

What the shipped prior models (``--gray``). DDFM fuses luminance only: the sampler takes Y of each x0
prediction, the EM step replaces it by the fused F, and the output is the Y channel of the final sample. The
chroma of x0 is carried along unchanged and then thrown away. A prior trained on gray images (IR as it is,
visible images reduced with the fusion's own BGR2GRAY, both replicated to 3 channels) spends all its capacity on
the one channel that reaches the output, and its x0 predictions have Cb = Cr = neutral, so x0' = RGB(F, Cb, Cr)
is F replicated and the next step's input is again a gray image, the distribution it was trained on. A colour
prior would model chroma nobody reads and, on IR/visible data, would mix gray IR and colour visible statistics.
The fused image is itself a gray image that should look like both an IR and a visible luminance image, which is
the mixture the gray training pool (IR + visible luminance) describes. ``--colour`` keeps colour for other uses.

Files. ``--out FILE.safetensors`` receives the EMA weights with the architecture (``ddfm_fast.config``), the
sampler's ``default_steps`` and the training record (``ddfm_fast.training``: settings, the exact command line,
steps done, loss curve, time) as metadata, so ``load_model(FILE)`` needs no other argument. Beside it,
``FILE.state.pt`` holds what a resume needs (raw weights, EMA, optimiser, data RNG, loss log); it is a dict of
tensors and plain values, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ddfm_fast.checkpoint import save_safetensors
from ddfm_fast.io import IMAGE_SUFFIXES, gray_bgr2gray
from ddfm_fast.schedule import NUM_TRAIN_TIMESTEPS, linear_betas, space_timesteps
from ddfm_fast.unet import DDFM_SMALL_ARGS, UNetConfig, UNetModel

META_TRAINING = "ddfm_fast.training"  # json of the training record (settings, command, loss curve)

# The architecture of the shipped prior (see ``unet.DDFM_SMALL_ARGS``), the default of ``train-prior``.
SMALL_PRIOR_ARGS: dict[str, Any] = dict(DDFM_SMALL_ARGS)


@dataclass
class TrainSettings:
    """Everything that determines a training run (recorded in the output's metadata)."""

    data: list[str]
    out: str
    steps: int = 5000  # optimiser steps in total (a resumed run continues up to this number)
    batch_size: int = 16
    crop: int = 64  # square random crops, a multiple of the model's downsample factor
    lr: float = 2e-4
    warmup: int = 100  # linear learning-rate warm-up, in steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    gray: bool = False  # True: colour images reduced to gray too (the shipped prior); gray ones are always replicated
    hflip: bool = True
    vflip: bool = False
    checkpoint_every: int = 500
    max_minutes: Optional[float] = None  # stop (and save) after this much wall-clock time
    default_steps: int = 10  # the sampler's default number of DDIM steps, stored in the metadata
    model_args: dict[str, Any] = field(default_factory=lambda: dict(SMALL_PRIOR_ARGS))
    device: str = "cpu"
    threads: Optional[int] = None  # torch.set_num_threads; None keeps torch's default
    resume: bool = True
    progress: bool = True
    command: Optional[str] = None  # the exact command line, recorded as given
    holdout_every: int = 0  # hold out every k-th image pair of --data (``holdout_pairs``); 0 trains on all
    schedule_fraction: float = 0.0  # share of timesteps drawn from the default schedule's (see module doc)
    gamma_aug: float = 0.0  # random gamma exp(U(-g, g)) on each crop (0: none)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot train a model (the CLI checks them too)."""
        checks = [
            ("--steps", self.steps, isinstance(self.steps, int) and self.steps >= 1, "an integer >= 1"),
            ("--batch-size", self.batch_size, isinstance(self.batch_size, int) and self.batch_size >= 1,
             "an integer >= 1"),
            ("--crop", self.crop, isinstance(self.crop, int) and self.crop >= 1, "an integer >= 1"),
            ("--lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("--warmup", self.warmup, self.warmup >= 0, ">= 0"),
            ("--ema-decay", self.ema_decay, 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("--checkpoint-every", self.checkpoint_every, self.checkpoint_every >= 0, ">= 0"),
            ("--max-minutes", self.max_minutes, self.max_minutes is None or self.max_minutes > 0, "> 0"),
            ("--default-steps", self.default_steps, 1 <= self.default_steps <= NUM_TRAIN_TIMESTEPS,
             f"from 1 to {NUM_TRAIN_TIMESTEPS}"),
            ("--holdout-every", self.holdout_every, self.holdout_every >= 0, ">= 0"),
            ("--schedule-fraction", self.schedule_fraction, 0 <= self.schedule_fraction <= 1, "in [0, 1]"),
            ("--gamma-aug", self.gamma_aug, 0 <= self.gamma_aug <= 2, "in [0, 2]"),
            ("grad_clip", self.grad_clip, self.grad_clip >= 0, ">= 0"),
        ]
        for name, value, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} {value}: must be {want}")


# ---------------------------------------------------------------------------------------------------- data


def find_images(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """All image files below the given folders (recursively), sorted; raises if a folder is missing or empty."""
    files: list[Path] = []
    for d in dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root}: no such folder")
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"--data {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) below it")
        files.extend(found)
    return files


def holdout_pairs(files: Sequence[Path], every: int) -> tuple[list[Path], list[Path]]:
    """Split image files into (training, held out): every ``every``-th pair is held out (0: none).

    A pair is the files that share a stem below the same dataset folder (``RoadScene/ir/X.jpg`` and
    ``RoadScene/vi/X.jpg``), so a held-out scene is unseen in both modalities. Pairs are ordered by (dataset
    folder, stem) and the 1st, (1 + every)-th, ... are held out, which makes the split a function of the file
    names alone (the same on every machine).
    """
    if every < 0:
        raise ValueError(f"--holdout-every {every}: must be 0 (no hold-out) or a positive number")
    if not every:
        return list(files), []
    key = lambda p: (str(p.parent.parent), p.stem)  # noqa: E731
    held = {k for i, k in enumerate(sorted({key(p) for p in files})) if i % every == 0}
    return [p for p in files if key(p) not in held], [p for p in files if key(p) in held]


def read_training_image(path: Path, *, gray: bool) -> torch.Tensor:
    """One image as a (3, H, W) uint8 tensor: gray files replicated to 3 channels; colour kept, or made gray.

    Gray uses the fusion's own conversion (OpenCV BGR2GRAY, rounded), so the prior sees what the sampler fuses.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        is_gray = img.mode in ("L", "LA", "I;16", "I") or (img.mode == "P" and _palette_is_gray(img))
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    if gray or is_gray or _channels_equal(rgb):
        g = np.round(gray_bgr2gray(rgb)).clip(0, 255).astype(np.uint8)
        arr = np.repeat(g[None], 3, axis=0)
    else:
        arr = rgb.astype(np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


class TrainingDataError(ValueError):
    """A training folder holds files that cannot be read as images; the message names every one."""


# What Pillow raises for files it cannot decode: unknown formats, truncated data, bomb-sized headers.
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


def load_training_images(files: Sequence[Path], *, gray: bool) -> list[torch.Tensor]:
    """Read every file (:func:`read_training_image`); raises :class:`TrainingDataError` naming each unreadable
    one, so that a bad file is found before training starts rather than skipped without a word."""
    images, bad = [], []
    for p in files:
        try:
            images.append(read_training_image(p, gray=gray))
        except _READ_ERRORS as exc:
            bad.append(f"{p} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'})")
    if bad:
        raise TrainingDataError(f"--data: {len(bad)} of {len(files)} image file(s) cannot be read; fix or remove "
                                f"them: {'; '.join(bad)}")
    return images


def _palette_is_gray(img: Image.Image) -> bool:
    return _channels_equal(np.asarray(img.convert("RGB")))


def _channels_equal(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


class CropSampler:
    """Random square crops (with flips) of in-memory images, drawn from a seeded torch generator.

    Images are picked with probability proportional to their area, so big and small images are covered evenly.
    Images smaller than the crop are reflect-padded.
    """

    def __init__(self, images: Sequence[torch.Tensor], crop: int, *, hflip: bool, vflip: bool,
                 gamma_aug: float = 0.0) -> None:
        if not images:
            raise ValueError("no training images")
        self.images = [self._ensure_size(im, crop) for im in images]
        self.crop, self.hflip, self.vflip, self.gamma_aug = crop, hflip, vflip, gamma_aug
        areas = torch.tensor([im.shape[1] * im.shape[2] for im in self.images], dtype=torch.float64)
        self.weights = areas / areas.sum()

    @staticmethod
    def _ensure_size(im: torch.Tensor, crop: int) -> torch.Tensor:
        _, h, w = im.shape
        if h >= crop and w >= crop:
            return im
        ph, pw = max(0, crop - h), max(0, crop - w)
        padded = torch.nn.functional.pad(im[None].float(), (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw)
                                         else "replicate")
        return padded[0].to(torch.uint8)

    def sample(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """(batch, 3, crop, crop) float32 in [-1, 1]."""
        idx = torch.multinomial(self.weights, batch, replacement=True, generator=gen)
        c = self.crop
        out = torch.empty(batch, 3, c, c)
        for b, i in enumerate(idx.tolist()):
            im = self.images[i]
            y = int(torch.randint(0, im.shape[1] - c + 1, (1,), generator=gen))
            x = int(torch.randint(0, im.shape[2] - c + 1, (1,), generator=gen))
            patch = im[:, y : y + c, x : x + c].float()
            if self.hflip and bool(torch.rand((), generator=gen) < 0.5):
                patch = patch.flip(-1)
            if self.vflip and bool(torch.rand((), generator=gen) < 0.5):
                patch = patch.flip(-2)
            if self.gamma_aug:
                g = math.exp(float(torch.rand((), generator=gen) * 2 - 1) * self.gamma_aug)
                patch = (patch / 255).pow(g) * 255
            out[b] = patch
        return out / 127.5 - 1


# ---------------------------------------------------------------------------------------------- objective


class Diffusion:
    """The forward process of the linear 1000-step schedule (``schedule.linear_betas``), as float32 tables."""

    def __init__(self, num_timesteps: int = NUM_TRAIN_TIMESTEPS, device: str | torch.device = "cpu") -> None:
        ac = np.cumprod(1.0 - linear_betas(num_timesteps))
        self.num_timesteps = num_timesteps
        self.sqrt_ac = torch.from_numpy(np.sqrt(ac)).float().to(device)
        self.sqrt_1m_ac = torch.from_numpy(np.sqrt(1.0 - ac)).float().to(device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) eps (Ho et al. 2020, Eq. 4)."""
        return self.sqrt_ac[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise


def diffusion_loss(model: UNetModel, diffusion: Diffusion, x0: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """The simple loss on what the network predicts (epsilon, or v for ``prediction="v"``); only the first
    ``x0.shape[1]`` output channels are trained."""
    out = model.net_output(diffusion.q_sample(x0, t, noise), t)[:, : x0.shape[1]]
    if model.config.prediction == "v":
        a, s = diffusion.sqrt_ac[t].view(-1, 1, 1, 1), diffusion.sqrt_1m_ac[t].view(-1, 1, 1, 1)
        return (out - (a * noise - s * x0)).square().mean()
    return (out - noise).square().mean()


def sample_timesteps(batch: int, gen: torch.Generator, schedule: Optional[torch.Tensor],
                     fraction: float) -> torch.Tensor:
    """``batch`` training timesteps: uniform on 0..999, with a share ``fraction`` taken from ``schedule``."""
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=gen)
    if schedule is not None and fraction > 0:
        pick = torch.rand(batch, generator=gen) < fraction
        t = torch.where(pick, schedule[torch.randint(0, len(schedule), (batch,), generator=gen)], t)
    return t


def training_step(model: UNetModel, optimizer: torch.optim.Optimizer, diffusion: Diffusion, x0: torch.Tensor,
                  t: torch.Tensor, noise: torch.Tensor, *, grad_clip: float = 1.0) -> float:
    """One optimiser step on one batch; returns the loss before the step."""
    model.train()
    loss = diffusion_loss(model, diffusion, x0, t, noise)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the training loss became {float(loss)}; lower --lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def ema_update(ema: UNetModel, model: UNetModel, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with the usual warm-up ``min(decay, (1 + n) / (10 + n))``, so early averages are not stale."""
    return min(decay, (1.0 + step) / (10.0 + step))


def _lr_at(step: int, s: TrainSettings) -> float:
    return s.lr * min(1.0, (step + 1) / max(1, s.warmup))


# -------------------------------------------------------------------------------------------------- files


def state_path(out: str | os.PathLike) -> Path:
    """The resume file beside the output: ``FILE.state.pt``."""
    out = Path(out)
    return out.with_name(out.name + ".state.pt")


def _loss_curve(losses: Sequence[float], bins: int = 20) -> list[dict[str, float]]:
    """Mean loss per stretch of steps (at most ``bins`` entries): a compact curve for the metadata."""
    n = len(losses)
    if not n:
        return []
    width = max(1, math.ceil(n / bins))
    return [
        {"steps": [i + 1, min(n, i + width)], "loss": float(np.mean(losses[i : i + width]))}
        for i in range(0, n, width)
    ]


def _training_record(s: TrainSettings, step: int, losses: Sequence[float], seconds: float,
                     n_images: int, held_out: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "objective": (f"{'v' if s.model_args.get('prediction') == 'v' else 'epsilon'} MSE (Ho et al. 2020, L_simple), "
                      "linear 1000-step schedule, t uniform"
                      + (f" with {s.schedule_fraction:g} of them from the {s.default_steps}-step sampler schedule"
                         if s.schedule_fraction else "")),
        "settings": s.to_dict(),
        "command": s.command,
        "steps_done": step,
        "train_seconds": round(seconds, 1),
        "num_images": n_images,
        "held_out": held_out,
        "loss_curve": _loss_curve(losses),
        "final_loss_mean_last_200": float(np.mean(losses[-200:])) if losses else None,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
    }


# What a resumed run may change: how long and where it trains, and how it reports. Every other setting shapes the
# weights, so a resume with another value would record a model trained as it was not.
RESUMABLE_CHANGES = frozenset({"out", "steps", "checkpoint_every", "max_minutes", "device", "threads", "resume",
                               "progress", "command"})


def training_identity(s: TrainSettings) -> dict[str, Any]:
    """The settings a resume must keep (all but :data:`RESUMABLE_CHANGES`), data folders made absolute."""
    d = {k: v for k, v in s.to_dict().items() if k not in RESUMABLE_CHANGES}
    d["data"] = [str(Path(p).resolve()) for p in s.data]
    return json.loads(json.dumps(d))


def _save(ema: UNetModel, model: UNetModel, opt: torch.optim.Optimizer, gen: torch.Generator, s: TrainSettings,
          step: int, losses: list[float], seconds: float, n_images: int, held_out: Sequence[str] = ()) -> None:
    if step < 1:
        raise ValueError(f"--out {s.out}: no training step was done, so there is no trained model to save")
    record = _training_record(s, step, losses, seconds, n_images, held_out)
    save_safetensors(ema, s.out, metadata={META_TRAINING: record})
    state = {
        "step": step,
        "seconds": seconds,
        "losses": torch.tensor(losses, dtype=torch.float64),
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": gen.get_state(),
        "config": json.dumps(model.config.to_dict()),
        "settings": json.dumps(training_identity(s)),
    }
    path = state_path(s.out)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- train


def build_model(s: TrainSettings) -> UNetModel:
    config = UNetConfig.from_create_model_args(s.model_args)
    if s.crop % config.downsample_factor:
        raise ValueError(f"--crop {s.crop} must be a multiple of the model's downsample factor "
                         f"{config.downsample_factor}")
    return UNetModel(config, default_steps=s.default_steps)


def train_prior(s: TrainSettings, *, log: Callable[[str], None] = print) -> Path:
    """Train (or resume) a prior as described by ``s``; returns the output path (the EMA weights)."""
    s.validate()
    if s.threads:
        torch.set_num_threads(int(s.threads))
    device = torch.device(s.device)
    torch.manual_seed(s.seed)
    files, held = holdout_pairs(find_images(s.data), s.holdout_every)
    if not files:
        raise ValueError(f"--holdout-every {s.holdout_every}: holds out every image of --data")
    held_out = [str(p) for p in held]
    images = load_training_images(files, gray=s.gray)
    sampler = CropSampler(images, s.crop, hflip=s.hflip, vflip=s.vflip, gamma_aug=s.gamma_aug)
    log(f"{len(files)} training images from {', '.join(s.data)}"
        + (f" ({len(held)} held out)" if held else "")
        + f"; crops {s.crop}px, batch {s.batch_size}, {'gray' if s.gray else 'colour'}")

    model = build_model(s).to(device)
    ema = build_model(s).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    gen = torch.Generator().manual_seed(s.seed)
    diffusion = Diffusion(device=device)
    schedule_t = torch.tensor(space_timesteps(NUM_TRAIN_TIMESTEPS, s.default_steps)) if s.schedule_fraction else None
    step, seconds, losses = 0, 0.0, []

    resume_file = state_path(s.out)
    if s.resume and resume_file.is_file():
        step, seconds, losses = _resume(resume_file, model, ema, opt, gen, device, training_identity(s))
        log(f"resumed from {resume_file} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters, {json.dumps(model.config.to_dict())}")

    bar = None
    if s.progress:
        from tqdm import tqdm
        bar = tqdm(total=s.steps, initial=step, desc="train-prior", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    base_seconds = seconds
    last_saved = step
    try:
        while step < s.steps:
            seconds = base_seconds + time.perf_counter() - start
            if s.max_minutes is not None and seconds - base_seconds >= s.max_minutes * 60:
                log(f"time limit of {s.max_minutes} min reached at step {step}")
                break
            x0 = sampler.sample(s.batch_size, gen).to(device)
            t = sample_timesteps(s.batch_size, gen, schedule_t, s.schedule_fraction).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, s)
            losses.append(training_step(model, opt, diffusion, x0, t, noise, grad_clip=s.grad_clip))
            step += 1
            ema_update(ema, model, ema_decay_at(step, s.ema_decay))
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
            if s.checkpoint_every and step % s.checkpoint_every == 0:
                _save(ema, model, opt, gen, s, step, losses, base_seconds + time.perf_counter() - start,
                      len(files), held_out)
                last_saved = step
    finally:
        if bar is not None:
            bar.close()
    seconds = base_seconds + time.perf_counter() - start
    if step != last_saved or not Path(s.out).is_file():
        _save(ema, model, opt, gen, s, step, losses, seconds, len(files), held_out)
    log(f"saved {s.out} at step {step} ({seconds / 60:.1f} min in total; "
        f"mean loss of the last 200 steps {np.mean(losses[-200:]) if losses else float('nan'):.4f})")
    return Path(s.out)


def _resume(path: Path, model: UNetModel, ema: UNetModel, opt: torch.optim.Optimizer, gen: torch.Generator,
            device: torch.device, identity: dict[str, Any]) -> tuple[int, float, list[float]]:
    """Load a resume state into the given objects; any unreadable or mismatched file is one ``ValueError``, and
    so is a state trained with other settings (``identity``: :func:`training_identity`), naming them."""
    hint = "delete it or use --no-resume to start afresh"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        config = json.loads(state["config"])
        saved = json.loads(state["settings"]) if "settings" in state else None
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot read the resume state (truncated or corrupt: {first}); {hint}") from exc
    if config != model.config.to_dict():
        raise ValueError(f"{path}: saved for another architecture; {hint}")
    if saved is None:
        # A state of ddfm-fast 0.1.0: its settings are in the weights file's training record, with the data
        # folders as they were typed (relative to a working directory nobody recorded), so those are not compared.
        saved = _recorded_settings(path, hint)
        identity = {k: v for k, v in identity.items() if k != "data"}
        saved.pop("data", None)
    changed = [f"{k} {saved.get(k)!r} -> {identity.get(k)!r}" for k in sorted(set(saved) | set(identity))
               if saved.get(k) != identity.get(k)]
    if changed:
        raise ValueError(f"{path}: trained with other settings ({'; '.join(changed)}); only --steps, "
                         f"--max-minutes, --checkpoint-every, --device and --threads may change on resume; {hint}, "
                         "or write to another --out")
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        return int(state["step"]), float(state["seconds"]), state["losses"].tolist()
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: the resume state is incomplete or does not fit this model ({first}); "
                         f"{hint}") from exc


def _recorded_settings(state: Path, hint: str) -> dict[str, Any]:
    """The resumable settings of a 0.1.0 resume state, from the training record of the weights beside it."""
    weights = state.with_name(state.name[: -len(".state.pt")]) if state.name.endswith(".state.pt") else None
    try:
        recorded = read_training_record(weights)["settings"] if weights is not None and weights.is_file() else None
    except Exception:  # noqa: BLE001 - a damaged weights file: the state cannot be checked either way
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"{state}: the resume state does not record the settings it was trained with (nor does a "
                         f"weights file beside it), so a resume cannot be checked against them; {hint}")
    return {k: v for k, v in json.loads(json.dumps(recorded)).items() if k not in RESUMABLE_CHANGES}


def read_training_record(path: str | os.PathLike) -> dict[str, Any]:
    """The ``ddfm_fast.training`` metadata of a trained prior (empty dict if absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = fh.metadata() or {}
    return json.loads(meta[META_TRAINING]) if META_TRAINING in meta else {}


def command_line(argv: Optional[Iterable[str]] = None) -> str:
    """The exact command line as a shell-quoted string (what the metadata records)."""
    import shlex

    args = list(sys.argv if argv is None else argv)
    if args and Path(args[0]).name == "cli_train.py":  # python -m ddfm_fast.cli_train
        args[0:1] = ["python", "-m", "ddfm_fast.cli_train"]
    elif args:
        args[0] = Path(args[0]).name
    return shlex.join(args)


__all__ = [
    "META_TRAINING", "SMALL_PRIOR_ARGS", "TrainSettings", "CropSampler", "Diffusion", "diffusion_loss",
    "training_step", "train_prior", "find_images", "read_training_image", "read_training_record", "state_path",
    "holdout_pairs", "load_training_images", "TrainingDataError", "sample_timesteps",
]
