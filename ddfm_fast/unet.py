"""The ADM UNet of guided-diffusion (Dhariwal & Nichol 2021), the prior DDFM samples from.

DDFM (Zhao et al., ICCV 2023) uses OpenAI's unconditional 256x256 ImageNet model
(``256x256_diffusion_uncond.pt``) unchanged. This module rebuilds that architecture so that
``UNetModel(config).state_dict()`` has exactly the keys, order and shapes of guided-diffusion's
``UNetModel``: the official checkpoints load with ``strict=True``.

Numerics follow the official code (its guided-diffusion ``UNetModel`` as the golden vectors were made with):

* timestep embedding ``[cos, sin]`` with ``freqs = exp(-ln(10000) * arange(half) / half)``, in float32;
* GroupNorm computed in float32 and cast back (guided-diffusion's ``GroupNorm32``), 32 groups, eps 1e-5;
* attention in the *legacy* head layout (heads split before q/k/v), run through
  ``F.scaled_dot_product_attention`` instead of two explicit einsums.

Only the parts DDFM needs are built: 2-D images, no class conditioning, legacy attention order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _grad_checkpoint

from ddfm_fast.schedule import NUM_TRAIN_TIMESTEPS, linear_betas

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# guided-diffusion's create_model() fills channel_mult from the image size when it is "".
_DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# create_model()'s keyword defaults (guided_diffusion/unet.py). The first three have no default.
_CREATE_MODEL_DEFAULTS: dict[str, Any] = {
    "channel_mult": "",
    "learn_sigma": False,
    "class_cond": False,
    "use_checkpoint": False,
    "attention_resolutions": "16",
    "num_heads": 1,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": False,
    "dropout": 0.0,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "model_path": "",
}
_CREATE_MODEL_REQUIRED = ("image_size", "num_channels", "num_res_blocks")
# ddfm-fast extensions accepted next to the official arguments (not understood by create_model).
_CREATE_MODEL_EXTENSIONS = ("norm_groups", "middle_attention", "prediction", "stem_unshuffle")
# What the network's first three output channels mean (``prediction``): "eps" the noise (guided-diffusion, every
# official checkpoint) or "v" = sqrt(ac) eps - sqrt(1 - ac) x0 (Salimans & Ho 2022); a "v" model converts its
# output to eps inside ``forward``, so every sampler sees an epsilon model.
PREDICTIONS = ("eps", "v")


def _number(value: float) -> float:
    """Keep integral channel multipliers as ``int`` so configs print and serialise as 1, 2, 4."""
    return int(value) if float(value).is_integer() else float(value)


def _parse_channel_mult(value: Any, image_size: int) -> tuple[float, ...]:
    if value in ("", None):
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"channel_mult is empty and image_size {image_size} has no official default "
                f"(known: {sorted(_DEFAULT_CHANNEL_MULT)}); give channel_mult explicitly"
            )
        return _DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(value, str):
        return tuple(_number(float(part)) for part in value.split(","))
    if isinstance(value, (int, float)):
        return (_number(value),)
    return tuple(_number(v) for v in value)


def _parse_attention_resolutions(value: Any, image_size: int) -> tuple[int, ...]:
    """Resolutions in pixels ("32,16,8") -> downsample rates (8, 16, 32), as create_model does."""
    if isinstance(value, str):
        resolutions = [int(part) for part in value.split(",") if part.strip()]
    elif isinstance(value, int):
        resolutions = [value]
    else:
        resolutions = [int(v) for v in value]
    return tuple(image_size // res for res in resolutions)


@dataclass(frozen=True)
class UNetConfig:
    """The resolved architecture of a guided-diffusion ``UNetModel``.

    Field names follow ``UNetModel.__init__`` of guided-diffusion. ``attention_resolutions`` holds
    *downsample rates* (1 = full resolution), not pixel sizes; ``from_create_model_args`` converts.
    ``use_fp16`` and ``use_checkpoint`` are recorded for completeness: precision is chosen by the
    caller (``load_model(dtype=...)``) and ``use_checkpoint`` only enables gradient checkpointing.
    ``norm_groups`` and ``middle_attention`` are ddfm-fast extensions for small models; their defaults (32 = the
    official GroupNorm32; True = ADM's ResBlock-attention-ResBlock middle) leave the official layout unchanged.
    ``middle_attention=False`` drops the middle block's attention (its two ResBlocks keep the keys
    ``middle_block.0`` and ``middle_block.1``), so a model without any attention is fully convolutional and its
    cost grows linearly with the image area.
    Two more extensions, off by default (the official layout): ``prediction="v"`` (see :data:`PREDICTIONS`) and
    ``stem_unshuffle=k``, which folds each k x k pixel block into channels before the stem conv
    (``pixel_unshuffle``) and unfolds the output conv's k*k*out_channels maps at the end (``pixel_shuffle``), so
    the whole UNet runs at 1/k resolution. The state-dict keys stay the same; only the stem's input and the
    output conv's output widths grow by k*k.
    """

    image_size: int
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[float, ...]
    attention_resolutions: tuple[int, ...]
    in_channels: int = 3
    out_channels: int = 3
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    dropout: float = 0.0
    conv_resample: bool = True
    use_checkpoint: bool = False
    use_fp16: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-5
    middle_attention: bool = True
    prediction: str = "eps"
    stem_unshuffle: int = 1

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so the config stays hashable and immutable.
        object.__setattr__(self, "channel_mult", tuple(_number(m) for m in self.channel_mult))
        object.__setattr__(
            self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions)
        )
        self._validate()

    def _validate(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not isinstance(self.stem_unshuffle, int) or isinstance(self.stem_unshuffle, bool) \
                or not 1 <= self.stem_unshuffle <= 8:
            raise ValueError(f"stem_unshuffle must be an integer from 1 to 8, got {self.stem_unshuffle!r}")
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ValueError("num_heads must be >= 1 when num_head_channels is -1")
        for mult in self.channel_mult:
            channels = int(mult * self.model_channels)
            if channels % self.norm_groups:
                raise ValueError(
                    f"{channels} channels (channel_mult {mult} x {self.model_channels}) "
                    f"are not divisible by norm_groups={self.norm_groups}"
                )
            if self.num_head_channels != -1 and channels % self.num_head_channels:
                raise ValueError(
                    f"{channels} channels are not divisible by num_head_channels={self.num_head_channels}"
                )

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_create_model_args(cls, args: Mapping[str, Any]) -> UNetConfig:
        """Resolve guided-diffusion ``create_model(**args)`` keyword arguments to a config.

        Missing optional keys take create_model's defaults; ``model_path`` is ignored.
        ``class_cond`` and ``use_new_attention_order`` are not supported (DDFM uses neither).
        """
        unknown = set(args) - set(_CREATE_MODEL_DEFAULTS) - set(_CREATE_MODEL_REQUIRED)
        unknown -= set(_CREATE_MODEL_EXTENSIONS)
        if unknown:
            # The config's own field names (what a checkpoint's metadata and train-prior's "model:" line show)
            # are not create_model's: say which name to use.
            renamed = {"model_channels": "num_channels", "out_channels": "learn_sigma"}
            hints = [f"{k} is {renamed[k]} here" for k in sorted(unknown) if k in renamed]
            known = sorted({*_CREATE_MODEL_REQUIRED, *_CREATE_MODEL_DEFAULTS, *_CREATE_MODEL_EXTENSIONS} - {"model_path"})
            raise ValueError(f"unknown create_model argument(s): {sorted(unknown)}"
                             + (f" ({'; '.join(hints)})" if hints else "") + f"; known: {', '.join(known)}")
        missing = [k for k in _CREATE_MODEL_REQUIRED if k not in args]
        if missing:
            raise ValueError(f"create_model argument(s) missing: {missing}")
        a = {**_CREATE_MODEL_DEFAULTS, **args}
        if a["class_cond"]:
            raise NotImplementedError("class_cond=True (class-conditional UNet) is not supported")
        if a["use_new_attention_order"]:
            raise NotImplementedError("use_new_attention_order=True is not supported (legacy order only)")
        image_size = int(a["image_size"])
        return cls(
            image_size=image_size,
            model_channels=int(a["num_channels"]),
            num_res_blocks=int(a["num_res_blocks"]),
            channel_mult=_parse_channel_mult(a["channel_mult"], image_size),
            attention_resolutions=_parse_attention_resolutions(a["attention_resolutions"], image_size),
            in_channels=3,
            out_channels=6 if a["learn_sigma"] else 3,
            num_heads=int(a["num_heads"]),
            num_head_channels=int(a["num_head_channels"]),
            num_heads_upsample=int(a["num_heads_upsample"]),
            use_scale_shift_norm=bool(a["use_scale_shift_norm"]),
            resblock_updown=bool(a["resblock_updown"]),
            dropout=float(a["dropout"]),
            use_checkpoint=bool(a["use_checkpoint"]),
            use_fp16=bool(a["use_fp16"]),
            norm_groups=int(a.get("norm_groups", 32)),
            middle_attention=bool(a.get("middle_attention", True)),
            prediction=str(a.get("prediction", "eps")),
            stem_unshuffle=int(a.get("stem_unshuffle", 1)),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists); inverse of ``from_dict``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Rebuild a config from ``to_dict()`` output. Missing optional fields take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig field(s): {sorted(unknown)}")
        return cls(**dict(d))

    # -- derived quantities -------------------------------------------------------------------

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsample_factor(self) -> int:
        """Height and width must be multiples of this (2 ** (levels - 1), times ``stem_unshuffle``)."""
        return 2 ** (len(self.channel_mult) - 1) * self.stem_unshuffle

    def heads_for(self, channels: int, *, upsample: bool = False) -> int:
        """Number of attention heads for a block with ``channels`` channels (as in AttentionBlock)."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        if upsample and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads


# The paper's prior: guided-diffusion's 256x256_diffusion_uncond.pt, with DDFM's
# configs/model_config_imagenet.yaml (model_path left out).
ADM256_UNCOND_ARGS: Mapping[str, Any] = MappingProxyType(
    {
        "image_size": 256,
        "num_channels": 256,
        "num_res_blocks": 2,
        "channel_mult": "",
        "learn_sigma": True,
        "class_cond": False,
        "use_checkpoint": False,
        "attention_resolutions": "32,16,8",
        "num_heads": 4,
        "num_head_channels": 64,
        "num_heads_upsample": -1,
        "use_scale_shift_norm": True,
        "dropout": 0.0,
        "resblock_updown": True,
        "use_fp16": False,
        "use_new_attention_order": False,
    }
)
ADM256_UNCOND_CONFIG = UNetConfig.from_create_model_args(ADM256_UNCOND_ARGS)

# The shipped small prior (preset "ddfm-small", trained by ``ddfm-fast train-prior``): 16/32/64/64 channels at
# 1, 1/2, 1/4, 1/8 resolution, two ResBlocks per level, no attention anywhere (fully convolutional, cost linear
# in the image area), GroupNorm with 8 groups (16 channels cannot take ADM's 32), epsilon only
# (learn_sigma=False). 1.70 M parameters, 6.8 MB in float32. Chosen by its forward time at 480x640 on the 2-core
# dev CPU (about 1 s with 2 threads when the machine is otherwise idle). Its weights file carries this config in
# its metadata; the copy here is what ``train-prior`` builds by default.
DDFM_SMALL_ARGS: Mapping[str, Any] = MappingProxyType(
    {
        "image_size": 64,
        "num_channels": 32,
        "num_res_blocks": 2,
        "channel_mult": "0.5,1,2,2",
        "learn_sigma": False,
        "attention_resolutions": "",
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "dropout": 0.0,
        "norm_groups": 8,
        "middle_attention": False,
    }
)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]``, ``f_i = max_period^(-i/half)``; (B, dim) float32.

    Timesteps are used as given (DDFM runs with ``rescale_timesteps=False``, so 0..999).
    """
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    # Multiply before dividing, in this order: float32 rounding then matches the official code bitwise.
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = timesteps.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd widths are zero-padded, as in guided-diffusion
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 and cast back to the input dtype (guided-diffusion's GroupNorm32).

    The affine parameters are cast too, so a model converted wholesale to fp16/bf16 still
    normalises in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _norm(config: UNetConfig, channels: int) -> GroupNorm32:
    return GroupNorm32(config.norm_groups, channels, eps=config.norm_eps)


def _zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: guided-diffusion starts every residual branch's last layer at 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Nearest 2x upsampling or 2x2 average pooling (the parameter-free Upsample/Downsample)."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class EmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands ``emb`` to the children that are ``TimestepBlock``s."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv (key ``op``), or average pooling without conv."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op: nn.Module = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(kernel_size=2, stride=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """2x nearest upsampling, followed by a 3x3 conv (key ``conv``) when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resample(x, "up")
        return self.conv(x) if self.use_conv else x


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning (ADM, Dhariwal & Nichol 2021, §3).

    ``h = conv(norm(x)); h = norm(h) * (1 + scale) + shift`` (scale-shift norm, "AdaGN") or
    ``h + emb`` otherwise; then ``SiLU -> dropout -> conv`` and the skip connection. With
    ``resample="up"/"down"`` the block also resizes (BigGAN-style up/down, ``resblock_updown``):
    the resize happens between the first norm/SiLU and the first conv, and on the skip path.

    Sub-module indices (``in_layers.2``, ``out_layers.3``, ...) match the checkpoint keys.
    """

    def __init__(
        self,
        config: UNetConfig,
        channels: int,
        out_channels: int | None = None,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.resample = resample
        self.use_scale_shift_norm = config.use_scale_shift_norm
        self.use_checkpoint = config.use_checkpoint
        self.in_layers = nn.Sequential(
            _norm(config, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if config.use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(config.time_embed_dim, emb_out))
        self.out_layers = nn.Sequential(
            _norm(config, out_channels),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            _zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        # guided-diffusion's use_conv skip (3x3) is never enabled by UNetModel, so a 1x1 conv it is.
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return _grad_checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        h = act(norm(x))
        if self.resample is not None:
            h, x = _resample(h, self.resample), _resample(x, self.resample)
        h = conv(h)

        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        return self.skip_connection(x) + out_rest(h)


def legacy_qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Self-attention on a fused ``(B, 3*C, T)`` qkv tensor in guided-diffusion's legacy layout.

    The legacy layout (``QKVAttentionLegacy``) splits *heads first*: the channel axis is
    ``(heads, [q; k; v], ch)``. The official code scales q and k by ``ch^-1/4`` each and takes the
    softmax in float32; here that is ``scaled_dot_product_attention`` with ``scale = ch^-1/2`` on the
    unscaled q and k (the same product; SDPA accumulates softmax in float32 for half inputs).
    Returns ``(B, C, T)`` with channels ordered ``(heads, ch)``.
    """
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    # (B, heads, 3*ch, T) -> three (B, heads, ch, T) views -> SDPA wants (B, heads, T, ch).
    q, k, v = qkv.reshape(batch, num_heads, 3 * ch, length).transpose(-1, -2).split(ch, dim=-1)
    # The fused (flash / memory-efficient) kernels need a contiguous head dim; with strided views SDPA falls
    # back to the math path, which materialises the T x T matrix (9 GB for the tiny model at 640x480 on CPU,
    # 285 MB peak with the copies).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(ch))
    return out.transpose(-1, -2).reshape(batch, num_heads * ch, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection (``x + proj_out(attn(qkv(norm(x))))``).

    ``qkv`` and ``proj_out`` are 1x1 ``Conv1d``s, as in the checkpoint (weights ``(3C, C, 1)``).
    """

    def __init__(self, config: UNetConfig, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.use_checkpoint = config.use_checkpoint
        self.norm = _norm(config, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return _grad_checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        h = legacy_qkv_attention(self.qkv(self.norm(x)), self.num_heads)
        return (x + self.proj_out(h)).reshape(batch, channels, *spatial)


# ---------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """guided-diffusion's ADM UNet, ``forward(x, timesteps) -> (B, out_channels, H, W)``.

    Layout (and therefore state_dict order): ``time_embed``, ``input_blocks`` (a stem conv, then per
    level ``num_res_blocks`` ResBlocks [+ attention] and a downsampler except at the last level),
    ``middle_block`` (ResBlock, attention, ResBlock), ``output_blocks`` (per level, deepest first,
    ``num_res_blocks + 1`` ResBlocks fed the concatenated skip [+ attention] and an upsampler except
    at level 0), ``out`` (norm, SiLU, conv). For DDFM's learn_sigma model, channels 0-2 of the
    output are epsilon and 3-5 the variance interpolation values.

    Constructible on the meta device (``with torch.device("meta"): UNetModel(cfg)``).
    """

    def __init__(self, config: UNetConfig, *, default_steps: int = 100) -> None:
        super().__init__()
        self.config = config
        # Sampling steps the sampler uses when the user gives none.
        self.default_steps = default_steps
        c = config
        ted = c.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))

        ch = int(c.channel_mult[0] * c.model_channels)
        stem_channels = ch
        k2 = c.stem_unshuffle**2
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(c.in_channels * k2, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                out_ch = int(mult * c.model_channels)
                layers: list[nn.Module] = [ResBlock(c, ch, out_ch)]
                ch = out_ch
                if ds in c.attention_resolutions:
                    layers.append(AttentionBlock(c, ch, c.heads_for(ch)))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(self._downsampler(ch)))
                skip_channels.append(ch)
                ds *= 2

        middle: list[nn.Module] = [ResBlock(c, ch)]
        if c.middle_attention:
            middle.append(AttentionBlock(c, ch, c.heads_for(ch)))
        self.middle_block = EmbedSequential(*middle, ResBlock(c, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                out_ch = int(mult * c.model_channels)
                layers = [ResBlock(c, ch + skip_channels.pop(), out_ch)]
                ch = out_ch
                if ds in c.attention_resolutions:
                    layers.append(AttentionBlock(c, ch, c.heads_for(ch, upsample=True)))
                if level and i == c.num_res_blocks:
                    layers.append(self._upsampler(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        # guided-diffusion declares this conv with the stem width; it equals ch here for every config.
        self.out = nn.Sequential(
            _norm(c, ch), nn.SiLU(), _zero_init(nn.Conv2d(stem_channels, c.out_channels * k2, 3, padding=1))
        )
        if c.prediction == "v":
            # sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) of the linear 1000-step schedule, indexed by t. Not
            # saved with the weights (persistent=False): they follow from the schedule, and the state dict keeps
            # the official keys.
            ac = torch.from_numpy(np.cumprod(1.0 - linear_betas(NUM_TRAIN_TIMESTEPS)))
            self.register_buffer("sqrt_ac", ac.sqrt().float(), persistent=False)
            self.register_buffer("sqrt_1m_ac", (1 - ac).sqrt().float(), persistent=False)

    def _downsampler(self, ch: int) -> nn.Module:
        if self.config.resblock_updown:
            return ResBlock(self.config, ch, ch, resample="down")
        return Downsample(ch, self.config.conv_resample)

    def _upsampler(self, ch: int) -> nn.Module:
        if self.config.resblock_updown:
            return ResBlock(self.config, ch, ch, resample="up")
        return Upsample(ch, self.config.conv_resample)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Predict the model output for ``x`` (B, C, H, W) at integer ``timesteps`` (B,) or scalar.

        H and W must be multiples of ``config.downsample_factor``. The body runs in the parameters'
        dtype; the result is returned in ``x``'s dtype (as guided-diffusion does for its fp16 body).
        Channels 0-2 are always epsilon: a ``prediction="v"`` network's v is converted,
        eps = sqrt(1 - ac_t) x_t + sqrt(ac_t) v.
        """
        if timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(x.shape[0])
        out = self.net_output(x, timesteps)
        if self.config.prediction == "v":
            a = self.sqrt_ac[timesteps].view(-1, 1, 1, 1)
            s = self.sqrt_1m_ac[timesteps].view(-1, 1, 1, 1)
            eps = s * x[:, :3].to(a.dtype) + a * out[:, :3].to(a.dtype)
            out = torch.cat([eps.to(out.dtype), out[:, 3:]], dim=1) if out.shape[1] > 3 else eps.to(out.dtype)
        return out

    def net_output(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The network's own output (what ``config.prediction`` names), before any conversion to epsilon."""
        if timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(x.shape[0])
        if self.config.stem_unshuffle > 1:
            x_in = x
            x = F.pixel_unshuffle(x, self.config.stem_unshuffle)
        param_dtype = self.time_embed[0].weight.dtype
        emb = timestep_embedding(timesteps, self.config.model_channels).to(param_dtype)
        emb = self.time_embed(emb)

        h = x.to(param_dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        h = self.out(h)
        if self.config.stem_unshuffle > 1:
            return F.pixel_shuffle(h, self.config.stem_unshuffle).to(x_in.dtype)
        return h.to(x.dtype)
