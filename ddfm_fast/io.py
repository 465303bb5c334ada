"""Image input and output with the official driver's conventions (its ``sample.py``), and atomic writes.

Reading (``sample.py``): OpenCV decodes to BGR, converts to float32 and to gray with ``BGR2GRAY``, rounds, and
scales by 1/255, then to [-1, 1]. We decode with Pillow (EXIF orientation applied, as OpenCV's ``imread``
does) and reproduce OpenCV's float32 arithmetic exactly (see :func:`gray_bgr2gray`). 16-bit images, gray or
colour, are scaled by 1/65535 and keep their full precision.

Hostile or odd inputs: every file is checked from its header before it is decoded (a pixel cap of ddfm-fast's
own, :func:`pixel_cap`; one frame only), and every failure to read is an :class:`ImageReadError` with a one-line
message that names the file (:func:`open_image`).

Output: the last x0' -> OpenCV ``RGB2YCrCb`` luminance -> min-max to [0, 255] -> PNG through the rounding
that the reference-era imageio applied (:func:`to_uint8_official`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
import sys
import tempfile
import threading
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Literal, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported by the functions that make tensors: reading and pairing files stay light
    import torch

ImageInput = Union[str, bytes, os.PathLike, Image.Image, np.ndarray, "torch.Tensor", "DecodedImage"]
SizePolicy = Literal["pad", "crop"]

_F32 = np.float32


# The image files every command reads (fuse, eval, compare, score, train-prior): the formats Pillow decodes for
# read_gray / read_rgb8 (tests/test_pairing.py reads one of each). Matched on the lower-cased suffix.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".gif")


class ImageReadError(ValueError):
    """An input image that cannot be used; the message is one line that names the file and the problem."""


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


# --------------------------------------------------------------------------------------------------- files

class FileProblem(ValueError):
    """A path that cannot be read as a regular file; ``reason`` says why in words, without the file name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def display_name(path: Union[str, bytes, os.PathLike]) -> str:
    """A file name as one printable line: bytes that are not UTF-8 as ``\\xNN``, control characters escaped.

    Error messages name files this way, so a name with a newline or undecodable bytes cannot break a one-line
    message or the terminal's encoding.
    """
    text = os.fsdecode(path)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from an undecodable byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _os_reason(path: Union[str, bytes, os.PathLike], exc: OSError) -> str:
    """What an OSError from stat/open means for the user, without the file name."""
    code = exc.errno
    if code == errno.ENOENT:
        return "is a broken symbolic link (its target does not exist)" if os.path.islink(path) else "no such file"
    if code == errno.ELOOP:
        return "is a symbolic link loop (or a chain of too many links)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ENOTDIR:
        return "a part of its path is a file, not a folder"
    if code == errno.ENAMETOOLONG:
        return "its name is too long"
    if code == errno.EISDIR:
        return "is a folder, expected a file"
    return f"cannot be opened ({exc.strerror or type(exc).__name__})"


_NOT_REGULAR = (
    (stat.S_ISDIR, "is a folder, expected a file"),
    (stat.S_ISFIFO, "is a named pipe (FIFO), not a regular file"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
    (stat.S_ISCHR, "is a character device, not a regular file"),
    (stat.S_ISBLK, "is a block device, not a regular file"),
)


def _kind_problem(st: os.stat_result) -> str | None:
    for is_kind, words in _NOT_REGULAR:
        if is_kind(st.st_mode):
            return words
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size == 0:
        return "is empty (0 bytes)"
    return None


def open_regular_file(path: Union[str, bytes, os.PathLike]) -> BinaryIO:
    """Open a non-empty regular file for reading, or raise :class:`FileProblem` saying why it is not one.

    A FIFO, socket or device is refused from ``stat`` before it is opened (opening a FIFO blocks until a writer
    comes; opening some devices does something), the open itself never blocks (``O_NONBLOCK``), and the opened
    descriptor is checked again, so a file swapped for something else in between is caught too.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FileProblem(_os_reason(path, exc)) from None
    except ValueError:  # os.stat refuses names with a NUL character
        raise FileProblem("its name contains a NUL character") from None
    problem = _kind_problem(st)
    if problem:
        raise FileProblem(problem)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileProblem(_os_reason(path, exc)) from None
    try:
        problem = _kind_problem(os.fstat(fd))
        if problem:
            raise FileProblem(problem)
    except BaseException:
        os.close(fd)
        raise
    # The file object owns the descriptor from here: closing fd ourselves as well (if an interrupt landed inside
    # fdopen) would close it twice, the second time under another file that had been given the same number.
    return os.fdopen(fd, "rb")


# --------------------------------------------------------------------------------------------------- limits

DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: 80 times the largest dev image (1024x768); a 64 MP pair needs ~GBs to fuse
MAX_PIXELS_ENV = "DDFM_FAST_MAX_PIXELS"


def pixel_cap(limit: int | None = None) -> int:
    """The most pixels (width x height) an input image may have: ``limit`` when given, else the environment
    variable ``DDFM_FAST_MAX_PIXELS``, else 64 MP (:data:`DEFAULT_MAX_PIXELS`).

    The cap is checked from a file's header before anything is decoded, so a small file whose header claims a
    huge image is refused at once instead of filling the memory. Raises ``ValueError`` for a cap that is not a
    whole number >= 1.
    """
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
            raise ValueError(f"max_pixels must be a whole number of pixels >= 1, got {limit!r}")
        return int(limit)
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    if not re.fullmatch(r"[0-9][0-9_]*", text) or int(text.replace("_", "")) < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={text!r} is not a whole number of pixels >= 1 "
                         f"(the largest input image ddfm-fast reads; default {DEFAULT_MAX_PIXELS})")
    return int(text.replace("_", ""))


def too_big(label: str, w: int, h: int, cap: int) -> ImageReadError:
    """The error for an image whose header is over the pixel cap."""
    return ImageReadError(
        f"{label}: its header says {w}x{h} = {w * h} pixels, more than ddfm-fast's cap of {cap} ({cap / 1e6:g} MP); "
        f"nothing was decoded. If the image is real, raise the cap with the environment variable {MAX_PIXELS_ENV}=N"
    )


_PILLOW_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pillow_limit_lifted() -> Iterator[None]:
    """Pillow's own decompression-bomb check off, while ddfm-fast applies its cap from the header instead.

    Pillow warns (``DecompressionBombWarning``) above ``Image.MAX_IMAGE_PIXELS`` (89 MP) and raises above twice
    that, whatever cap the caller asked for. The limit is a module global of Pillow's, so it is lifted under a lock
    and restored at once: only a header parse runs with it lifted (microseconds), and a decode only when the cap
    asked for is above Pillow's own limit (and that decode was checked against the cap first).
    """
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _above_pillow_limit(pixels: int) -> bool:
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and pixels > limit


# --------------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodedImage:
    """One decoded input image at its own precision (what :func:`open_image` returns; the readers take it).

    ``pixels``: (H, W, 3) uint8 RGB for 8-bit files (gray and palette images expanded, alpha dropped, as OpenCV's
    ``imread`` does), (H, W) uint16 for 16-bit gray, (H, W, 3) uint16 for 16-bit colour. EXIF orientation applied.
    """

    pixels: np.ndarray
    name: str

    @property
    def size(self) -> tuple[int, int]:
        """(W, H), as PIL's ``Image.size``."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


# What Pillow's decoders and plugins raise for corrupt or hostile data (seen when fuzzing: OSError for most data
# errors, TypeError and ValueError for broken TIFF directories; SyntaxError for broken PNG chunks, EOFError and
# struct.error for truncated headers, IndexError / KeyError for out-of-range palette or tag values). Other types
# (AttributeError, RuntimeError, ...) would be a bug here and are left to surface.
_CORRUPT = (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, KeyError, struct.error, zlib.error,
            MemoryError, OverflowError, ZeroDivisionError, Image.DecompressionBombError,
            Image.DecompressionBombWarning)


def _reason(exc: BaseException) -> str:
    """An exception's text on one line (Pillow's corrupt-file errors come in many types, some without text)."""
    if isinstance(exc, MemoryError):
        return "not enough memory to decode it"
    if isinstance(exc, Image.DecompressionBombError):
        return f"Pillow's decompression-bomb check refused it: {exc}"
    text = " ".join(str(exc).split())
    if not text:
        text = "unexpected end of file" if isinstance(exc, EOFError) else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _read_error(label: str, exc: BaseException) -> ImageReadError:
    return ImageReadError(f"{label}: cannot be read as an image ({_reason(exc)})")


_MULTI_FRAME_KIND = {"GIF": ("an animated GIF", "frames"), "PNG": ("an animated PNG (APNG)", "frames"),
                     "TIFF": ("a multi-page TIFF", "pages"), "WEBP": ("an animated WebP", "frames")}


def _check_header(img: Image.Image, label: str, cap: int) -> None:
    """Refuse, from the header alone, an image with no pixels, one above the pixel cap, or one of several frames."""
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageReadError(f"{label}: its header says {w}x{h}, an image without pixels")
    if w * h > cap:
        raise too_big(label, w, h, cap)
    with _pillow_limit_lifted():  # counting frames reads each frame's header (GIF), where Pillow checks sizes
        frames = int(getattr(img, "n_frames", 1))
    # An MPO file (a camera JPEG with a preview or depth image appended) is one picture: its first image is the
    # primary one, which is what OpenCV's imread reads too.
    if frames > 1 and img.format != "MPO":
        kind, unit = _MULTI_FRAME_KIND.get(str(img.format), (f"a {img.format} file", "frames"))
        raise ImageReadError(f"{label}: {kind} with {frames} {unit}; ddfm-fast reads one image per file, so save the "
                             "frame to fuse as its own file")


_GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _pil_pixels(img: Image.Image, label: str) -> np.ndarray:
    """A decoded PIL image (orientation applied) -> the pixels of :class:`DecodedImage`."""
    if img.mode in _GRAY16_MODES:
        arr = np.asarray(img)
        if img.mode == "I" and arr.size and (arr.max() > 65535 or arr.min() < 0):
            raise ImageReadError(f"{label}: 32-bit integer image with values outside 0..65535")
        return arr.astype(np.uint16)
    if img.mode == "F":
        raise ImageReadError(f"{label}: floating-point images are not supported; save it as 8- or 16-bit")
    # cv2.imread(IMREAD_COLOR) drops alpha and expands gray and palette images to three equal channels.
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# Raw modes of Pillow's decoders for 16-bit colour samples, which Pillow narrows to 8 bits (it has no 16-bit RGB
# image mode): RGB, RGBA, RGBX (TIFF's unspecified extra sample), RGBa (premultiplied alpha), LA (gray + alpha,
# PNG); B/L/N = big-endian, little-endian, native.
_COLOUR16 = re.compile(r"(RGB|RGBA|RGBX|RGBa|LA);16([BLN])")
_COLOUR16_CODECS = {"zip", "raw", "libtiff"}  # PNG, uncompressed TIFF, compressed TIFF: the rawmode picks the bytes


def _tile_rawmode(tile: Any) -> str | None:
    args = tile[3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _with_rawmode(tile: Any, rawmode: str) -> Any:
    args = tile[3]
    new = rawmode if isinstance(args, str) else (rawmode, *args[1:])
    return tile._replace(args=new) if hasattr(tile, "_replace") else (tile[0], tile[1], tile[2], new)


def _big_endian(order: str) -> bool:
    return order == "B" or (order == "N" and sys.byteorder == "big")


def _colour16(img: Image.Image, label: str) -> str | None:
    """The raw mode of a file with 16-bit colour samples (read at full precision below), None for other files.

    Refuses the 16-bit colour layouts that cannot be read at full precision, instead of narrowing them to 8 bits.
    """
    if img.mode not in ("RGB", "RGBA"):
        return None
    if any(t[0] in ("ppm", "ppm_plain") and isinstance(t[3], tuple) and len(t[3]) > 1 and int(t[3][1]) > 255
           for t in img.tile):
        return "ppm16"
    rawmodes = {_tile_rawmode(t) for t in img.tile}
    sixteen = sorted(r for r in rawmodes if r and _COLOUR16.fullmatch(r))
    if not sixteen:
        return None
    if len(rawmodes) > 1:
        raise ImageReadError(f"{label}: 16-bit colour stored in mixed layouts ({', '.join(map(str, rawmodes))}) "
                             "cannot be read at full precision; save it as a 16-bit PNG")
    rawmode = sixteen[0]
    if rawmode.startswith("RGBa"):
        raise ImageReadError(f"{label}: 16-bit colour with premultiplied alpha cannot be read at full precision; "
                             "save it without alpha")
    codecs = {str(t[0]) for t in img.tile}
    if not codecs <= _COLOUR16_CODECS:
        raise ImageReadError(f"{label}: 16-bit colour in a {img.format} file coded as {', '.join(sorted(codecs))} "
                             "cannot be read at full precision; save it as a 16-bit PNG or TIFF")
    return rawmode


def _decode_colour16(fh: BinaryIO, img: Image.Image, rawmode: str, label: str) -> np.ndarray:
    """Full-precision samples of a 16-bit colour file: (H, W, 3) uint16, or (H, W) uint16 for gray + alpha.

    Pillow's decoders undo PNG filtering / TIFF compression on whole pixels, whose width in bytes the raw mode
    fixes, and then keep one byte of each sample. Two raw modes of the same width keep the two bytes: "RGB;16B"
    keeps bytes 0, 2, 4 of each 6-byte pixel and "RGB;16L" bytes 1, 3, 5. So the file is decoded twice, with its
    own raw mode (the high bytes) and the mode of the other byte order (the low bytes). A 16-bit gray + alpha pixel
    is 4 bytes, as wide as 8-bit RGBA, so one decode as "RGBA" hands over both bytes of the gray sample.
    """
    if rawmode == "ppm16":
        return _decode_ppm16(fh, img, label)
    base, order = rawmode.split(";16")
    hi, lo = (0, 1) if _big_endian(order) else (1, 0)
    if base == "LA":
        img.tile = [_with_rawmode(t, "RGBA") for t in img.tile]
        img.load()
        b = np.asarray(ImageOps.exif_transpose(img))
        return (b[..., hi].astype(np.uint16) << 8) | b[..., lo]
    other = base + ";16" + ("L" if _big_endian(order) else "B")
    layout = [tuple(t[:3]) for t in img.tile]  # load() clears the tiles
    img.load()
    high = np.asarray(ImageOps.exif_transpose(img))[..., :3]
    with _pillow_limit_lifted():
        again = Image.open(fh)
    if again.size != img.size or [tuple(t[:3]) for t in again.tile] != layout:
        raise ImageReadError(f"{label}: the file changed while it was read")
    again.tile = [_with_rawmode(t, other) for t in again.tile]
    again.load()
    low = np.asarray(ImageOps.exif_transpose(again))[..., :3]
    return (high.astype(np.uint16) << 8) | low


def _decode_ppm16(fh: BinaryIO, img: Image.Image, label: str) -> np.ndarray:
    """A binary PPM (P6) with more than 8 bits a sample: big-endian 16-bit samples after the header, scaled from
    0..maxval to 0..65535 and rounded, as Pillow scales 16-bit PGM files."""
    (codec, _, offset, args), = img.tile
    if codec != "ppm":
        raise ImageReadError(f"{label}: 16-bit colour in a plain-text PPM cannot be read at full precision; save it "
                             "as a binary PPM (P6) or a 16-bit PNG")
    w, h = img.size
    maxval = int(args[1])
    fh.seek(offset)
    data = fh.read(w * h * 6)
    if len(data) < w * h * 6:
        raise ImageReadError(f"{label}: cannot be read as an image (image file is truncated)")
    v = np.frombuffer(data, dtype=">u2").reshape(h, w, 3)
    if v.max() > maxval:
        raise ImageReadError(f"{label}: a sample is above the file's maxval {maxval}")
    if maxval == 65535:
        return v.astype(np.uint16)
    return np.rint(v * (65535.0 / maxval)).astype(np.uint16)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples a pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_rows_missing(fh: BinaryIO) -> tuple[int, int, bool] | None:
    """(bytes found, bytes the header promises, whether the file itself ends early) when a PNG's image data is
    shorter than its header says, else None.

    Pillow stops decoding where the compressed stream ends and leaves the rest of the image black, so a PNG whose
    header promises more rows than its data holds would be read without a word. The stream is inflated once more
    here (a few ms for 640x480; memory bounded) and its length compared with what the header implies.
    """
    fh.seek(8)
    head = fh.read(25)
    if len(head) < 25 or head[4:8] != b"IHDR":
        return None
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", head[8:21])
    if ctype not in _PNG_CHANNELS:
        return None
    bits = depth * _PNG_CHANNELS[ctype]
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        pw, ph = -(-(w - x0) // dx), -(-(h - y0) // dy)
        if pw > 0 and ph > 0:
            expected += ph * (1 + -(-pw * bits // 8))
    inflate, found, cut = zlib.decompressobj(), 0, False
    fh.seek(8)
    while found < expected:
        header = fh.read(8)
        if len(header) < 8:
            cut = True
            break
        length, kind = struct.unpack(">I", header[:4])[0], header[4:]
        if kind == b"IEND":
            break
        if kind != b"IDAT":
            fh.seek(length + 4, os.SEEK_CUR)
            continue
        data = fh.read(length)
        cut = len(data) < length
        fh.seek(4, os.SEEK_CUR)  # CRC
        while data and found < expected and not inflate.eof:
            try:
                found += len(inflate.decompress(data, 1 << 20))
            except zlib.error:  # corrupt data, not short data: Pillow's decoder names that
                return None
            data = inflate.unconsumed_tail
        if inflate.eof:
            break
    return (found, expected, cut) if found < expected else None


def _file_size(fh: BinaryIO) -> int:
    return fh.seek(0, os.SEEK_END)


# JPEG markers without a length field: TEM, RST0..7, SOI, EOI (ITU-T T.81, Table B.1).
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xDA)])
_JPEG_NAMES = {0xC4: "DHT", 0xC8: "JPG", 0xCC: "DAC", 0xDA: "SOS", 0xDB: "DQT", 0xDC: "DNL", 0xDD: "DRI",
               0xDE: "DHP", 0xDF: "EXP", 0xFE: "COM"}
# The next marker after a position: 0xFF (fill bytes 0xFF may repeat) followed by a byte that is not 0x00 (a stuffed
# 0xFF inside entropy-coded data) nor RST0..7 (restart markers, which belong to the scan around them). libjpeg
# skips stray bytes between segments the same way (jdmarker.c, next_marker).
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _jpeg_marker_name(marker: int) -> str:
    if marker in _JPEG_NAMES:
        return _JPEG_NAMES[marker]
    if 0xC0 <= marker <= 0xCF:
        return f"SOF{marker - 0xC0}"
    if 0xE0 <= marker <= 0xEF:
        return f"APP{marker - 0xE0}"
    return f"0xFF{marker:02X}"


def _jpeg_cut(fh: BinaryIO) -> str | None:
    """Why a JPEG file ends before its end-of-image marker (EOI), or None when it reaches one (or is no JPEG).

    The markers are walked from SOI as libjpeg reads them: each segment is skipped by its length, each scan's
    entropy-coded data up to the next marker, until the first EOI (what follows it, such as an MPO's second image
    or trailing bytes, is not read). Pillow's decoder refuses a JPEG cut short only while ``ImageFile.
    LOAD_TRUNCATED_IMAGES`` is off, a process-wide switch any other library may turn on; then it appends an EOI
    itself and libjpeg fills the missing part of the image with grey. This walk does not depend on that switch.
    """
    fh.seek(0)
    if fh.read(3) != b"\xff\xd8\xff":
        return None
    fh.seek(0)
    data = fh.read()
    size, pos, scans = len(data), 2, 0
    while True:
        found = _JPEG_NEXT_MARKER.search(data, pos)
        if found is None:
            break
        marker, pos = data[found.start() + 1], found.end()
        if marker == 0xD9:
            return None
        if marker in _JPEG_STANDALONE:
            continue
        if pos + 2 > size:
            return (f"it ends early (at byte {size}, inside the length of its {_jpeg_marker_name(marker)} segment "
                    f"at byte {pos - 2}): the file is truncated")
        end = pos + struct.unpack(">H", data[pos:pos + 2])[0]
        if end < pos + 2:  # a length below 2 is corrupt, not short: libjpeg names that
            return None
        if end > size:
            return (f"it ends early (at byte {size}, inside its {_jpeg_marker_name(marker)} segment of bytes "
                    f"{pos - 2}..{end}): the file is truncated")
        scans += marker == 0xDA
        pos = end
    if scans == 0:
        return f"it ends early (at byte {size}, before its image data begins): the file is truncated"
    return (f"its image data ends early (the file ends at byte {size} in scan {scans}, with no end-of-image "
            "marker): the file is truncated")


_TIFF_PREFIXES = (b"MM\x00*", b"II*\x00", b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00")  # as Pillow accepts them
# Bytes per value of the TIFF field types Pillow reads (TIFF 6.0 section 2, BigTIFF's LONG8); it skips the others.
_TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}


def _tiff_cut(fh: BinaryIO) -> str | None:
    """Why a TIFF file ends before the directories (IFDs) it points to, or None when they are all in the file (or it
    is no TIFF).

    Pillow reads a directory cut short, or a tag value past the end of the file, with a ``UserWarning`` and then
    fails to identify the file or drops the tag. Checking the chain of directories first (as Pillow walks it,
    loops ending it) makes a cut file one error and no warning. Values of field types Pillow skips, and repeated
    tags, are skipped here too.
    """
    fh.seek(0)
    head = fh.read(16)
    if head[:4] not in _TIFF_PREFIXES:
        return None
    size = _file_size(fh)
    big = head[2] == 43  # Pillow's test for BigTIFF
    e, word = ("<" if head[:2] == b"II" else ">"), ("Q" if big else "L")
    if size < (16 if big else 8):
        return f"it ends early (at byte {size}, inside its TIFF header): the file is truncated"
    offset = struct.unpack(e + word, head[8:16] if big else head[4:8])[0]
    count_bytes, entry_bytes, inline = (8, 20, 8) if big else (2, 12, 4)
    seen: set[int] = set()
    while offset and offset not in seen:
        seen.add(offset)
        which = "its directory" if len(seen) == 1 else f"its directory for page {len(seen)}"
        if offset + count_bytes > size:
            return (f"{which} begins past the end of the file (at byte {offset}, the file has {size} bytes): "
                    "the file is truncated")
        fh.seek(offset)
        (count,) = struct.unpack(e + ("Q" if big else "H"), fh.read(count_bytes))
        end = offset + count_bytes + count * entry_bytes + (8 if big else 4)
        if end > size:
            return f"{which} ends early (it runs to byte {end}, the file has {size} bytes): the file is truncated"
        table = fh.read(end - offset - count_bytes)
        tags: set[int] = set()
        for k in range(0, count * entry_bytes, entry_bytes):
            tag, kind, n = struct.unpack(e + "HH" + word, table[k:k + entry_bytes - inline])
            if tag in tags or kind not in _TIFF_TYPE_BYTES:
                continue
            tags.add(tag)
            nbytes = n * _TIFF_TYPE_BYTES[kind]
            if nbytes > inline:
                (at,) = struct.unpack(e + word, table[k + entry_bytes - inline:k + entry_bytes])
                if at + nbytes > size:
                    return (f"{which} points past the end of the file (tag {tag}'s value at bytes {at}..{at + nbytes}, "
                            f"the file has {size} bytes): the file is truncated or damaged")
        (offset,) = struct.unpack(e + word, table[-inline:])
    return None


def _tag_tuple(value: Any) -> tuple:
    """A TIFF tag's value as a tuple (Pillow gives one value of a tag that may hold several as it is)."""
    return tuple(value) if isinstance(value, tuple) else (value,)


def _tiff_raw_short(fh: BinaryIO, img: Image.Image) -> tuple[int, int] | None:
    """(bytes in the file, bytes the header promises) when an uncompressed TIFF's strips or tiles run past the end
    of the file, else None.

    Pillow's raw decoder reads each strip from its offset for as many rows as the strip covers (its tile list), and
    leaves what the file does not hold black when ``ImageFile.LOAD_TRUNCATED_IMAGES`` is on. A strip promises the
    bytes its rows need, from its extent and the bits per pixel (BitsPerSample, normalised to SamplesPerPixel as
    Pillow does; a stride, when Pillow sets one for tiles cut by the image's edge, spaces the rows), and at least
    its StripByteCounts / TileByteCounts (which also count the padding of edge tiles; libtiff refuses a strip
    shorter than its count).
    """
    tiles = list(img.tile)
    if not tiles or any(t[0] != "raw" for t in tiles):
        return None
    tags = img.tag_v2  # type: ignore[attr-defined]
    offsets_tag, counts_tag = (273, 279) if 273 in tags else (324, 325)  # strips, else tiles (as Pillow reads)
    offsets, counts = (_tag_tuple(tags.get(t, ())) for t in (offsets_tag, counts_tag))
    # Pillow makes one tile per offset, or one for the last offset when a single strip covers the image.
    first = len(offsets) - len(tiles)
    if len(counts) != len(offsets) or first < 0 or [t[2] for t in tiles] != list(offsets[first:]):
        counts, first = (0,) * len(tiles), 0  # counts that do not match the offsets: the rows alone say
    counts = counts[first:]
    bps = tuple(int(b) for b in _tag_tuple(tags.get(258, (1,))))
    samples = int(tags.get(277, 1))
    extra = _tag_tuple(tags.get(338, ()))
    planar = tags.get(284, 1) == 2
    if planar and extra and max(extra) == 0:  # Pillow ignores unspecified extra planes
        bps, samples = bps[:-len(extra)], samples - len(extra)
    if samples < len(bps):
        bps = bps[:samples]
    elif samples > len(bps) == 1:
        bps = bps * samples
    if not bps:
        return None
    size = _file_size(fh)
    found = expected = 0
    layer = 0
    for k, tile in enumerate(tiles):
        x0, y0, x1, y1 = tile[1]
        if planar and k and (x0, y0) == (0, 0):
            layer += 1
        bits = bps[min(layer, len(bps) - 1)] if planar else sum(bps)
        row = ((x1 - x0) * bits + 7) // 8
        stride = tile[3][1] if isinstance(tile[3], tuple) and len(tile[3]) > 1 else 0
        need = max((y1 - y0 - 1) * (stride or row) + row if y1 > y0 else 0, int(counts[k]))
        expected += need
        found += min(need, max(0, size - tile[2]))
    return (found, expected) if found < expected else None


@contextmanager
def _opened_header(path: Union[str, bytes, os.PathLike]) -> Iterator[tuple[BinaryIO, Image.Image, str]]:
    """An image file opened and parsed by Pillow up to its header (nothing decoded): ``(file, image, label)``.

    Every failure is an :class:`ImageReadError` naming the file: an odd file (missing, a folder, a FIFO, ...), a
    format Pillow cannot read, a corrupt header, a header cut short (a TIFF's directories are checked before
    Pillow reads them, so that a cut one is not a warning too). The file and the image are closed on exit; errors
    raised inside the block pass through unchanged, so the caller keeps its own handling of decode errors.
    """
    label = display_name(path)
    try:
        fh = open_regular_file(path)
    except FileProblem as exc:
        raise ImageReadError(f"{label}: {exc.reason}") from None
    with fh:
        try:
            cut = _tiff_cut(fh)
        except _CORRUPT as exc:  # a read error, or a file that shrank while it was read
            raise _read_error(label, exc) from exc
        if cut is not None:
            raise ImageReadError(f"{label}: {cut}")
        try:
            fh.seek(0)
            with _pillow_limit_lifted():
                img = Image.open(fh)
        except _CORRUPT as exc:  # UnidentifiedImageError among them (an OSError)
            try:  # Pillow's words for a JPEG header cut short vary ("Truncated File Read", ...): say what it is
                cut = _jpeg_cut(fh)
            except _CORRUPT:
                cut = None  # the file cannot be read again: Pillow's own error below says why
            if cut is not None:
                raise ImageReadError(f"{label}: {cut}") from None
            if isinstance(exc, UnidentifiedImageError):
                raise ImageReadError(f"{label}: not in an image format Pillow can read (PNG, JPEG, BMP, TIFF, WebP, "
                                     "GIF, PNM, ...), or corrupt from its first bytes") from None
            raise _read_error(label, exc) from exc
        try:
            yield fh, img, label
        finally:
            img.close()


def _decode_file(path: Union[str, bytes, os.PathLike], cap: int) -> DecodedImage:
    with _opened_header(path) as (fh, img, label):
        try:
            _check_header(img, label, cap)
            if img.format == "PNG":
                short = _png_rows_missing(fh)
                if short is not None:
                    found, expected, cut = short
                    what = "the file is truncated" if cut else "the file is damaged"
                    raise ImageReadError(f"{label}: its image data ends early ({found} of the {expected} bytes its "
                                         f"header promises): {what}")
            elif img.format in ("JPEG", "MPO"):
                cut = _jpeg_cut(fh)
                if cut is not None:
                    raise ImageReadError(f"{label}: {cut}")
            elif img.format == "TIFF":
                short = _tiff_raw_short(fh, img)
                if short is not None:
                    raise ImageReadError(f"{label}: its image data ends early ({short[0]} of the {short[1]} bytes "
                                         "its header promises): the file is truncated")
            rawmode = _colour16(img, label)
            w, h = img.size
            with _pillow_limit_lifted() if _above_pillow_limit(w * h) else nullcontext():
                if rawmode is not None:
                    pixels = _decode_colour16(fh, img, rawmode, label)
                else:
                    img.load()
                    pixels = _pil_pixels(ImageOps.exif_transpose(img), label)
        except ImageReadError:
            raise
        except _CORRUPT as exc:
            raise _read_error(label, exc) from exc
    return DecodedImage(pixels, label)


def _is_path(src: Any) -> bool:
    if isinstance(src, bytes) and (b"\0" in src or len(src) > 4096):
        # Not a file name (no path holds a NUL byte or runs past PATH_MAX): most likely an encoded image.
        raise TypeError(f"{len(src)} bytes that are not a file name were given as an image; for encoded image "
                        "data pass PIL.Image.open(io.BytesIO(data))")
    return isinstance(src, (str, bytes, os.PathLike))


def open_image(path: Union[str, bytes, os.PathLike], *, max_pixels: int | None = None) -> DecodedImage:
    """Decode an image file once, at its own precision; :func:`read_gray`, :func:`read_rgb` and :func:`read_rgb8`
    take the result, so one decode serves the gray input and the colour output.

    Checked from the header before anything is decoded: the pixel cap (:func:`pixel_cap`), a size of at least
    1x1, and a single frame (animated GIF / PNG / WebP and multi-page TIFF files are refused). 16-bit colour is
    read at full precision. Every failure is an :class:`ImageReadError` whose one-line message names the file:
    missing, a folder, a FIFO or device, a broken or looping symbolic link, empty, unreadable, not an image,
    truncated or corrupt. EXIF orientation is applied, as OpenCV's ``imread`` does.
    """
    return _decode_file(path, pixel_cap(max_pixels))


def image_size(src: Any) -> tuple[int, int]:
    """(W, H) of an input without decoding it: a file's header, a PIL image's size or an array's (H, W, ...) shape.

    For files, EXIF orientation is applied when the header carries it (a PNG's eXIf chunk may come after the image
    data, where only a decode finds it: compare sizes up to a rotation). Raises :class:`ImageReadError` naming a
    file that cannot be opened or identified.
    """
    if isinstance(src, DecodedImage):
        return src.size
    if isinstance(src, Image.Image):
        w, h = src.size
        return (h, w) if _orientation(src) in _QUARTER_TURNS else (w, h)
    if isinstance(src, np.ndarray) or _is_tensor(src):
        if src.ndim < 2:
            raise ImageReadError(f"expected an (H, W) or (H, W, 3) array, got shape {tuple(src.shape)}")
        return int(src.shape[1]), int(src.shape[0])
    if not _is_path(src):
        raise TypeError(f"expected a path, a PIL image or an array, got {type(src).__name__}")
    with _opened_header(src) as (_, img, label):
        try:
            w, h = img.size
            turned = _orientation(img) in _QUARTER_TURNS
        except _CORRUPT as exc:
            raise _read_error(label, exc) from exc
    return (h, w) if turned else (w, h)


_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation a header carries (1 when none or unreadable), without decoding the image."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # PngImageFile.getexif() decodes the whole image to look for an eXIf chunk after the data
    try:
        return int(img.getexif().get(0x0112, 1))
    except _CORRUPT:  # a corrupt EXIF block: the decode reports what is wrong with it, if anything
        return 1


def _pixels_of(src: Any, name: str | None, cap: int) -> tuple[np.ndarray, str]:
    """The pixels of a path, PIL image or :class:`DecodedImage`; arrays are returned as they are."""
    if isinstance(src, DecodedImage):
        return src.pixels, name or src.name
    if _is_path(src):
        decoded = _decode_file(src, cap)
        return decoded.pixels, decoded.name
    label = name or "image"
    if isinstance(src, Image.Image):
        w, h = src.size
        if w * h > cap:
            raise too_big(label, w, h, cap)
        try:
            return _pil_pixels(ImageOps.exif_transpose(src), label), label
        except ImageReadError:
            raise
        except _CORRUPT as exc:  # a lazily opened image decodes here
            raise _read_error(label, exc) from exc
    if _is_tensor(src):
        src = src.detach().cpu().numpy()
    if not isinstance(src, np.ndarray):
        raise TypeError(f"{label}: expected a path, a PIL image or an array, got {type(src).__name__}")
    return src, label


def read_gray(src: ImageInput, name: str | None = None, *, max_pixels: int | None = None) -> np.ndarray:
    """Read one source image as the official driver does: (H, W) float32 gray in [0, 1].

    ``src`` may be a path, a PIL image, a :class:`DecodedImage`, a uint8/uint16 array (H, W) or (H, W, 3) in RGB
    order, or a float array already in [0, 1]. Arrays of other types, NaN, or values outside the range are clear
    errors. 8-bit data: OpenCV's float32 BGR2GRAY, rounded, / 255 (bitwise as ``sample.py``). 16-bit data, gray
    or colour: the same weights at full precision, / 65535, not rounded. Files are read by :func:`open_image`
    (pixel cap, one frame, one-line errors).
    """
    arr, label = _pixels_of(src, name, pixel_cap(max_pixels))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim != 2:
        raise ImageReadError(f"{label}: expected an (H, W) or (H, W, 3) array, got shape {arr.shape}")
    if arr.size == 0:
        raise ImageReadError(f"{label}: an image without pixels (shape {arr.shape})")
    if arr.dtype == np.uint8:
        rgb = arr.astype(_F32) if arr.ndim == 3 else None
        gray = np.round(gray_bgr2gray(rgb)) if rgb is not None else arr.astype(_F32)
        return gray / _F32(255.0)  # float32 / Python float stays float32 in numpy, as in sample.py
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


def read_rgb(src: ImageInput, name: str | None = None, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as (H, W, 3) RGB at its own precision: uint8 for 8-bit data, uint16 for 16-bit data.

    Files are read by :func:`open_image` (EXIF orientation applied, alpha dropped as OpenCV's ``imread`` does,
    gray and palette images expanded to three equal channels, 16-bit colour at full precision). Also takes a PIL
    image, a :class:`DecodedImage` or a uint8/uint16 array (H, W) or (H, W, 3|4).
    """
    arr, label = _pixels_of(src, name, pixel_cap(max_pixels))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.size == 0:
        raise ImageReadError(f"{label}: expected an (H, W) or (H, W, 3) image, got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f"{label}: colour needs uint8 or uint16 data, got {arr.dtype}")
    return np.ascontiguousarray(arr[..., :3])


def _is_tensor(x: Any) -> bool:
    """``isinstance(x, torch.Tensor)`` without importing torch (no tensor exists before torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def to_model_range(gray01: np.ndarray) -> torch.Tensor:
    """[0, 1] gray (H, W) -> (1, 1, H, W) float32 tensor in [-1, 1], computed in float32 as ``sample.py`` does."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(gray01 * _F32(2) - _F32(1)))[None, None]


# --------------------------------------------------------------------------------------------------- sizes


def crop_to_multiple(t: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """The official top-left crop to ``(H - H % m, W - W % m)``."""
    h, w = t.shape[-2:]
    return t[..., : h - h % multiple, : w - w % multiple]


def pad_amount(h: int, w: int, multiple: int = 32) -> tuple[int, int]:
    return (-h) % multiple, (-w) % multiple


def reflect_pad_to_multiple(t: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Reflect-pad at the bottom and right to the next multiple, so that no pixel is lost (the official crop drops
    up to 31 rows and columns).

    Reflection needs the pad to be smaller than the side; for tiny images it is applied repeatedly.
    """
    import torch

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


# Less than one grey level of 0..255, on the [-1, 1] scale of the fused luminance before the official stretch.
FLAT_SPAN = 2.0 / 255.0


def flat_output_note(luma: np.ndarray) -> Optional[str]:
    """A note when the fused luminance (``[-1, 1]``, before the official min-max stretch) spans less than one grey
    level: the stretch then turns the fusion of flat inputs into magnified noise, or black when it is exactly
    flat. That is the official output, but not a picture of anything, so it is said, not passed off."""
    span = float(luma.max() - luma.min()) if luma.size else 0.0
    if span >= FLAT_SPAN:
        return None
    return (f"the fused luminance spans {span * 127.5:.2g} grey levels before the official min-max stretch to "
            "0..255, so the output shows magnified noise (or is black): are the inputs flat?")


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


# ITU-T T.871 (JPEG) / BT.601 full-range YCbCr, as Pillow's "YCbCr" mode and OpenCV's YCrCb use it (8-bit data,
# chroma offset 128). OpenCV rounds the same constants to 3 digits (0.713, 0.564 / 1.403, 1.773).
_YCBCR_FULL_FROM_RGB = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float64
)
_RGB_FROM_YCBCR_FULL = np.array(
    [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], dtype=np.float64
)


def read_rgb8(src: ImageInput, name: str | None = None, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB for colour output: :func:`read_rgb`, with 16-bit data (gray or colour)
    rounded to 8 bits (``round(v / 257)``, so that 65535 stays white)."""
    rgb = read_rgb(src, name, max_pixels=max_pixels)
    return rgb if rgb.dtype == np.uint8 else np.round(rgb / 257.0).astype(np.uint8)


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
