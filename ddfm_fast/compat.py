"""Drop-in replacements for the official DDFM entry points (``guided_diffusion.unet.create_model``,
``guided_diffusion.gaussian_diffusion.create_sampler(...).p_sample_loop``).

Code written against the official repository keeps working::

    model = create_model(**load_yaml("configs/model_config_imagenet.yaml"))
    sampler = create_sampler(**load_yaml("configs/diffusion_config.yaml"))
    sample = sampler.p_sample_loop(model=model, x_start=x_start, record=False, I=I, V=V,
                                   save_root="out", img_index="00001", lamb=0.5, rho=0.001)

Differences, all on purpose: a checkpoint that fails to load is an error (the official ``create_model`` prints
the exception and continues with random weights); batches larger than one work (tau is still one mean over
the batch, as the official EM step computes it); no random numbers are drawn for the zero DDIM noise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ddfm_fast import io
from ddfm_fast.checkpoint import load_model
from ddfm_fast.config import AccelConfig, SamplerConfig
from ddfm_fast.sampler import DDFMSampler, StepOutput
from ddfm_fast.schedule import Respacing
from ddfm_fast.unet import ADM256_UNCOND_ARGS

# configs/diffusion_config.yaml of the official repository: the defaults of create_sampler here.
OFFICIAL_DIFFUSION_CONFIG: dict[str, Any] = {
    "sampler": "ddim",
    "steps": 1000,
    "noise_schedule": "linear",
    "model_mean_type": "epsilon",
    "model_var_type": "learned_range",
    "dynamic_threshold": False,
    "clip_denoised": True,
    "rescale_timesteps": False,
    "timestep_respacing": 100,
}


def create_model(**model_config: Any) -> nn.Module:
    """The official ``create_model(**model_config_imagenet.yaml)``, loading ``model_path`` strictly.

    Keys missing from ``model_config`` take the values of the official ``model_config_imagenet.yaml`` (the
    paper's 256x256 unconditional ADM). ``device`` and ``dtype`` may be given as extra keys.
    """
    config = {**ADM256_UNCOND_ARGS, **model_config}
    device = config.pop("device", "cpu")
    dtype = config.pop("dtype", torch.float32)
    model_path = config.pop("model_path", "")
    if not model_path:
        raise ValueError(
            "create_model: 'model_path' is empty. The official code would continue with random weights; "
            "ddfm-fast needs the checkpoint (e.g. models/256x256_diffusion_uncond.pt). For a random-weight model "
            "(benchmarks), build ddfm_fast.unet.UNetModel(UNetConfig.from_create_model_args(...)) yourself."
        )
    return load_model(model_path, config=config, device=device, dtype=dtype)


class DDIMCompat:
    """What the official ``create_sampler(...)`` returns, reduced to the one method DDFM uses."""

    def __init__(self, config: SamplerConfig, accel: AccelConfig) -> None:
        self.config, self.accel = config, accel
        self.sampler = DDFMSampler(config, accel)
        self.num_timesteps = self.sampler.num_steps
        self.timestep_map = self.sampler.schedule.timestep_map.tolist()

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: nn.Module,
        x_start: torch.Tensor,
        record: bool,
        I: torch.Tensor,  # noqa: E741 (official name)
        V: torch.Tensor,
        save_root: Union[str, os.PathLike, None],
        img_index: Any,
        lamb: float,
        rho: float,
    ) -> torch.Tensor:
        """The official loop: returns the final sample (B, 3, H, W); with ``record`` writes the progress PNGs
        ``save_root/progress/<img_index>/x_<idx:04d>.png`` (Y channel, min-max, truncated to uint8)."""
        config = self.config.replace(lamb=lamb, rho=rho)
        if config != self.sampler.config:  # the official call passes lamb and rho per image
            self.sampler.close()
            self.sampler = DDFMSampler(config, self.accel)
        if not record:
            return self.sampler.sample(model, x_start, I, V).sample
        if save_root is None:
            raise ValueError("p_sample_loop: record=True needs a save_root")
        folder = Path(save_root) / "progress" / str(img_index)
        folder.mkdir(parents=True, exist_ok=True)

        def save_progress(out: StepOutput) -> None:
            # The official code squeezes the batch, so only batch size 1 can be recorded.
            luma = io.sample_luma(out.x_prev[:1])
            io.save_png(io.to_uint8_truncated(luma), folder / f"x_{out.idx:04d}.png")

        return self.sampler.sample(model, x_start, I, V, callback=save_progress).sample


def create_sampler(
    sampler: str = "ddim",
    steps: int = 1000,
    noise_schedule: str = "linear",
    model_mean_type: str = "epsilon",
    model_var_type: str = "learned_range",
    dynamic_threshold: bool = False,
    clip_denoised: bool = True,
    rescale_timesteps: bool = False,
    timestep_respacing: Optional[Respacing] = "",
    *,
    backend: str = "auto",
) -> DDIMCompat:
    """The official ``create_sampler(**diffusion_config.yaml)``; ``timestep_respacing`` as int or string.

    Only what DDFM uses is supported; anything else is a clear error rather than a different sampler.
    ``model_var_type`` is accepted and ignored: DDIM with eta = 0 discards the variance (as official).
    ``rescale_timesteps`` changes nothing for a 1000-step base (the factor is 1000 / 1000).
    """
    if sampler != "ddim":
        raise NotImplementedError(f"create_sampler: sampler {sampler!r} is not supported; DDFM uses 'ddim'")
    if noise_schedule != "linear":
        raise NotImplementedError(f"create_sampler: noise_schedule {noise_schedule!r}; only 'linear' is supported")
    if model_mean_type != "epsilon":
        raise NotImplementedError(f"create_sampler: model_mean_type {model_mean_type!r}; only 'epsilon' is supported")
    if dynamic_threshold:
        raise NotImplementedError("create_sampler: dynamic_threshold=True is not supported (the DDFM config is False)")
    if rescale_timesteps and steps != 1000:
        raise NotImplementedError("create_sampler: rescale_timesteps with a base other than 1000 steps")
    respacing: Respacing = timestep_respacing if timestep_respacing not in ("", None) else steps
    config = SamplerConfig(steps=respacing, tau_reduce="batch", clip=clip_denoised, size_policy="crop",
                           train_timesteps=steps)
    return DDIMCompat(config, AccelConfig(backend=backend))
