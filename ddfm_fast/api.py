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
from ddfm_fast.config import AccelConfig, SamplerConfig
from ddfm_fast.em_only import fuse_em_only, postprocess_em_only
from ddfm_fast.plan import ExecutionPlan, check_device
from ddfm_fast.sampler import DDFMSampler, StepOutput

ModelSpec = Union[nn.Module, str, Path, None]


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
    plan: Optional[ExecutionPlan] = None  # how the step ran (None for EM-only fusion, which has no UNet step)

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


@dataclass
class PreparedPair:
    """One pair read, validated and brought to the model's size: the sampler's inputs and the output size."""

    anchor: torch.Tensor  # I: (1, 1, h, w) in [-1, 1], the visible / MRI image
    partner: torch.Tensor  # V: (1, 1, h, w) in [-1, 1], the infrared / functional image
    out_hw: tuple[int, int]


def prepare_pair(ir: io.ImageInput, vis: io.ImageInput, size_policy: io.SizePolicy) -> PreparedPair:
    """Read both images as the official driver does, check their sizes agree, apply the size policy."""
    ir_gray = io.read_gray(ir, name="ir")
    vis_gray = io.read_gray(vis, name="vis")
    return prepare_arrays(ir_gray, vis_gray, size_policy, ir_name=_describe(ir), vis_name=_describe(vis))


def prepare_arrays(ir_gray: np.ndarray, vis_gray: np.ndarray, size_policy: io.SizePolicy, *,
                   ir_name: str = "ir", vis_name: str = "vis") -> PreparedPair:
    """:func:`prepare_pair` for gray arrays in [0, 1] that were already read."""
    if ir_gray.shape != vis_gray.shape:
        raise ValueError(
            f"the two images differ in size: ir {ir_name} is {ir_gray.shape[1]}x{ir_gray.shape[0]}, "
            f"vis {vis_name} is {vis_gray.shape[1]}x{vis_gray.shape[0]} (width x height)"
        )
    _, out_hw = io.model_size(ir_gray.shape, size_policy)
    anchor = io.apply_size_policy(io.to_model_range(vis_gray), size_policy)
    partner = io.apply_size_policy(io.to_model_range(ir_gray), size_policy)
    return PreparedPair(anchor, partner, out_hw)


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


def postprocess(sample: torch.Tensor, out_hw: tuple[int, int], plan: Optional[ExecutionPlan] = None) -> FusionResult:
    """The official post-processing of one (3, H, W) sample, after cropping any padding away.

    Cropping before the min-max stretch keeps the padding from shifting the output's range.
    """
    h, w = out_hw
    sample = sample[..., :h, :w].detach().float().cpu().contiguous()
    luma = io.sample_luma(sample)
    fused = io.to_uint8_official(io.minmax_0_255(luma))
    return FusionResult(fused=fused, luma=luma, sample=sample.reshape(3, h, w), plan=plan)


def _sampler_for(config: SamplerConfig, accel: AccelConfig) -> DDFMSampler:
    """A sampler per (config, accel); accelerated ones are kept (bounded) so compiled steps and graphs are reused
    across ``fuse()`` calls with the same settings."""
    if accel == AccelConfig():
        return DDFMSampler(config, accel)
    key = (config, accel)
    if key in _SAMPLERS:
        _SAMPLERS[key] = _SAMPLERS.pop(key)
        return _SAMPLERS[key]
    while len(_SAMPLERS) >= _MAX_SAMPLERS:
        _SAMPLERS.pop(next(iter(_SAMPLERS))).close()
    _SAMPLERS[key] = DDFMSampler(config, accel)
    return _SAMPLERS[key]


_SAMPLERS: dict[tuple[SamplerConfig, AccelConfig], DDFMSampler] = {}
_MAX_SAMPLERS = 4


@torch.no_grad()
def fuse(
    ir: Union[io.ImageInput, Sequence[io.ImageInput]],
    vis: Union[io.ImageInput, Sequence[io.ImageInput]],
    *,
    model: ModelSpec = None,
    model_config: Any = None,
    config: Optional[SamplerConfig] = None,
    accel: Union[AccelConfig, str, None] = None,
    device: Union[str, torch.device, None] = None,
    callback: Optional[Callable[[StepOutput], None]] = None,
    **options: Any,
) -> Union[FusionResult, list[FusionResult]]:
    """Fuse an infrared (or functional) image with a visible (or MRI) image by DDFM.

    Args:
        ir, vis: paths, PIL images or arrays; or two equal-length lists of them (fused as one batch per image
            size, with one EM tau per image so that they do not influence each other).
        model: a loaded UNet, a checkpoint path or a preset name; None is the small prior shipped in the package.
        model_config: the model's ``create_model`` arguments (dict or JSON/YAML path) when the checkpoint lacks them.
        config: what to compute (:class:`~ddfm_fast.config.SamplerConfig`; default ``SamplerConfig()``:
            the model's default steps, seed 3407, the official lambda and rho, pad to /32).
        accel: how to run it (:class:`~ddfm_fast.config.AccelConfig`, or the presets ``"faithful"`` / ``"fast"``);
            None is the faithful fp32 path. The caller's model is never modified.
        device: where to run; default CUDA when available, else CPU.
        callback: called after every step with a :class:`~ddfm_fast.sampler.StepOutput`.
        **options: fields of :class:`SamplerConfig` that override ``config`` (``steps=20``, ``seed=0``,
            ``prior="none"``, ``tv_prox="soft", tv_threshold=0.05``, ...).

    Returns:
        A :class:`FusionResult`, or a list of them when lists were given.
    """
    cfg = (config or SamplerConfig()).replace(**options) if options else (config or SamplerConfig())
    accel_cfg = AccelConfig.preset(accel)
    many = isinstance(ir, (list, tuple))
    if many != isinstance(vis, (list, tuple)) or (many and len(ir) != len(vis)):
        raise ValueError("ir and vis must both be single images or two lists of the same length")
    irs, viss = (list(ir), list(vis)) if many else ([ir], [vis])
    if not irs:
        raise ValueError("no image pairs given")
    if cfg.prior == "none" and model is not None:
        raise ValueError("prior='none' is EM only (ablation I) and uses no model; do not pass a model/checkpoint")
    dev = check_device(device) if device is not None else default_device()
    pairs = [prepare_pair(a, b, cfg.size_policy) for a, b in zip(irs, viss)]
    net = None if cfg.prior == "none" else resolve_model(model, model_config=model_config, device=dev)
    results = fuse_prepared(pairs, cfg, accel_cfg, net, dev, callback=callback)
    return results if many else results[0]


def fuse_prepared(pairs: Sequence[PreparedPair], config: SamplerConfig, accel: AccelConfig,
                  model: Optional[nn.Module], device: torch.device, *,
                  callback: Optional[Callable[[StepOutput], None]] = None) -> list[FusionResult]:
    """Fuse already read and validated pairs, one batch per model size (the layer the folder runner calls).

    ``model`` is None for ``config.prior == "none"``. Raises :class:`~ddfm_fast.sampler.NonFiniteError` (or the
    EM-only equivalent) when a batch went non-finite.
    """
    results: list[Optional[FusionResult]] = [None] * len(pairs)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, pair in enumerate(pairs):
        groups.setdefault(tuple(pair.anchor.shape[-2:]), []).append(k)
    cfg = config.for_model(getattr(model, "default_steps", None))
    for hw, members in groups.items():
        I = torch.cat([pairs[k].anchor for k in members]).to(device)  # noqa: E741
        V = torch.cat([pairs[k].partner for k in members]).to(device)
        if cfg.prior == "none":
            F = fuse_em_only(I, V, cfg)
            for b, k in enumerate(members):
                results[k] = postprocess_luma(F[b, 0], pairs[k].out_hw)
            continue
        assert model is not None
        sampler = _sampler_for(cfg, accel)
        x_start = torch.cat([initial_noise((1, 3, *hw), cfg.seed) for _ in members]).to(device)
        out = sampler.sample(model, x_start, I, V, callback=callback)
        for b, k in enumerate(members):
            results[k] = postprocess(out.sample[b], pairs[k].out_hw, plan=out.plan)
    return results  # type: ignore[return-value]
