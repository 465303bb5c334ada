"""``ddfm_fast.fuse``: one call from two images to the fused image, with the official driver's conventions.

Roles. The official ``sample.py`` passes the image it reads from ``vi/`` as ``I`` and the one from ``ir/`` as
``V`` (its variable names say the opposite). The EM step is asymmetric (``F = I - X``, so ``I`` is the image the
fused luminance is anchored to), and the paper's numbers come from that assignment, so we keep it:
``anchor = visible`` (MRI in medical fusion) and ``partner = infrared`` (CT / PET / SPECT).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
import os
from typing import Any, Callable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from ddfm_fast import io
from ddfm_fast.checkpoint import load_model
from ddfm_fast.config import DEFAULT_PRIOR, AccelConfig, SamplerConfig
from ddfm_fast.em import EMState
from ddfm_fast.em_only import fuse_em_only, postprocess_em_only
from ddfm_fast.plan import ExecutionPlan, check_device
from ddfm_fast.sampler import DDFMSampler, StepOutput

ModelSpec = Union[nn.Module, str, Path, None]


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
    color: Optional[np.ndarray] = None  # (H, W, 3) uint8: the fused luminance with a source's chroma (color=...)

    @property
    def size(self) -> tuple[int, int]:
        return self.fused.shape[0], self.fused.shape[1]

    @property
    def image(self) -> np.ndarray:
        """What :meth:`save` writes: the colour image when one was asked for, else the official 8-bit gray."""
        return self.color if self.color is not None else self.fused

    def save(self, path: Union[str, Path]) -> Path:
        """Write :attr:`image` in the format ``path``'s extension names (.png, .tif, .jpg, .bmp), or for ``.npy``
        the unstretched luminance in the input scale, ``(luma + 1) / 2`` float32 (what ``fuse --raw`` writes),
        atomically. Raises :class:`ValueError` naming the path for an
        extension that is not an output format, or a path that cannot be written (a folder, a file in the way)."""
        from ddfm_fast import outputs

        problem = outputs.output_problem(path, folder=False)
        if problem:
            raise ValueError(f"cannot write there: {problem}")
        fmt = outputs.format_of(path)
        outputs.write_output(io.luma_to_unit(self.luma) if fmt == "npy" else self.image, path, fmt)
        return Path(path)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")




class DefaultPriorNotice(UserWarning):
    """Says which prior ``fuse`` used when no model was given (filter it with the warnings module)."""


def resolve_model(
    model: ModelSpec, *, model_config: Any = None, device: torch.device, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A loaded module as it is (moved to ``device``), a checkpoint path / preset name loaded strictly, or, for
    ``None``, the prior shipped with the package (:data:`DEFAULT_PRIOR`, with a one-line notice)."""
    if model is None:
        from ddfm_fast.checkpoint import PRESETS

        if model_config is not None:
            raise ValueError("model_config describes a checkpoint's architecture, but no model is given (the "
                             f"shipped prior '{DEFAULT_PRIOR}' has no config); pass model= with it")
        warnings.warn(
            f"ddfm-fast: using the shipped prior '{DEFAULT_PRIOR}' ({PRESETS[DEFAULT_PRIOR].description.split(';')[0]}); "
            "for the paper's model pass model='adm256-uncond' (CLI: --checkpoint adm256-uncond)",
            DefaultPriorNotice, stacklevel=caller_stacklevel(),
        )
        return load_model(DEFAULT_PRIOR, device=device, dtype=dtype)
    if isinstance(model, nn.Module):
        if model_config is not None:
            raise ValueError("model_config describes a checkpoint to load, but model is a loaded module")
        where = module_device(model, device)
        if where != torch.device(device) and not (where.type == torch.device(device).type == "cuda"
                                                  and torch.device(device).index is None):
            raise ValueError(f"the model is on {where} but device={str(device)!r}; move it first "
                             f"(model.to({str(device)!r})) or pass device={str(where)!r}")
        return model
    return load_model(model, config=model_config, device=device, dtype=dtype)


def module_device(model: nn.Module, default: Union[str, torch.device]) -> torch.device:
    """Where ``model`` lives: its first parameter's device, else its first buffer's (an analytic prior has only
    buffers), else ``default``."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device(default) if first is None else first.device


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside ddfm-fast and torch's wrappers."""
    import inspect

    package = str(Path(__file__).resolve().parent)
    torch_dir = str(Path(torch.__file__).resolve().parent)
    frame, level = inspect.currentframe(), 0
    while frame is not None:
        name = str(Path(frame.f_code.co_filename).resolve()) if not frame.f_code.co_filename.startswith("<") \
            else frame.f_code.co_filename
        if level > 0 and not name.startswith(package) and not name.startswith(torch_dir):
            return level
        frame, level = frame.f_back, level + 1
    return 2


def split_images(src: Any, name: str) -> list[Any]:
    """The images one ``fuse()`` argument holds: a list/tuple of images, a batched tensor (N, C, H, W) or array
    (N, H, W, C), or one image (path, PIL image, array (H, W) / (H, W, 3), tensor (H, W) / (C, H, W))."""
    if isinstance(src, (list, tuple)):
        return [one for item in src for one in split_images(item, name)]
    if isinstance(src, torch.Tensor):
        t = src.detach().cpu()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()  # numpy has no bfloat16
        if t.ndim == 4:
            return [_chw_to_hwc(x, name) for x in t]
        if t.ndim == 3:
            return [_chw_to_hwc(t, name)]
        if t.ndim == 2:
            return [t.numpy()]
        raise ValueError(f"{name}: a tensor image must be (H, W), (C, H, W) or (N, C, H, W), got {tuple(t.shape)}")
    if isinstance(src, np.ndarray) and src.ndim == 4:  # (N, H, W, C)
        return [x[..., 0] if x.shape[-1] == 1 else x for x in src]
    return [src]


def _chw_to_hwc(t: torch.Tensor, name: str) -> np.ndarray:
    if t.shape[0] not in (1, 3):
        raise ValueError(f"{name}: a (C, H, W) tensor needs C = 1 or 3 channels, got {tuple(t.shape)} (an (H, W, C) "
                         "image goes in as a numpy array)")
    arr = t.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _rgb8(src: Any, name: str) -> np.ndarray:
    """A source as (H, W, 3) uint8 for colour output."""
    if isinstance(src, (str, os.PathLike, Image.Image)):
        return io.read_rgb8(src, name=name)
    arr = np.asarray(src)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return np.round(arr / 257.0).astype(np.uint8)
    return np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


ColorChoice = Union[bool, Literal["vis", "ir"], None]


def colour_source(ir: Any, vis: Any, color: ColorChoice) -> Optional[np.ndarray]:
    """The RGB image whose chroma the colour output keeps: ``"vis"``, ``"ir"``, or for ``True`` the visible image
    when it has colour, else the infrared / functional one (a PET or SPECT map in medical fusion)."""
    if not color:
        return None
    if color not in (True, "vis", "ir"):
        raise ValueError(f"color must be True, False, 'vis' or 'ir', got {color!r}")
    if color == "ir":
        return _rgb8(ir, "ir")
    vis_rgb = _rgb8(vis, "vis")
    if color == "vis" or io.has_chroma(vis_rgb):
        return vis_rgb
    return _rgb8(ir, "ir")


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
    out_hw: tuple[int, int]  # the output's (H, W)
    in_hw: tuple[int, int] = (0, 0)  # both sources' (H, W) after any resize, before the size policy


def prepare_pair(ir: io.ImageInput, vis: io.ImageInput, size_policy: io.SizePolicy, *,
                 resize: Optional[Literal["ir", "vis"]] = None) -> PreparedPair:
    """Read both images as the official driver does, check their sizes agree (or resize), apply the size policy."""
    if resize is None:
        check_header_sizes(ir, vis)
    ir_gray = io.read_gray(ir, name="ir")
    vis_gray = io.read_gray(vis, name="vis")
    return prepare_arrays(ir_gray, vis_gray, size_policy, ir_name=_describe(ir), vis_name=_describe(vis),
                          resize=resize)


def check_header_sizes(ir: io.ImageInput, vis: io.ImageInput) -> None:
    """Raise the size-mismatch ``ValueError`` from the two headers, before either image is decoded (a mismatch
    then costs nothing to report). Sizes equal up to a quarter turn wait for the decode, which knows the EXIF
    orientation for certain."""
    ir_wh, vis_wh = io.image_size(ir), io.image_size(vis)
    cap = io.pixel_cap()
    for src, (w, h) in ((ir, ir_wh), (vis, vis_wh)):  # the cap is the first thing a header is checked for
        if w * h > cap:
            raise io.too_big(_describe(src), w, h, cap)
    if sorted(ir_wh) != sorted(vis_wh):
        raise _size_mismatch(_describe(ir), ir_wh, _describe(vis), vis_wh)


def prepare_arrays(ir_gray: np.ndarray, vis_gray: np.ndarray, size_policy: io.SizePolicy, *,
                   ir_name: str = "ir", vis_name: str = "vis",
                   resize: Optional[Literal["ir", "vis"]] = None) -> PreparedPair:
    """:func:`prepare_pair` for gray arrays in [0, 1] that were already read.

    ``resize="ir"`` brings the visible image to the infrared one's size, ``"vis"`` the other way; None makes a
    size mismatch an error.
    """
    if ir_gray.shape != vis_gray.shape:
        if resize == "ir":
            vis_gray = io.resize_gray(vis_gray, ir_gray.shape)
        elif resize == "vis":
            ir_gray = io.resize_gray(ir_gray, vis_gray.shape)
        elif resize is None:
            raise _size_mismatch(ir_name, ir_gray.shape[::-1], vis_name, vis_gray.shape[::-1])
        else:
            raise ValueError(f"resize must be None, 'ir' or 'vis', got {resize!r}")
    _, out_hw = io.model_size(ir_gray.shape, size_policy)
    anchor = io.apply_size_policy(io.to_model_range(vis_gray), size_policy)
    partner = io.apply_size_policy(io.to_model_range(ir_gray), size_policy)
    return PreparedPair(anchor, partner, out_hw, tuple(ir_gray.shape))


def _size_mismatch(ir_name: str, ir_wh: Sequence[int], vis_name: str, vis_wh: Sequence[int]) -> ValueError:
    return ValueError(
        f"the two images differ in size: ir {ir_name} is {ir_wh[0]}x{ir_wh[1]}, vis {vis_name} is "
        f"{vis_wh[0]}x{vis_wh[1]} (width x height); pass resize='ir' or resize='vis' (CLI: --resize-to-ir / "
        "--resize-to-vis) or fix the inputs"
    )


def _describe(src: Any) -> str:
    return io.display_name(src) if isinstance(src, (str, bytes, Path)) else f"<{type(src).__name__}>"


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
    color: ColorChoice = False,
    resize: Optional[Literal["ir", "vis"]] = None,
    **options: Any,
) -> Union[FusionResult, list[FusionResult]]:
    """Fuse an infrared (or functional) image with a visible (or MRI) image by DDFM.

    Args:
        ir, vis: one image each -- a path, a PIL image, a numpy array (H, W) or (H, W, 3) (uint8, uint16, or float
            in [0, 1]), a tensor (H, W) or (C, H, W) -- or as many as you like: equal-length lists, or batched
            tensors (N, C, H, W). Many pairs fuse as one batch per image size, with one EM tau per image so that
            they do not influence each other.
        model: a loaded UNet, a checkpoint path or a preset name; None is the shipped default prior
            (:data:`~ddfm_fast.config.DEFAULT_PRIOR`, the analytic ``ddfm-shrink``).
        model_config: the model's ``create_model`` arguments (dict or JSON/YAML path) when the checkpoint lacks them.
        config: what to compute (:class:`~ddfm_fast.config.SamplerConfig`; default ``SamplerConfig()``:
            the model's default steps, seed 3407, the official lambda and rho, pad to /32).
        accel: how to run it (:class:`~ddfm_fast.config.AccelConfig`, or the presets ``"faithful"`` / ``"fast"``);
            None is the faithful fp32 path. The caller's model is never modified.
        device: where to run; default CUDA when available, else CPU.
        callback: called after every step (with ``prior="none"``: every EM iteration, ``timestep`` None) with a
            :class:`~ddfm_fast.sampler.StepOutput`; an exception raised in it stops the fusion there.
        color: also make a colour image (``FusionResult.color``; ``save()`` writes it): ``True`` keeps the chroma
            of the visible image, or of the infrared / functional one when the visible image is gray (PET, SPECT);
            ``"vis"`` / ``"ir"`` choose the source.
        resize: for pairs of different sizes, ``"ir"`` resizes the visible image to the infrared one's size,
            ``"vis"`` the other way (Pillow LANCZOS); None (default) makes a size mismatch an error.
        **options: fields of :class:`SamplerConfig` that override ``config`` (``steps=20``, ``seed=0``,
            ``prior="none"``, ``tv_prox="soft", tv_threshold=0.05``, ...).

    Returns:
        A :class:`FusionResult`, or a list of them when lists were given.
    """
    cfg = (config or SamplerConfig()).replace(**options) if options else (config or SamplerConfig())
    accel_cfg = AccelConfig.preset(accel)
    if color not in (False, None, True, "vis", "ir"):
        raise ValueError(f"color must be True, False, 'vis' or 'ir', got {color!r}")
    if resize not in (None, "ir", "vis"):
        raise ValueError(f"resize must be None, 'ir' or 'vis', got {resize!r}")
    irs, viss = split_images(ir, "ir"), split_images(vis, "vis")
    many = len(irs) != 1 or any(isinstance(x, (list, tuple)) or (getattr(x, "ndim", 0) == 4 and
                                                                  isinstance(x, (torch.Tensor, np.ndarray)))
                                for x in (ir, vis))
    if len(irs) != len(viss):
        raise ValueError(f"ir holds {len(irs)} image(s) and vis {len(viss)}; give one of each, or as many of both")
    if not irs:
        raise ValueError("no image pairs given")
    if cfg.prior == "none" and (model is not None or model_config is not None):
        raise ValueError("prior='none' is EM only (ablation I) and uses no model; do not pass a model/checkpoint "
                         "or model_config")
    if device is not None:
        dev = check_device(device)
        if isinstance(model, nn.Module) and dev.type == "cuda" and dev.index is None:
            dev = module_device(model, dev)  # "cuda": the model's GPU
    elif isinstance(model, nn.Module):
        dev = module_device(model, torch.device("cpu"))
    else:
        dev = default_device()
    with torch.no_grad():
        pairs = [prepare_pair(a, b, cfg.size_policy, resize=resize) for a, b in zip(irs, viss)]
        net = None if cfg.prior == "none" else resolve_model(model, model_config=model_config, device=dev)
        try:
            results = fuse_prepared(pairs, cfg, accel_cfg, net, dev, callback=callback)
        finally:
            if net is not None and not isinstance(model, nn.Module):
                # A model loaded here is not seen again: cached samplers drop its runners and copies.
                for sampler in _SAMPLERS.values():
                    sampler.release(net)
    if color:
        for res, pair, a, b in zip(results, pairs, irs, viss):
            source = colour_source(a, b, color)
            assert source is not None
            if source.shape[:2] != pair.in_hw:  # this source was resized to its partner's size
                source = io.resize_rgb8(source, pair.in_hw)
            res.color = io.colorize(res.fused, source[: res.size[0], : res.size[1]])  # crop policy: top-left
    return results if many else results[0]


def _em_iteration_callback(callback: Callable[[StepOutput], None], total: int
                           ) -> Callable[[int, torch.Tensor, EMState], None]:
    """An EM-only iteration handed to a per-step callback as a :class:`StepOutput`: the estimate F as a grey RGB
    sample (its luminance is F), ``idx`` counting down as the sampler's does, no timestep (there is no UNet)."""

    def on_iteration(i: int, f: torch.Tensor, state: EMState) -> None:
        grey = f.expand(-1, 3, -1, -1)
        callback(StepOutput(j=i, idx=total - 1 - i, timestep=None, x_prev=grey, pred_xstart=grey, state=state))

    return on_iteration


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
            F = fuse_em_only(I, V, cfg, None if callback is None else _em_iteration_callback(callback, cfg.num_steps()))
            for b, k in enumerate(members):
                results[k] = postprocess_luma(F[b, 0], pairs[k].out_hw)
            continue
        if model is None:
            raise ValueError("fuse_prepared: a diffusion prior needs a model (prior='none' needs none)")
        sampler = _sampler_for(cfg, accel)
        x_start = torch.cat([initial_noise((1, 3, *hw), cfg.seed) for _ in members]).to(device)
        out = sampler.sample(model, x_start, I, V, callback=callback)
        for b, k in enumerate(members):
            results[k] = postprocess(out.sample[b], pairs[k].out_hw, plan=out.plan)
    return results  # type: ignore[return-value]
