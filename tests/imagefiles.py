"""Image files written byte by byte for the reading tests: layouts Pillow cannot write (16-bit colour PNG and TIFF),
and headers that lie about the image (a 100000 x 100000 PNG in a few hundred bytes).

Each writer follows its format's specification (PNG: ISO/IEC 15948; TIFF 6.0 baseline) with no extras, so what a
test reads back is exactly what it wrote.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (gray, gray+alpha, RGB, RGBA)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_ihdr(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_bytes(arr: np.ndarray, *, interlace: bool = False, height: int | None = None) -> bytes:
    """A PNG of ``arr`` (H, W) or (H, W, C), C = 1..4, uint8 or uint16 (8- or 16-bit samples); every row with
    filter type 0 (none), Adam7-interlaced when asked. ``height`` puts another height in the header (a lie)."""
    arr = arr[..., None] if arr.ndim == 2 else arr
    h, w, c = arr.shape
    depth = 16 if arr.dtype == np.uint16 else 8
    samples = arr.astype(">u2") if depth == 16 else arr.astype(np.uint8)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    raw = b"".join(b"\0" + row.tobytes() for x0, y0, dx, dy in passes for row in samples[y0::dy, x0::dx]
                   if row.size)
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, height or h, depth, _PNG_COLOR_TYPE[c], 0, 0, int(interlace)))
    return PNG_SIGNATURE + ihdr + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of ``arr`` (H, W) or (H, W, C) uint16, C = 1..4."""
    return png_bytes(arr.astype(np.uint16))


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking 8-bit RGB PNG header that claims ``width x height`` pixels, followed by one tiny row of data.

    A few hundred bytes, whatever the claimed size: a reader that trusts the header allocates width*height*3 bytes.
    """
    row = zlib.compress(b"\0" * 64)
    return PNG_SIGNATURE + png_ihdr(width, height) + png_chunk(b"IDAT", row) + png_chunk(b"IEND", b"")


def tiff16(arr: np.ndarray, byteorder: str = "<", compression: int = 1, size: tuple[int, int] | None = None) -> bytes:
    """A one-strip 16-bit RGB TIFF of ``arr`` (H, W, 3) uint16: ``byteorder`` "<" (II) or ">" (MM); compression 1
    (none) or 8 (Adobe deflate, which Pillow hands to libtiff). ``size`` = (W, H) puts another size in the header."""
    h, w, c = arr.shape
    w, h = size or (w, h)
    assert c == 3
    e = byteorder
    data = arr.astype(e + "u2").tobytes()
    if compression == 8:
        data = zlib.compress(data)
    bps_offset = 8 + len(data)
    bps = struct.pack(e + "HHH", 16, 16, 16)
    ifd_offset = bps_offset + len(bps)
    ifd_offset += ifd_offset % 2  # IFDs start on a word boundary
    tags = sorted([
        (256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bps_offset), (259, 3, 1, compression), (262, 3, 1, 2),
        (273, 4, 1, 8), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1),
    ])
    out = (b"II*\0" if e == "<" else b"MM\0*") + struct.pack(e + "I", ifd_offset) + data + bps
    out += b"\0" * (ifd_offset - len(out))
    out += struct.pack(e + "H", len(tags))
    for tag, typ, count, value in tags:
        if typ == 3 and count == 1:  # a SHORT value sits left-justified in the 4-byte field
            out += struct.pack(e + "HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack(e + "HHII", tag, typ, count, value)
    return out + struct.pack(e + "I", 0)


def tiff8(arr: np.ndarray, *, rows_per_strip: int | None = None, tile: tuple[int, int] | None = None,
          planar: bool = False) -> bytes:
    """An uncompressed little-endian 8-bit TIFF of ``arr`` (H, W) gray or (H, W, 3) RGB, its directory first and the
    pixel data last (as Pillow writes an uncompressed TIFF, so that a cut falls in the pixels): in strips of
    ``rows_per_strip`` rows (default: one strip), or in ``tile`` = (width, length) tiles (multiples of 16; edge
    tiles padded to full size, as TIFF 6.0 section 15 requires); RGB samples interleaved, or one plane each when
    ``planar``."""
    arr = arr[..., None] if arr.ndim == 2 else arr
    h, w, c = arr.shape
    chunks: list[bytes] = []
    for plane in ([arr[..., k:k + 1] for k in range(c)] if planar else [arr]):
        if tile is None:
            rows = rows_per_strip or h
            chunks += [plane[y:y + rows].tobytes() for y in range(0, h, rows)]
        else:
            tw, tl = tile
            padded = np.zeros((-(-h // tl) * tl, -(-w // tw) * tw, plane.shape[2]), np.uint8)
            padded[:h, :w] = plane
            chunks += [padded[y:y + tl, x:x + tw].tobytes() for y in range(0, h, tl) for x in range(0, w, tw)]
    n = len(chunks)
    offsets_tag, counts_tag = (273, 279) if tile is None else (324, 325)
    layout = [(278, 3, 1, rows_per_strip or h)] if tile is None else [(322, 3, 1, tile[0]), (323, 3, 1, tile[1])]
    tags = sorted([(256, 3, 1, w), (257, 3, 1, h), (258, 3, c, 8), (259, 3, 1, 1), (262, 3, 1, 2 if c == 3 else 1),
                   (offsets_tag, 4, n, 0), (277, 3, 1, c), (counts_tag, 4, n, 0), (284, 3, 1, 2 if planar else 1),
                   *layout])
    values_at = 8 + 2 + 12 * len(tags) + 4  # the out-of-line values follow the directory, the pixels follow them
    bps_at, offsets_at, counts_at = values_at, values_at + 6, values_at + 6 + 4 * n
    data_at = counts_at + 4 * n
    offsets = [data_at + sum(map(len, chunks[:k])) for k in range(n)]
    out = b"II*\0" + struct.pack("<IH", 8, len(tags))
    for tag, typ, count, value in tags:
        if tag == 258 and c == 3:
            value = bps_at
        elif tag in (offsets_tag, counts_tag):
            values = offsets if tag == offsets_tag else [len(chunk) for chunk in chunks]
            value = values[0] if n == 1 else (offsets_at if tag == offsets_tag else counts_at)
        if typ == 3 and count == 1:  # a single SHORT sits left-justified in the 4-byte field
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0) + struct.pack("<3H", 8, 8, 8)
    out += struct.pack(f"<{n}I", *offsets) + struct.pack(f"<{n}I", *map(len, chunks))
    return out + b"".join(chunks)
