"""Fuzzing the readers with real image bytes: every mutated PNG, JPEG or TIFF either reads (and fuses) or ends in
one clear error.

The sources are real files from shared/data (a PNG and a JPEG as they are; TIFFs written by Pillow from real
pixels, uncompressed and LZW). Each is mutated with a fixed seed in a bounded number of ways: byte flips,
truncations, and edits of the header fields a reader trusts (sizes, bit depths, colour types, sample counts, strip
offsets), with the PNG CRC recomputed so that an edit gets past the checksum as an attacker's would. An outcome is
acceptable when it is a decoded image (finite, in [0, 1], of the size the header promised up to a quarter turn) or
an :class:`ImageReadError` / ``ValueError`` whose message is one line naming the file; anything else, another
exception type, a multi-line message, a warning about a decompression bomb, fails. A truncated file is held to
more: it is refused (or, where only bytes after the image data are missing, reads exactly as the whole file), with
no warning beside the error, whatever Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` switch says.
"""

from __future__ import annotations

import io as pyio
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageFile

import ddfm_fast
from ddfm_fast import io

SEED = 20261201
FLIPS, CUTS = 24, 10  # per source file: random byte flips and truncations, besides the header edits


# ------------------------------------------------------------------------------------------ header edits


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, chunks = 8, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_join(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return b"".join(out)


def _png_edits(data: bytes) -> Iterator[tuple[str, bytes]]:
    chunks = _png_chunks(data)
    assert chunks[0][0] == b"IHDR"
    w, h, depth, ctype, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])

    def with_ihdr(**f) -> bytes:
        v = dict(w=w, h=h, depth=depth, ctype=ctype, comp=comp, filt=filt, inter=inter) | f
        ihdr = struct.pack(">IIBBBBB", v["w"], v["h"], v["depth"], v["ctype"], v["comp"], v["filt"], v["inter"])
        return _png_join([(b"IHDR", ihdr)] + chunks[1:])

    for value in (0, 1, w - 1, w + 1, 2 * w, 65535, 2**31 - 1, 2**32 - 1):
        yield f"width={value}", with_ihdr(w=value)
        yield f"height={value}", with_ihdr(h=value)
    for value in (1, 2, 4, 7, 16):
        yield f"depth={value}", with_ihdr(depth=value)
    for value in (0, 1, 3, 4, 5, 6):
        yield f"colour type={value}", with_ihdr(ctype=value)
    yield "interlaced", with_ihdr(inter=1)
    yield "compression=1", with_ihdr(comp=1)
    yield "filter=9", with_ihdr(filt=9)
    yield "bad IHDR crc", data[:29] + bytes([data[29] ^ 0xFF]) + data[30:]
    yield "no IEND", _png_join([c for c in chunks if c[0] != b"IEND"])
    yield "IDAT twice", _png_join(chunks[:-1] + [c for c in chunks if c[0] == b"IDAT"] + chunks[-1:])
    yield "chunk length 2^31", data[:33] + struct.pack(">I", 2**31) + data[37:]
    yield "acTL claiming 1000 frames", _png_join(chunks[:1] + [(b"acTL", struct.pack(">II", 1000, 0))] + chunks[1:])


def _jpeg_edits(data: bytes) -> Iterator[tuple[str, bytes]]:
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    # SOF: FF Cx, length (2), precision (1), height (2), width (2), components (1), per component 3 bytes
    def put(offset: int, fmt: str, value: int) -> bytes:
        return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]

    for value in (0, 1, 65535, 3000):
        yield f"height={value}", put(sof + 5, ">H", value)
        yield f"width={value}", put(sof + 7, ">H", value)
    for value in (0, 2, 4, 12, 255):
        yield f"components={value}", put(sof + 9, ">B", value)
    yield "precision=12", put(sof + 4, ">B", 12)
    yield "SOF length=2", put(sof + 2, ">H", 2)
    yield "progressive marker", put(sof + 1, ">B", 0xC2)
    yield "no EOI", data[:-2]


def _tiff_edits(data: bytes) -> Iterator[tuple[str, bytes]]:
    e = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(e + "I", data[4:8])
    (count,) = struct.unpack(e + "H", data[ifd:ifd + 2])
    entries = {}
    for k in range(count):
        pos = ifd + 2 + 12 * k
        tag, typ, n = struct.unpack(e + "HHI", data[pos:pos + 8])
        entries[tag] = (pos, typ, n)

    def set_tag(tag: int, value: int) -> bytes:
        pos, typ, _ = entries[tag]
        field = struct.pack(e + "HH", value & 0xFFFF, 0) if typ == 3 else struct.pack(e + "I", value & 0xFFFFFFFF)
        return data[:pos + 4] + struct.pack(e + "I", 1) + field + data[pos + 12:]

    edits = {256: (0, 1, 4096, 2**32 - 1), 257: (0, 1, 4096, 2**32 - 1), 258: (1, 7, 16, 32),
             259: (5, 7, 8, 32773, 999), 262: (0, 3, 5, 8, 99), 273: (0, 2**31), 277: (0, 1, 4, 16),
             279: (1, 2**31)}
    for tag, values in edits.items():
        if tag in entries:
            for value in values:
                yield f"tag {tag}={value}", set_tag(tag, value)
    yield "IFD offset past the end", data[:4] + struct.pack(e + "I", len(data) + 100) + data[8:]
    yield "IFD points at itself", data[:ifd + 2 + 12 * count] + struct.pack(e + "I", ifd) + data[ifd + 6 + 12 * count:]


# ------------------------------------------------------------------------------------------ mutations


def _mutations(data: bytes, edits: Callable[[bytes], Iterator[tuple[str, bytes]]],
               rng: np.random.Generator) -> list[tuple[str, bytes]]:
    out = list(edits(data))
    for _ in range(FLIPS):
        buf = bytearray(data)
        where = rng.integers(0, len(buf), size=int(rng.integers(1, 9)))
        for k in where:
            buf[k] ^= 1 << int(rng.integers(0, 8))
        out.append((f"flip {sorted(where.tolist())}", bytes(buf)))
    for size in _cuts(data, rng):
        out.append((f"cut at {size}", data[:size]))
    return out


def _cuts(data: bytes, rng: np.random.Generator) -> list[int]:
    return sorted({0, 1, 8, 16, 33, *rng.integers(34, len(data), size=CUTS).tolist()})


def _sources(data_dir: Path) -> dict[str, tuple[bytes, Callable]]:
    png = (data_dir / "mif/MRI_PET/PET/11.png").read_bytes()  # 256x256 RGB, as shipped
    jpeg = (data_dir / "ivf/RoadScene/vi/FLIR_05879.jpg").read_bytes()  # 560x302 RGB baseline JPEG, as shipped
    crop = Image.open(data_dir / "ivf/MSRS/vi/00004N.png").convert("RGB").crop((200, 150, 296, 214))
    tiffs = {}
    for compression in ("raw", "tiff_lzw"):
        buf = pyio.BytesIO()
        crop.save(buf, format="TIFF", compression=compression)
        tiffs[compression] = buf.getvalue()
    return {"png": (png, _png_edits), "jpg": (jpeg, _jpeg_edits), "raw.tif": (tiffs["raw"], _tiff_edits),
            "lzw.tif": (tiffs["tiff_lzw"], _tiff_edits)}


# ------------------------------------------------------------------------------------------ outcomes


def _check_error(exc: BaseException, path: Path, problems: list[str], what: str) -> None:
    msg = str(exc)
    if not isinstance(exc, (io.ImageReadError, ValueError)):
        problems.append(f"{what}: {type(exc).__name__}: {msg[:200]}")
    elif "\n" in msg or not msg.strip():
        problems.append(f"{what}: not a one-line message: {msg[:200]!r}")
    elif path.name not in msg:
        problems.append(f"{what}: the message does not name the file: {msg[:200]}")


def _read_outcome(path: Path, problems: list[str], what: str) -> np.ndarray | None:
    try:
        header = io.image_size(path)
    except Exception as exc:  # noqa: BLE001 -- the test's job is to see every exception type
        _check_error(exc, path, problems, f"{what} image_size")
        header = None
    try:
        gray = io.read_gray(path)
    except Exception as exc:  # noqa: BLE001
        _check_error(exc, path, problems, f"{what} read_gray")
        return None
    if gray.dtype != np.float32 or gray.ndim != 2 or not np.isfinite(gray).all() or gray.min() < 0 or gray.max() > 1:
        problems.append(f"{what}: read_gray gave {gray.dtype} {gray.shape} outside [0, 1] or non-finite")
    elif header is not None and sorted(header) != sorted(gray.shape):
        problems.append(f"{what}: header says {header}, decoded {gray.shape[::-1]}")
    return gray


def _check_cut(gray: np.ndarray | None, whole: np.ndarray, caught: list, problems: list[str], what: str) -> None:
    """A truncated file is refused, or reads as the whole file (nothing of the image was cut); and never warns."""
    if gray is not None and not (gray.shape == whole.shape and np.array_equal(gray, whole)):
        problems.append(f"{what}: a truncated file read as other pixels than the whole file's")
    if caught:
        problems.append(f"{what}: warned beside its outcome: {[f'{w.category.__name__}: {w.message}' for w in caught]}")


@pytest.fixture(scope="module")
def sources(data_dir: Path) -> dict[str, tuple[bytes, Callable]]:
    return _sources(data_dir)


def _whole(kind: str, data: bytes, tmp_path: Path) -> np.ndarray:
    path = tmp_path / f"whole.{kind.split('.')[-1]}"
    path.write_bytes(data)
    return io.read_gray(path)


def test_mutated_files_read_or_fail_clearly(sources, tmp_path):
    rng = np.random.default_rng(SEED)
    problems: list[str] = []
    counts = {"read": 0, "refused": 0}
    slowest = (0.0, "")
    bombs: list[str] = []
    t_all = time.perf_counter()
    for kind, (data, edits) in sources.items():
        whole = _whole(kind, data, tmp_path)
        for k, (what, blob) in enumerate(_mutations(data, edits, rng)):
            path = tmp_path / f"{kind.split('.')[0]}_{k:03d}.{kind.split('.')[-1]}"
            path.write_bytes(blob)
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                gray = _read_outcome(path, problems, f"{kind} {what}")
            slowest = max(slowest, (time.perf_counter() - t0, f"{kind} {what}"))
            counts["read" if gray is not None else "refused"] += 1
            bombs += [str(w.message) for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
            if what.startswith("cut at"):
                _check_cut(gray, whole, caught, problems, f"{kind} {what}")
    assert not bombs, bombs
    assert not problems, "\n".join(problems)
    # Both outcomes occur (the mutations are not all harmless, nor all fatal); 4 sources x ~50 mutations each.
    assert counts["read"] > 20 and counts["refused"] > 100, counts
    # A header parse or a small decode each: measured under 0.2 s for the slowest case on the 2-core dev CPU.
    assert slowest[0] < 5.0, slowest
    assert time.perf_counter() - t_all < 60


@pytest.mark.parametrize("load_truncated", [False, True])
def test_cut_files_are_refused_whatever_pillows_switch_says(sources, tmp_path, monkeypatch, load_truncated):
    # With ImageFile.LOAD_TRUNCATED_IMAGES on (a process-wide switch that other code sets), Pillow itself reads a
    # cut JPEG or TIFF without a word, the missing part grey or black; the reader's own checks must not change.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    rng = np.random.default_rng(SEED + 2)
    problems: list[str] = []
    refused = total = 0
    for kind, (data, _) in sources.items():
        whole = _whole(kind, data, tmp_path)
        for size in _cuts(data, rng) + [len(data) // 2, len(data) - 1]:
            total += 1
            path = tmp_path / f"cut_{size}.{kind.split('.')[-1]}"
            path.write_bytes(data[:size])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                gray = _read_outcome(path, problems, f"{kind} cut at {size}")
            refused += gray is None
            _check_cut(gray, whole, caught, problems, f"{kind} cut at {size}")
    assert not problems, "\n".join(problems)
    # Every cut loses image data but the PNG's last byte (part of the CRC of IEND, after all the image data).
    assert refused == total - 1, (refused, total)


def test_mutated_crops_fuse_or_fail_clearly(data_dir, tmp_path):
    """``fuse(..., prior="none", steps=2)`` of a mutated 48x40 crop with its clean partner."""
    rng = np.random.default_rng(SEED + 1)
    box = (300, 200, 348, 240)
    ir = Image.open(data_dir / "ivf/MSRS/ir/00004N.png").crop(box)
    vis = tmp_path / "vis.png"
    Image.open(data_dir / "ivf/MSRS/vi/00004N.png").crop(box).save(vis)
    problems: list[str] = []
    counts = {"fused": 0, "refused": 0}
    for fmt, suffix, edits in (("PNG", "png", _png_edits), ("JPEG", "jpg", _jpeg_edits), ("TIFF", "tif", _tiff_edits)):
        buf = pyio.BytesIO()
        ir.save(buf, format=fmt)
        mutations = _mutations(buf.getvalue(), edits, rng)
        for k in rng.choice(len(mutations), size=min(25, len(mutations)), replace=False):
            what, blob = mutations[k]
            path = tmp_path / f"ir_{suffix}_{k:03d}.{suffix}"
            path.write_bytes(blob)
            try:
                res = ddfm_fast.fuse(path, vis, prior="none", steps=2, device="cpu")
            except Exception as exc:  # noqa: BLE001 -- the test's job is to see every exception type
                _check_error(exc, path, problems, f"{fmt} {what}")
                counts["refused"] += 1
                continue
            counts["fused"] += 1
            if res.fused.shape != (40, 48) or res.fused.dtype != np.uint8 or not np.isfinite(res.luma).all():
                problems.append(f"{fmt} {what}: fused {res.fused.shape} {res.fused.dtype}, finite luma "
                                f"{np.isfinite(res.luma).all()}")
    assert not problems, "\n".join(problems)
    assert counts["fused"] > 5 and counts["refused"] > 20, counts
