"""``ddfm_fast.fuse``: one call from two images to the fused image, with the official driver's conventions.

Roles. The official ``sample.py`` passes the image it reads from ``vi/`` as ``I`` and the one from ``ir/`` as
``V`` (its variable names say the opposite). The EM step is asymmetric (``F = I - X``, so ``I`` is the image the
fused luminance is anchored to), and the paper's numbers come from that assignment, so we keep it:
``anchor = visible`` (MRI in medical fusion) and ``partner = infrared`` (CT / PET / SPECT).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ddfm_fast import io
from ddfm_fast.checkpoint import load_model
from ddfm_fast.em import TVProx
from ddfm_fast.em_only import fuse_em_only, postprocess_em_only
from ddfm_fast.fast import FastDDFMSampler, FastOptions
from ddfm_fast.sampler import DDFMSampler, StepOutput
from ddfm_fast.schedule import Respacing

ModelSpec = Union[nn.Module, str, Path, None]

# The official driver crops to multiples of 32 (ADM256 downsamples 5 times); every model we load divides it.
SIZE_MULTIPLE = 32


class NoDefaultModelError(RuntimeError):
    """No model was given and the shipped default prior is not available."""


@dataclass
class FusionResult:
    """One fused pair.

    Attributes:
        fused: the official 8-bit output (H, W) uint8: Y of the RGB sample, min-max to 0..255, rounded as the
            reference-era imageio did.
        luma: the unstretched luminance Y of the sample (H, W) float32 (OpenCV's YCrCb weights).
        sample: the raw final sample (3, H, W) float32 on the CPU, about [-1, 1], cropped to the input size.
        size: (H, W) of the output.
    """

    fused: np.ndarray
    luma: np.ndarray
    sample: torch.Tensor

    @property
    def size(self) -> tuple[int, int]:
        return self.fused.shape[0], self.fused.shape[1]

    def save(self, path: Union[str, Path]) -> Path:
        """Write the 8-bit fused image as PNG, atomically."""
        return io.save_png(self.fused, path)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEFAULT_PRIOR = "ddfm-small"


class DefaultPriorNotice(UserWarning):
    """Says which prior ``fuse`` used when no model was given (filter it with the warnings module)."""


def resolve_model(
    model: ModelSpec, *, model_config: Any = None, device: torch.device, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A loaded module as it is (moved to ``device``), a checkpoint path / preset name loaded strictly, or, for
    ``None``, the small prior shipped inside the package (with a one-line notice)."""
    if model is None:
        from ddfm_fast.checkpoint import PRESETS, resolve_preset

        try:
            path = resolve_preset(DEFAULT_PRIOR)
        except Exception as exc:  # the package was installed without its weights
            raise NoDefaultModelError(
                f"no model given and the shipped prior '{DEFAULT_PRIOR}' cannot be loaded ({exc}); pass "
                "model=<checkpoint path or preset> (e.g. 'adm256-uncond' for the paper's 256x256_diffusion_uncond.pt), "
                "or --checkpoint on the command line"
            ) from exc
        warnings.warn(
            f"ddfm-fast: using the shipped prior '{DEFAULT_PRIOR}' ({PRESETS[DEFAULT_PRIOR].description.split(';')[0]}); "
            "for the paper's model pass model='adm256-uncond' (CLI: --checkpoint adm256-uncond)",
            DefaultPriorNotice, stacklevel=3,
        )
        return load_model(path, device=device, dtype=dtype)
    if isinstance(model, nn.Module):
        return model.to(device)
    return load_model(model, config=model_config, device=device, dtype=dtype)


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """x_T ~ N(0, I) from a CPU generator seeded per image (the official ``manual_seed(seed); randn``).

    The CPU generator makes results independent of the device and of the other images in a batch.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def _prepare_pair(ir: io.ImageInput, vis: io.ImageInput, size_policy: io.SizePolicy, multiple: int):
    ir_gray = io.read_gray(ir, name="ir")
    vis_gray = io.read_gray(vis, name="vis")
    if ir_gray.shape != vis_gray.shape:
        raise ValueError(
            f"the two images differ in size: ir {_describe(ir)} is {ir_gray.shape[1]}x{ir_gray.shape[0]}, "
            f"vis {_describe(vis)} is {vis_gray.shape[1]}x{vis_gray.shape[0]} (width x height)"
        )
    anchor = io.apply_size_policy(io.to_model_range(vis_gray), size_policy, multiple)
    partner = io.apply_size_policy(io.to_model_range(ir_gray), size_policy, multiple)
    out_hw = ir_gray.shape if size_policy == "pad" else tuple(anchor.shape[-2:])
    return anchor, partner, out_hw


def _describe(src: Any) -> str:
    return str(src) if isinstance(src, (str, Path)) else f"<{type(src).__name__}>"


def postprocess_luma(F: torch.Tensor, out_hw: tuple[int, int]) -> FusionResult:
    """The official post-processing applied to a luminance (H, W) in [-1, 1] (EM-only fusion has no RGB sample)."""
    h, w = out_hw
    cropped = F[..., :h, :w].detach().float().cpu().contiguous()
    fused = postprocess_em_only(cropped)
    luma = cropped.numpy()
    sample = cropped.expand(3, h, w).clone()
    return FusionResult(fused=fused, luma=luma, sample=sample)


def postprocess(sample: torch.Tensor, out_hw: tuple[int, int]) -> FusionResult:
    """The official post-processing of one (3, H, W) sample, after cropping any padding away.

    Cropping before the min-max stretch keeps the padding from shifting the output's range.
    """
    h, w = out_hw
    sample = sample[..., :h, :w].detach().float().cpu().contiguous()
    luma = io.sample_luma(sample)
    fused = io.to_uint8_official(io.minmax_0_255(luma))
    return FusionResult(fused=fused, luma=luma, sample=sample.reshape(3, h, w))


@torch.no_grad()
def fuse(
    ir: Union[io.ImageInput, Sequence[io.ImageInput]],
    vis: Union[io.ImageInput, Sequence[io.ImageInput]],
    *,
    model: ModelSpec = None,
    model_config: Any = None,
    steps: Optional[Respacing] = None,
    seed: int = 3407,
    lamb: float = 0.5,
    rho: float = 0.001,
    size_policy: io.SizePolicy = "pad",
    backend: str = "auto",
    device: Union[str, torch.device, None] = None,
    callback: Optional[Callable[[StepOutput], None]] = None,
    tv_prox: TVProx = "shrink",
    tv_threshold: Optional[float] = None,
    fast: Union[FastOptions, str, None] = None,
    prior: str = "diffusion",
) -> Union[FusionResult, list[FusionResult]]:
    """Fuse an infrared (or functional) image with a visible (or MRI) image by DDFM.

    Args:
        ir, vis: paths, PIL images or arrays; or two equal-length lists of them (fused as one batch when all
            pairs share a size, with one EM tau per image so that they do not influence each other).
        model: a loaded UNet, a checkpoint path or a preset name.
        model_config: the model's ``create_model`` arguments (dict or JSON/YAML path) when the checkpoint lacks them.
        steps: the DDIM respacing; ``None`` means the model's own default (100 for the paper's model).
        seed: the seed of each image's initial noise (3407 in the official driver).
        lamb, rho: the EM step's TV weight and ADMM penalty.
        size_policy: ``"pad"`` (reflect-pad to /32, crop back: no pixel lost) or ``"crop"`` (official top-left
            crop to /32; with seed 3407 it reproduces the official driver).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the step tail.
        device: where to run; default CUDA when available, else CPU.
        callback: called after every step with a :class:`~ddfm_fast.sampler.StepOutput`.
        tv_prox, tv_threshold: the EM step's F update, ``"shrink"`` (official) or ``"soft"`` with its threshold
            (see :func:`ddfm_fast.em.em_step`).
        fast: accelerations (:class:`~ddfm_fast.fast.FastOptions`, or the presets ``"faithful"`` / ``"fast"``);
            ``None`` runs the faithful fp32 sampler. The model is cast to ``fast.dtype`` in place.
        prior: ``"diffusion"`` (DDFM) or ``"none"``: the paper's ablation I, EM iterations only from
            ``(I + V) / 2`` (``steps`` iterations, default 100; no model, so ``model`` must be None).

    Returns:
        A :class:`FusionResult`, or a list of them when lists were given.
    """
    many = isinstance(ir, (list, tuple))
    if many != isinstance(vis, (list, tuple)) or (many and len(ir) != len(vis)):
        raise ValueError("ir and vis must both be single images or two lists of the same length")
    irs, viss = (list(ir), list(vis)) if many else ([ir], [vis])
    if not irs:
        raise ValueError("no image pairs given")
    if prior not in ("diffusion", "none"):
        raise ValueError(f"prior must be 'diffusion' or 'none', got {prior!r}")
    if prior == "none" and model is not None:
        raise ValueError("prior='none' is EM only (ablation I) and uses no model; do not pass a model/checkpoint")
    dev = torch.device(device) if device is not None else default_device()
    pairs = [_prepare_pair(a, b, size_policy, SIZE_MULTIPLE) for a, b in zip(irs, viss)]
    results: list[Optional[FusionResult]] = [None] * len(pairs)
    # Group same-size pairs into one batch each.
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (anchor, _, _) in enumerate(pairs):
        groups.setdefault(tuple(anchor.shape[-2:]), []).append(k)

    if prior == "none":
        n_iter = int(steps) if steps is not None else 100
        for members in groups.values():
            I = torch.cat([pairs[k][0] for k in members]).to(dev)  # noqa: E741
            V = torch.cat([pairs[k][1] for k in members]).to(dev)
            F = fuse_em_only(I, V, steps=n_iter, lamb=lamb, rho=rho, tau_reduce="image")
            for b, k in enumerate(members):
                results[k] = postprocess_luma(F[b, 0], pairs[k][2])
        return results if many else results[0]  # type: ignore[return-value]

    net = resolve_model(model, model_config=model_config, device=dev)
    n_steps = steps if steps is not None else int(getattr(net, "default_steps", 100))
    options = FastOptions.preset(fast) if isinstance(fast, str) else fast
    for hw, members in groups.items():
        tau_reduce = "batch" if len(members) == 1 else "image"
        sampler = _sampler(n_steps, lamb=lamb, rho=rho, backend=backend, tau_reduce=tau_reduce,
                           tv_prox=tv_prox, tv_threshold=tv_threshold, options=options)
        I = torch.cat([pairs[k][0] for k in members]).to(dev)  # noqa: E741
        V = torch.cat([pairs[k][1] for k in members]).to(dev)
        x_start = torch.cat([initial_noise((1, 3, *hw), seed) for _ in members]).to(dev)
        out = sampler.sample(net, x_start, I, V, callback=callback).sample
        for b, k in enumerate(members):
            results[k] = postprocess(out[b], pairs[k][2])
    return results if many else results[0]  # type: ignore[return-value]


# Fast samplers keep compiled steps and captured graphs; reuse them across fuse() calls with the same settings.
_FAST_SAMPLERS: dict[tuple, FastDDFMSampler] = {}


def _sampler(steps: Respacing, *, options: Optional[FastOptions], **kwargs: Any) -> DDFMSampler:
    if options is None:
        return DDFMSampler(steps, **kwargs)
    key = (str(steps), options, tuple(sorted(kwargs.items())))
    if key not in _FAST_SAMPLERS:
        _FAST_SAMPLERS[key] = FastDDFMSampler(steps, options=options, **kwargs)
    return _FAST_SAMPLERS[key]
