"""``ddfm-fast train-prior``: train a small unconditional diffusion prior (see :mod:`ddfm_fast.train`).

``cli.py`` lists it; the training code (and torch) is imported when the command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click



def _model_args(path: Optional[str]) -> dict[str, Any]:
    from ddfm_fast.train import SMALL_PRIOR_ARGS

    if path is None:
        return dict(SMALL_PRIOR_ARGS)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise click.BadParameter(f"{path}: cannot read a JSON object of create_model arguments ({exc})",
                                 param_hint="--model-config") from exc
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a JSON object of create_model arguments",
                                 param_hint="--model-config")
    return data


@click.command("train-prior")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of training images (searched recursively); repeat for several.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Output .safetensors (EMA weights + config + training record); FILE.state.pt holds the resume state.")
@click.option("--steps", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Optimiser steps in total.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--crop", type=click.IntRange(min=1), default=64, show_default=True,
              help="Square random crop size in pixels (a multiple of the model's downsample factor).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True, max=1.0), default=2e-4, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True,
              help="Linear learning-rate warm-up steps.")
@click.option("--ema-decay", type=click.FloatRange(min=0, max=1, max_open=True), default=0.999, show_default=True)
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True)
@click.option("--gray/--colour", "gray", default=False, show_default=True,
              help="Reduce colour images to gray (the fused luminance; how ddfm-small was trained) or keep their "
                   "colour (gray images are always replicated to 3 channels).")
@click.option("--vflip/--no-vflip", default=False, show_default=True, help="Also flip crops vertically.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=500, show_default=True,
              help="Save every N steps (0: only at the end).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop and save after this much training time.")
@click.option("--default-steps", type=click.IntRange(min=1, max=1000), default=10, show_default=True,
              help="Sampling steps stored as the model's default.")
@click.option("--holdout-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Hold out every k-th image pair of --data (by dataset folder and stem) for evaluation; 0: none.")
@click.option("--schedule-fraction", type=click.FloatRange(min=0, max=1), default=0.0, show_default=True,
              help="Share of training timesteps drawn from the --default-steps sampler schedule (rest uniform).")
@click.option("--gamma-aug", type=click.FloatRange(min=0, max=2), default=0.0, show_default=True,
              help="Random gamma exp(U(-g, g)) applied to each crop.")
@click.option("--model-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON of create_model arguments (default: the ddfm-small architecture).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch.set_num_threads for CPU training.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from FILE.state.pt if present.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def train_prior_command(data, out, steps, batch_size, crop, lr, warmup, ema_decay, seed, gray, vflip,
                        checkpoint_every, max_minutes, default_steps, holdout_every, schedule_fraction, gamma_aug,
                        model_config, device, threads, resume, progress) -> None:
    """Train an unconditional epsilon-prediction DDPM prior on random crops of the images in --data."""
    from ddfm_fast.cli_options import check_writable, resolve_device
    from ddfm_fast.train import TrainSettings, command_line, train_prior

    if Path(out).suffix != ".safetensors":  # which also keeps it from replacing a training image
        raise click.BadParameter(f"{out}: the prior is written as safetensors; name it .safetensors",
                                 param_hint="--out")
    check_writable(Path(out), "--out")  # before hours of training, not after

    settings = TrainSettings(
        data=[str(d) for d in data], out=str(out), steps=steps, batch_size=batch_size, crop=crop, lr=lr,
        warmup=warmup, ema_decay=ema_decay, seed=seed, gray=gray, vflip=vflip, checkpoint_every=checkpoint_every,
        max_minutes=max_minutes, default_steps=default_steps, model_args=_model_args(model_config),
        device=str(resolve_device(device)), threads=threads, resume=resume,
        progress=progress, command=command_line(), holdout_every=holdout_every,
        schedule_fraction=schedule_fraction, gamma_aug=gamma_aug,
    )
    try:
        train_prior(settings, log=lambda m: click.echo(m, err=True))
    except (FileNotFoundError, ValueError, FloatingPointError, NotImplementedError) as exc:
        # ValueError covers unreadable data (TrainingDataError), bad settings, damaged resume states and model
        # configs (UNetConfig raises ValueError naming the field); each is one line, no traceback.
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # the output or its resume state cannot be written (disk full, read-only folder)
        from ddfm_fast.cli_options import one_line

        raise click.ClickException(f"--out {out}: {one_line(exc)}") from exc


if __name__ == "__main__":  # python -m ddfm_fast.cli_train ... (before cli.py registers the command)
    train_prior_command()
