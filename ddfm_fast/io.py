"""Image input and output with the official driver's conventions (reference README §6.5), and atomic writes.

Reading (``sample.py``): OpenCV decodes to BGR, converts to float32 and to gray with ``BGR2GRAY``, rounds, and
scales by 1/255, then to [-1, 1]. We decode with Pillow (EXIF orientation applied, as OpenCV's ``imread``
does) and reproduce OpenCV's float32 arithmetic exactly (see :func:`gray_bgr2gray`). 16-bit images are scaled
by 1/65535 and keep their full precision.

Output: the last x0' -> OpenCV ``RGB2YCrCb`` luminance -> min-max to [0, 255] -> PNG through the rounding
that the reference-era imageio applied (:func:`to_uint8_official`).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
SizePolicy = Literal["pad", "crop"]

_F32 = np.float32


class ImageReadError(ValueError):
    """An input image that cannot be used; the message names the file and the problem."""


def _fma32(x: np.ndarray, c: float, acc: np.ndarray) -> np.ndarray:
    """float32 ``fma(x, c, acc)``: the exact product and sum in float64, one rounding to float32."""
    return (x.astype(np.float64) * np.float64(_F32(c)) + acc.astype(np.float64)).astype(_F32)


def gray_bgr2gray(rgb: np.ndarray) -> np.ndarray:
    """OpenCV ``cvtColor(BGR2GRAY)`` on float32 data (bitwise): ``fma(R, .299, fma(B, .114, G * .587))``.

    OpenCV's vectorised float path accumulates in this order with fused multiply-adds; checked against
    opencv-python 5.0 on random data (every pixel equal). ``rgb`` is (..., 3) float32 in R, G, B order.
    """
    r, g, b = (rgb[..., i].astype(_F32) for i in range(3))
    return _fma32(r, 0.299, _fma32(b, 0.114, g * _F32(0.587)))


def luma_rgb2ycrcb(rgb: np.ndarray) -> np.ndarray:
    """OpenCV ``cvtColor(RGB2YCrCb)[..., 0]`` on float32 data (bitwise): ``fma(R, .299, fma(G, .587, B * .114))``."""
    r, g, b = (rgb[..., i].astype(_F32) for i in range(3))
    return _fma32(r, 0.299, _fma32(g, 0.587, b * _F32(0.114)))


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, expected an image file")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: cannot be read as an image ({exc})") from exc
    return ImageOps.exif_transpose(img)


def _pil_to_unit_gray(img: Image.Image, name: str) -> np.ndarray:
    """A decoded image -> gray float32 in [0, 1] with the official rounding (8-bit) or full precision (16-bit)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
            raise ImageReadError(f"{name}: 32-bit integer image with values outside 0..65535")
        return (arr / 65535.0).astype(_F32)
    if img.mode == "F":
        raise ImageReadError(f"{name}: floating-point images are not supported; save it as 8- or 16-bit")
    # cv2.imread(IMREAD_COLOR) drops alpha and expands gray and palette images to three equal channels.
    rgb = np.asarray(img.convert("RGB"), dtype=_F32)
    gray = np.round(gray_bgr2gray(rgb))
    return gray / _F32(255.0)  # float32 / Python float stays float32 in numpy, as in sample.py


def read_gray(src: ImageInput, name: str | None = None) -> np.ndarray:
    """Read one source image as the official driver does: (H, W) float32 gray in [0, 1].

    ``src`` may be a path, a PIL image, a uint8/uint16 array (H, W) or (H, W, 3) in RGB order, or a float array
    already in [0, 1]. Arrays of other types, NaN, or values outside the range are clear errors.
    """
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        return _pil_to_unit_gray(_open(path), str(path))
    label = name or "image"
    if isinstance(src, Image.Image):
        return _pil_to_unit_gray(ImageOps.exif_transpose(src), label)
    if isinstance(src, torch.Tensor):
        src = src.detach().cpu().numpy()
    if not isinstance(src, np.ndarray):
        raise TypeError(f"{label}: expected a path, a PIL image or an array, got {type(src).__name__}")
    arr = src
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim != 2:
        raise ImageReadError(f"{label}: expected an (H, W) or (H, W, 3) array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        rgb = arr.astype(_F32) if arr.ndim == 3 else None
        gray = np.round(gray_bgr2gray(rgb)) if rgb is not None else arr.astype(_F32)
        return gray / _F32(255.0)
    if arr.dtype == np.uint16:
        gray = arr.astype(np.float64) if arr.ndim == 2 else gray_bgr2gray(arr.astype(_F32)).astype(np.float64)
        return (gray / 65535.0).astype(_F32)
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(_F32)
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{label}: contains NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise ImageReadError(f"{label}: float arrays must be in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}]")
        return arr if arr.ndim == 2 else gray_bgr2gray(arr)
    raise ImageReadError(f"{label}: unsupported array dtype {arr.dtype} (use uint8, uint16 or float in [0, 1])")


def to_model_range(gray01: np.ndarray) -> torch.Tensor:
    """[0, 1] gray (H, W) -> (1, 1, H, W) float32 tensor in [-1, 1], computed in float32 as ``sample.py`` does."""
    return torch.from_numpy(np.ascontiguousarray(gray01 * _F32(2) - _F32(1)))[None, None]


# --------------------------------------------------------------------------------------------------- sizes


def crop_to_multiple(t: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """The official top-left crop to ``(H - H % m, W - W % m)``."""
    h, w = t.shape[-2:]
    return t[..., : h - h % multiple, : w - w % multiple]


def pad_amount(h: int, w: int, multiple: int = 32) -> tuple[int, int]:
    return (-h) % multiple, (-w) % multiple


def reflect_pad_to_multiple(t: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Reflect-pad at the bottom and right to the next multiple (no pixel is lost, official issue #16).

    Reflection needs the pad to be smaller than the side; for tiny images it is applied repeatedly.
    """
    ph, pw = pad_amount(*t.shape[-2:], multiple)
    while ph or pw:
        step_h, step_w = min(ph, t.shape[-2] - 1), min(pw, t.shape[-1] - 1)
        if step_h == 0 and step_w == 0:
            # A 1-pixel side cannot be reflected; replicate it instead.
            return torch.nn.functional.pad(t, (0, pw, 0, ph), mode="replicate")
        t = torch.nn.functional.pad(t, (0, step_w, 0, step_h), mode="reflect")
        ph, pw = ph - step_h, pw - step_w
    return t


SIZE_MULTIPLE = 32  # the official driver crops to /32 (ADM256 downsamples 5 times); every model we load divides it


def model_size(hw: tuple[int, int], policy: SizePolicy, multiple: int = SIZE_MULTIPLE) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(model_hw, out_hw)`` of an image of ``hw`` = (H, W) under a size policy: the one place for the /32 rule.

    ``"pad"`` reflect-pads up to the next multiple and crops the output back to ``hw``; ``"crop"`` is the official
    top-left crop down to the multiple (and needs at least ``multiple`` pixels on each side).
    """
    h, w = int(hw[0]), int(hw[1])
    if policy == "crop":
        if h < multiple or w < multiple:
            raise ValueError(f"image of {w}x{h} is smaller than {multiple} px on a side; use size_policy='pad'")
        return (h - h % multiple, w - w % multiple), (h - h % multiple, w - w % multiple)
    if policy == "pad":
        return (h + (-h) % multiple, w + (-w) % multiple), (h, w)
    raise ValueError(f"size_policy must be 'pad' or 'crop', got {policy!r}")


def apply_size_policy(t: torch.Tensor, policy: SizePolicy, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Make H and W multiples of ``multiple``: ``"crop"`` (official, top-left) or ``"pad"`` (reflect)."""
    model_hw, _ = model_size(tuple(t.shape[-2:]), policy, multiple)
    if policy == "crop":
        return t[..., : model_hw[0], : model_hw[1]]
    return reflect_pad_to_multiple(t, multiple)


def sample_luma(sample: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) sample -> OpenCV YCrCb luminance (H, W) float32, as ``sample.py`` computes it."""
    x = sample.detach().float().cpu().reshape(-1, *sample.shape[-3:])
    if x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"expected one RGB sample, got shape {tuple(sample.shape)}")
    return luma_rgb2ycrcb(np.transpose(x[0].numpy(), (1, 2, 0)))


def minmax_0_255(y: np.ndarray) -> np.ndarray:
    """``(y - min) / (max - min) * 255`` in float32 (official). A constant image maps to 0 instead of NaN."""
    lo, hi = y.min(), y.max()
    if hi == lo:
        return np.zeros_like(y, dtype=_F32)
    return ((y - lo) / (hi - lo) * _F32(255)).astype(_F32)


def to_uint8_official(x: np.ndarray) -> np.ndarray:
    """The reference-era imageio float -> uint8 conversion: ``floor((x - min) / (max - min) * 255 + 0.499999999)``."""
    x = x.astype(np.float64)
    lo, hi = x.min(), x.max()
    if hi == lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.floor((x - lo) / (hi - lo) * 255 + 0.499999999).astype(np.uint8)


def to_uint8_truncated(y: np.ndarray) -> np.ndarray:
    """The official progress images: min-max to [0, 255] then ``astype('uint8')`` (truncation, not rounding)."""
    return minmax_0_255(y).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- writing


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest`` in one rename, else it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=dest.suffix + ".part", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file 0600; give the result the permissions any new file gets (0666 less umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_png(array: np.ndarray, dest: str | os.PathLike) -> Path:
    """Write a uint8 or uint16 (H, W) or (H, W, 3) array as PNG, atomically."""
    dest = Path(dest)
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"{dest}: PNG output needs uint8 or uint16 data, got {array.dtype}")
    img = Image.fromarray(array if array.dtype == np.uint8 or array.ndim == 2 else array, mode=None)
    with atomic_path(dest) as tmp:
        img.save(tmp, format="PNG")
    return dest


# --------------------------------------------------------------------------------------------------- extra outputs
# Everything below serves the command line's optional outputs; the official path above does not use it.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# ITU-T T.871 (JPEG) / BT.601 full-range YCbCr, as Pillow's "YCbCr" mode and OpenCV's YCrCb use it (8-bit data,
# chroma offset 128). OpenCV rounds the same constants to 3 digits (0.713, 0.564 / 1.403, 1.773).
_YCBCR_FULL_FROM_RGB = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float64
)
_RGB_FROM_YCBCR_FULL = np.array(
    [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], dtype=np.float64
)


def read_rgb8(src: ImageInput, name: str | None = None) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB for colour output: EXIF orientation applied, alpha dropped (as
    OpenCV's ``imread`` does), palette and gray images expanded, 16-bit data rounded to 8 bits (``v / 257``)."""
    if isinstance(src, (str, os.PathLike)):
        label, img = str(src), _open(Path(src))
    elif isinstance(src, Image.Image):
        label, img = name or "image", ImageOps.exif_transpose(src)
    else:
        raise TypeError(f"{name or 'image'}: read_rgb8 needs a path or a PIL image, got {type(src).__name__}")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
            raise ImageReadError(f"{label}: 32-bit integer image with values outside 0..65535")
        gray = np.round(arr / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode == "F":
        raise ImageReadError(f"{label}: floating-point images are not supported; save it as 8- or 16-bit")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def has_chroma(rgb: np.ndarray) -> bool:
    """False for a gray image stored as RGB (three equal channels): its colour output is gray."""
    return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def rgb_to_ycbcr_full(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB 0..255 -> float64 full-range YCbCr (Y 0..255, Cb/Cr centred on 128), not quantised."""
    ycc = np.asarray(rgb, dtype=np.float64) @ _YCBCR_FULL_FROM_RGB.T
    ycc[..., 1:] += 128.0
    return ycc


def ycbcr_full_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr_full`: float64 RGB, not clipped or rounded."""
    centred = np.asarray(ycc, dtype=np.float64).copy()
    centred[..., 1:] -= 128.0
    return centred @ _RGB_FROM_YCBCR_FULL.T


def colorize(y: np.ndarray, color_source: np.ndarray) -> np.ndarray:
    """Colour output: the fused 8-bit luminance ``y`` (H, W) with the chroma of ``color_source`` (H, W, 3) uint8.

    The community's YCbCr practice: convert the colour source to full-range YCbCr (BT.601 as OpenCV/Pillow),
    replace Y by the fused Y, convert back, round and clip to 0..255. Chroma is kept in float (not quantised);
    only pixels whose new colour leaves the RGB cube are changed by the clipping. A gray source gives R = G = B = y.
    """
    if y.shape != color_source.shape[:2] or color_source.ndim != 3 or color_source.shape[2] != 3:
        raise ValueError(f"colorize: luminance {y.shape} and colour source {color_source.shape} do not match")
    ycc = rgb_to_ycbcr_full(color_source)
    ycc[..., 0] = y
    return np.clip(np.rint(ycbcr_full_to_rgb(ycc)), 0, 255).astype(np.uint8)


def resize_gray(gray01: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a [0, 1] gray float image to (H, W) with Pillow's LANCZOS filter (in float32), clipped to [0, 1]."""
    h, w = size_hw
    img = Image.fromarray(np.ascontiguousarray(gray01, dtype=_F32), mode="F")
    out = np.asarray(img.resize((w, h), Image.Resampling.LANCZOS), dtype=_F32)
    return np.clip(out, 0, 1)


def resize_rgb8(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (H, W) with Pillow's LANCZOS filter."""
    h, w = size_hw
    return np.asarray(Image.fromarray(rgb, mode="RGB").resize((w, h), Image.Resampling.LANCZOS), dtype=np.uint8)


def luma_to_unit(luma: np.ndarray) -> np.ndarray:
    """The unstretched luminance in the input scale: ``(Y + 1) / 2`` float32, so 0..1 is the sources' black..white.

    Not clipped: the final sample is not clamped after the last EM step, so values slightly outside [0, 1] occur.
    """
    return ((luma.astype(_F32) + _F32(1)) / _F32(2)).astype(_F32)


def luma_to_uint16(luma: np.ndarray) -> np.ndarray:
    """The unstretched luminance as 16-bit: ``round(clip((Y + 1) / 2, 0, 1) * 65535)``.

    The inverse of the input convention (16-bit inputs are read as v / 65535): a value v means
    ``Y = v / 65535 * 2 - 1`` in the model's [-1, 1]. Values outside [-1, 1] are clipped; ``.npy`` keeps them.
    """
    unit = np.clip(luma_to_unit(luma).astype(np.float64), 0.0, 1.0)
    return np.rint(unit * 65535.0).astype(np.uint16)


def save_npy(array: np.ndarray, dest: str | os.PathLike) -> Path:
    """Write an array as ``.npy`` (exactly at ``dest``, no suffix added), atomically."""
    dest = Path(dest)
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    return dest


def save_gif(frames: list[np.ndarray], dest: str | os.PathLike, frame_ms: int = 80, last_ms: int = 1000) -> Path:
    """Write (H, W) uint8 frames as one looping animated GIF, atomically; the last frame is held ``last_ms``."""
    dest = Path(dest)
    if not frames:
        raise ValueError(f"{dest}: no frames to write")
    images = [Image.fromarray(f, mode="L") for f in frames]
    durations = [frame_ms] * (len(images) - 1) + [last_ms]
    with atomic_path(dest) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return dest


def save_json(obj: object, dest: str | os.PathLike) -> Path:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return dest
