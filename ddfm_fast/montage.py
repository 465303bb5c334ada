"""Pictures to look at: labelled montages of the sources beside their fusion, difference images, labelled frames.

* :func:`montage_row` puts images side by side at one height, each under a label band ("infrared 00004N.png",
  "fused: ddfm-shrink, 20 steps"); :func:`montage_grid` stacks such rows (one per pair) under column titles.
* :func:`difference_image` shows where two outputs differ: ``|x - y|`` stretched so that the largest difference
  is white, with the stretch factor in its label, since a 1-level difference is otherwise invisible.
* :func:`label_above` adds a label band over one image (the progress frames of ``--save-progress``).

Labels are drawn with Pillow's ImageDraw in the font that ships with Pillow (``ImageFont.load_default``; sized
where Pillow has FreeType), white on a dark band above the picture, so no pixel of the image is covered. Images
are shown as they are read for display (:func:`display_image`: EXIF orientation applied, 16-bit data rounded to
8 bits, float ``.npy`` outputs clipped to 0..1), never as the model sees them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]
Panel = tuple[ImageLike, str]  # (image, label)

PANEL_HEIGHT = 256  # pixels per panel in a montage row (sources are scaled, keeping their aspect ratio)
GAP = 4  # pixels between panels and rows
BAND = (24, 24, 24)  # the label band's colour
TEXT = (240, 240, 240)
BACKGROUND = (255, 255, 255)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font at ``size`` pixels (a fixed-size bitmap font on a Pillow without FreeType or < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 has no size; without FreeType it has no scalable font
        return ImageFont.load_default()


def display_image(src: ImageLike) -> Image.Image:
    """``src`` as an 8-bit RGB Pillow image for display.

    Paths are decoded by ddfm-fast's own reader (:func:`ddfm_fast.io.read_rgb8`: the pixel cap, one frame, EXIF
    orientation, 16-bit rounded to 8 bits) and raise :class:`ddfm_fast.io.ImageReadError` naming the file; a
    ``.npy`` file is a raw float output in 0..1 (``--raw --raw-format npy``). Arrays are (H, W) or (H, W, 3),
    uint8, uint16 or float in 0..1.
    """
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, np.ndarray):
        return Image.fromarray(_to_uint8(src)).convert("RGB")
    path = Path(src)
    if path.suffix.lower() == ".npy":
        from ddfm_fast.io import ImageReadError

        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ImageReadError(f"{path}: cannot read the .npy output ({exc})") from exc
        if arr.ndim not in (2, 3) or not np.issubdtype(arr.dtype, np.floating):
            raise ImageReadError(f"{path}: expected a float (H, W) image array, got {arr.dtype} {arr.shape}")
        return Image.fromarray(_to_uint8(arr)).convert("RGB")
    from ddfm_fast.io import read_rgb8

    return Image.fromarray(read_rgb8(path, name=str(path)))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return np.round(a / 257.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError("image holds non-finite values")
        return np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"cannot show an image of dtype {a.dtype}")


def _fit_height(img: Image.Image, height: int) -> Image.Image:
    if img.height == height:
        return img
    width = max(1, round(img.width * height / img.height))
    return img.resize((width, height), Image.LANCZOS if height < img.height else Image.BICUBIC)


def _font_size(width: int) -> int:
    """A label size that fits small panels (96 px) and stays readable on large ones."""
    return int(min(18, max(10, width // 14)))


def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt, width: int) -> list[str]:
    """``text`` broken into lines (at spaces, else mid-word) that fit ``width`` pixels."""
    lines: list[str] = []
    # A file name may hold a newline or a tab: shown as one visible mark, since a label line is one line.
    text = "".join(c if c.isprintable() else "\ufffd" for c in text)
    for word in text.split(" "):
        cand = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(cand, font=fnt) <= width:
            lines[-1] = cand
            continue
        while draw.textlength(word, font=fnt) > width and len(word) > 1:  # a word longer than the panel
            cut = len(word)
            while cut > 1 and draw.textlength(word[:cut], font=fnt) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def label_band(text: str, width: int, size: Optional[int] = None) -> Image.Image:
    """A dark band ``width`` pixels wide holding ``text`` (wrapped to fit), white, left-aligned."""
    fnt = font(size or _font_size(width))
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 3
    lines = _wrap(scratch, text, fnt, max(1, width - 2 * pad))
    top, bottom = scratch.textbbox((0, 0), "Ag", font=fnt)[1::2]
    line_h = bottom - top + 2
    band = Image.new("RGB", (width, line_h * len(lines) + 2 * pad), BAND)
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(lines):
        draw.text((pad, pad + k * line_h - top), line, font=fnt, fill=TEXT)
    return band


def label_above(img: ImageLike, text: str, size: Optional[int] = None) -> Image.Image:
    """``img`` (RGB) under a label band of its own width."""
    pic = display_image(img)
    band = label_band(text, pic.width, size)
    out = Image.new("RGB", (pic.width, band.height + pic.height), BACKGROUND)
    out.paste(band, (0, 0))
    out.paste(pic, (0, band.height))
    return out


def _labelled_panels(panels: Sequence[Panel], height: int) -> list[Image.Image]:
    pics = [_fit_height(display_image(src), height) for src, _ in panels]
    bands = [label_band(text, pic.width) for pic, (_, text) in zip(pics, panels)]
    band_h = max(b.height for b in bands)
    out = []
    for pic, band in zip(pics, bands):
        tile = Image.new("RGB", (pic.width, band_h + pic.height), BAND)
        tile.paste(band, (0, 0))
        tile.paste(pic, (0, band_h))
        out.append(tile)
    return out


def _hstack(tiles: Sequence[Image.Image], gap: int = GAP) -> Image.Image:
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    out = Image.new("RGB", (width, max(t.height for t in tiles)), BACKGROUND)
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    return out


def _vstack(rows: Sequence[Image.Image], gap: int = GAP) -> Image.Image:
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + gap * (len(rows) - 1)),
                    BACKGROUND)
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + gap
    return out


def montage_row(panels: Sequence[Panel], height: int = PANEL_HEIGHT, title: Optional[str] = None) -> Image.Image:
    """The panels side by side, each scaled to ``height`` and labelled; ``title`` in a band across the top."""
    if not panels:
        raise ValueError("a montage needs at least one image")
    row = _hstack(_labelled_panels(panels, height))
    return _vstack([label_band(title, row.width, 16), row], gap=0) if title else row


def montage_grid(rows: Sequence[Sequence[Panel]], height: int = 160, title: Optional[str] = None) -> Image.Image:
    """One :func:`montage_row` per entry of ``rows`` (e.g. per pair: A | B | fused), stacked; ``title`` on top."""
    if not rows:
        raise ValueError("a montage needs at least one row")
    grid = _vstack([_hstack(_labelled_panels(r, height)) for r in rows], gap=GAP * 2)
    return _vstack([label_band(title, grid.width, 16), grid], gap=0) if title else grid


def difference_image(x: ImageLike, y: ImageLike) -> tuple[Image.Image, float]:
    """``|x - y|`` of two same-size images (grey levels as read for display, the mean over RGB), stretched so that
    the largest difference is white; returns the image and the stretch factor (1 when they are equal)."""
    a = np.asarray(display_image(x), dtype=np.float64).mean(axis=-1)
    b = np.asarray(display_image(y), dtype=np.float64).mean(axis=-1)
    if a.shape != b.shape:
        raise ValueError(f"size mismatch: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]} (W x H)")
    d = np.abs(a - b)
    peak = float(d.max())
    gain = 255.0 / peak if peak > 0 else 1.0
    return Image.fromarray(np.round(d * gain).clip(0, 255).astype(np.uint8)).convert("RGB"), gain


def save_image(img: Image.Image, dest: Union[str, os.PathLike]) -> Path:
    """Write a picture as PNG, atomically (temporary file beside it, then one rename)."""
    from ddfm_fast.io import atomic_path

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return dest


# --------------------------------------------------------------------------------------------------- fusion pictures

MAX_GRID_ROWS = 24  # pairs in one grid montage: beyond that a picture is too tall to look at


def method_label(prior: str, checkpoint: Optional[str], steps: Optional[int]) -> str:
    """How a fusion is named under its panel: ``ddfm-shrink, 20 steps`` or ``EM only, 20 iterations``.

    ``checkpoint`` is a preset name or a file (shown by its name); None is the shipped prior
    (``config.DEFAULT_PRIOR``).
    """
    from ddfm_fast.config import DEFAULT_PRIOR

    if prior == "none":
        return "EM only" + (f", {steps} iterations" if steps else "")
    name = DEFAULT_PRIOR if checkpoint is None else Path(checkpoint).name
    return name + (f", {steps} steps" if steps else "")


def pair_montage(ir: ImageLike, vis: ImageLike, fused: ImageLike, *, ir_label: str, vis_label: str,
                 method: str, height: int = PANEL_HEIGHT) -> Image.Image:
    """One pair: the ir-side source | the vis-side source | the fusion, each labelled (roles and method)."""
    return montage_row([(ir, ir_label), (vis, vis_label), (fused, f"fused: {method}")], height=height)
