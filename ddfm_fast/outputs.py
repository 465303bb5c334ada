"""Output files: the format a name asks for, writing it atomically, and checking beforehand that it can be written.

Formats (:data:`FORMATS`), chosen by the file's extension for one pair (``-o fused.jpg``) and by ``--format``
for folder runs:

=======  ===============  ==========================================================================
format   extensions       holds
=======  ===============  ==========================================================================
png      .png             8-bit gray or RGB; 16-bit gray (raw output)
tiff     .tif, .tiff      8-bit gray or RGB; 16-bit gray (raw output); deflate-compressed when Pillow
                          has libtiff, else uncompressed
jpeg     .jpg, .jpeg      8-bit gray or RGB, quality 95, no chroma subsampling (lossy)
bmp      .bmp             8-bit gray or RGB
npy      .npy             the raw float32 luminance (H, W), ``allow_pickle=False``
=======  ===============  ==========================================================================

Which output kind (``RunConfig.output``) fits which format is :data:`KIND_FORMATS`: the 16-bit raw luminance
needs PNG or TIFF (JPEG and BMP hold 8 bits), the float luminance ``.npy``.

Every file is written to a temporary name beside its destination (:func:`ddfm_fast.io.atomic_path`) and takes its
final name in one rename, so a reader never sees half a file. :func:`write_output` hands the finished
temporary file's fingerprint to a ``before_commit`` hook before that rename: a folder run records what made
the output (``ddfm_fast.resume``) before the output exists under its name, so no output is ever in place
without its record.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np

from ddfm_fast import io

FORMATS: dict[str, str] = {"png": ".png", "tiff": ".tif", "jpeg": ".jpg", "bmp": ".bmp", "npy": ".npy"}
SUFFIXES: dict[str, str] = {".png": "png", ".tif": "tiff", ".tiff": "tiff", ".jpg": "jpeg", ".jpeg": "jpeg",
                            ".bmp": "bmp", ".npy": "npy"}
KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "gray": ("png", "tiff", "jpeg", "bmp"),
    "color": ("png", "tiff", "jpeg", "bmp"),
    "png16": ("png", "tiff"),  # the 16-bit raw luminance (its name is historical: TIFF holds it too)
    "npy": ("npy",),
}
KIND_WORDS = {"gray": "the 8-bit gray output", "color": "the colour output", "png16": "16-bit raw output",
              "npy": "raw float output"}
JPEG_QUALITY = 95

# errno values that no other pair can escape: the run stops instead of failing every remaining pair in turn.
FATAL_WRITE_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EIO)
                               if code is not None)


class OutputFormatError(ValueError):
    """An output name or format that ddfm-fast cannot write; the message names it and the choices."""


def format_of(path: Union[str, os.PathLike]) -> str:
    """The format an output file name asks for, from its extension (case-insensitive)."""
    suffix = Path(path).suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    choices = ", ".join(sorted(SUFFIXES))
    what = f"extension {suffix!r}" if suffix else "no extension"
    raise OutputFormatError(f"{io.display_name(path)}: {what} is not an output format ddfm-fast writes "
                            f"(choose one of {choices})")


def check_format(kind: str, fmt: str) -> None:
    """Raise :class:`OutputFormatError` when output ``kind`` cannot be stored as ``fmt``."""
    if fmt not in FORMATS:
        raise OutputFormatError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    allowed = KIND_FORMATS[kind]
    if fmt not in allowed:
        need = " or ".join(FORMATS[f] for f in allowed)
        raise OutputFormatError(f"{KIND_WORDS[kind]} is written as {need}, not {FORMATS[fmt]}")


# --------------------------------------------------------------------------------------------------- fingerprints


@dataclass(frozen=True)
class Fingerprint:
    """A file's size and the SHA-256 of all its bytes."""

    bytes: int
    sha256: str


def fingerprint(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> Fingerprint:
    """SHA-256 over every byte of a regular file (read in 1 MiB chunks). Raises :class:`ddfm_fast.io.FileProblem`
    for what is not a non-empty regular file, ``OSError`` for a read that fails."""
    h = hashlib.sha256()
    n = 0
    with io.open_regular_file(path) as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
            n += len(block)
    return Fingerprint(n, h.hexdigest())


# --------------------------------------------------------------------------------------------------- writing


def _encode(array: np.ndarray, tmp: Path, fmt: str) -> None:
    if fmt == "npy":
        if array.dtype != np.float32:
            raise TypeError(f"npy output holds float32 data, got {array.dtype}")
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        return
    from PIL import Image, features

    if array.dtype == np.uint16:
        if array.ndim != 2 or fmt not in ("png", "tiff"):
            raise TypeError(f"16-bit output is gray PNG or TIFF, got shape {array.shape} as {fmt}")
    elif array.dtype != np.uint8:
        raise TypeError(f"image output needs uint8 or uint16 data, got {array.dtype}")
    img = Image.fromarray(np.ascontiguousarray(array))
    if fmt == "png":
        img.save(tmp, format="PNG")
    elif fmt == "jpeg":
        img.save(tmp, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    elif fmt == "tiff":
        compression = "tiff_adobe_deflate" if features.check_codec("libtiff") else None
        img.save(tmp, format="TIFF", compression=compression)
    elif fmt == "bmp":
        img.save(tmp, format="BMP")
    else:  # pragma: no cover - check_format rejects it first
        raise OutputFormatError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")


def write_output(array: np.ndarray, dest: Union[str, os.PathLike], fmt: str, *,
                 before_commit: Optional[Callable[[Fingerprint], None]] = None) -> Fingerprint:
    """Write ``array`` to ``dest`` as ``fmt``, atomically; returns the written file's fingerprint.

    ``before_commit`` receives the fingerprint of the complete temporary file before it is renamed to ``dest``;
    if it raises, nothing is renamed and the temporary file is removed.
    """
    dest = Path(dest)
    with io.atomic_path(dest) as tmp:
        _encode(array, tmp, fmt)
        printed = fingerprint(tmp)
        if before_commit is not None:
            before_commit(printed)
    return printed


def readable_problem(path: Union[str, os.PathLike], fmt: str) -> Optional[str]:
    """Why ``path`` is not a file of format ``fmt`` that opens (None when its header reads): 0 bytes, a text
    file, a truncated header. Only the header is read."""
    try:
        if fmt == "npy":
            with io.open_regular_file(path) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    return f"is an .npy file of version {version}, which ddfm-fast does not write"
            if len(shape) != 2 or dtype != np.float32:
                return f"holds a {dtype} array of shape {shape}, not a float32 (H, W) luminance"
            return None
        io.image_size(path)
        return None
    except io.FileProblem as exc:
        return exc.reason
    except (io.ImageReadError, ValueError, OSError, EOFError) as exc:
        return f"does not open as {fmt} ({exc})"


# --------------------------------------------------------------------------------------------------- before the run


def output_problem(dest: Union[str, os.PathLike], *, folder: bool) -> Optional[str]:
    """Why an output cannot be written at ``dest`` (a folder when ``folder``, else a file), or None.

    Checked before anything is computed: ``dest`` (or, for a file, its folder) must be a folder or not exist yet,
    the nearest existing folder above it must be a folder (not a regular file) that this process may write
    (``os.access``: a read-only file system says so even to root). Folders that do not exist yet are created
    when the first output is written.
    """
    dest = Path(dest)
    name = io.display_name(dest)
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None  # a part of the path is a file: found below
    except OSError as exc:
        return f"{name}: cannot be checked ({exc.strerror})"
    if st is not None:
        if folder and not stat.S_ISDIR(st.st_mode):
            return f"{name} exists and is not a folder"
        if not folder and stat.S_ISDIR(st.st_mode):
            return f"{name} is a folder; give the output file's name"
        if not folder and not stat.S_ISREG(st.st_mode):
            return f"{name} exists and is not a regular file"
    target = dest if folder else (dest.parent if str(dest.parent) else Path("."))
    probe = target
    while True:
        try:
            st = os.stat(probe)
            break
        except (FileNotFoundError, NotADirectoryError):
            if probe.parent == probe:
                return f"{name}: no part of its path exists"
            probe = probe.parent
        except OSError as exc:
            return f"{io.display_name(probe)}: cannot be checked ({exc.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{name}: {io.display_name(probe)} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        return f"{name}: {io.display_name(probe)} {why}"
    return None


def same_path(a: Union[str, os.PathLike], b: Union[str, os.PathLike]) -> bool:
    """True when ``a`` and ``b`` name one file or folder (links and ``..`` resolved); False when either cannot be
    resolved."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def replaced_input(dests: Iterable[Union[str, os.PathLike]],
                   inputs: Iterable[Union[str, os.PathLike]]) -> Optional[tuple[Path, Path]]:
    """``(dest, input)`` for the first file of ``dests`` (the files a command will write) that is one of
    ``inputs`` (the files it reads), links and ``..`` resolved; None when none is. Checked before anything is
    written by every command that writes beside what it reads (a montage, progress images, difference pictures,
    a report): the callers name the concrete files on both sides, so a new file in an input folder, or a rerun
    that writes its own earlier output again, is not taken for an input."""
    read = {}
    for src in inputs:
        try:
            read[Path(src).resolve()] = Path(src)
        except (OSError, RuntimeError):
            continue
    for dest in dests:
        try:
            hit = read.get(Path(dest).resolve())
        except (OSError, RuntimeError):
            continue
        if hit is not None:
            return Path(dest), hit
    return None


def write_error(dest: Union[str, os.PathLike], exc: OSError) -> str:
    """A write failure as one line naming the file: ``OUT/x.png: cannot write it (No space left on device)``."""
    return f"{io.display_name(dest)}: cannot write it ({exc.strerror or exc})"
