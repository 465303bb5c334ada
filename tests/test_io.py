"""Reading inputs (the official gray conversion, 16-bit precision, the pixel cap, one frame, every odd file a
machine can hold) and atomic writes."""

from __future__ import annotations

import os
import re
import struct
import time
import warnings
from io import BytesIO
from pathlib import Path

import imagefiles
import numpy as np
import pytest
from PIL import Image, ImageFile

from ddfm_fast import io

MSRS_IR = "ivf/MSRS/ir/00004N.png"  # 640x480 8-bit gray
MSRS_VI = "ivf/MSRS/vi/00004N.png"  # 640x480 8-bit RGB
ROADSCENE_VI = "ivf/RoadScene/vi/FLIR_05879.jpg"  # 560x302 baseline JPEG


def _read_error(src, **kwargs) -> str:
    """The message of the ImageReadError that reading ``src`` raises; it must be one line."""
    with pytest.raises(io.ImageReadError) as info:
        io.read_gray(src, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ 8-bit: as today


@pytest.mark.parametrize("rel", [MSRS_IR, MSRS_VI, "ivf/TNO/ir/01.png", "mif/MRI_PET/PET/11.png"])
def test_8bit_files_read_as_their_arrays(data_dir, rel):
    # A file goes through the same float32 BGR2GRAY + round as the uint8 array Pillow decodes it to.
    path = data_dir / rel
    if not path.exists():
        pytest.skip(f"{path} absent")
    rgb = np.asarray(Image.open(path).convert("RGB"))
    got = io.read_gray(path)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, io.read_gray(rgb))
    np.testing.assert_array_equal(got * 255, np.round(io.gray_bgr2gray(rgb.astype(np.float32))))
    np.testing.assert_array_equal(io.read_rgb8(path), rgb)


def test_gray_and_palette_files_keep_their_values(tmp_path):
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(values, "L").save(tmp_path / "l.png")
    Image.fromarray(values, "L").convert("P").save(tmp_path / "p.png")
    Image.fromarray(np.stack([values, values, values, 255 - values], -1), "RGBA").save(tmp_path / "rgba.png")
    for name in ("l.png", "p.png", "rgba.png"):  # alpha is dropped, not composited (as OpenCV's imread)
        np.testing.assert_array_equal(io.read_gray(tmp_path / name) * 255, values.astype(np.float32), err_msg=name)


# ------------------------------------------------------------------------------------------ 16-bit precision


def _random16(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_png_keeps_every_bit(tmp_path, channels):
    arr = _random16((9, 11, channels))
    path = tmp_path / "c16.png"
    path.write_bytes(imagefiles.png16(arr))
    rgb = io.read_rgb(path)
    assert rgb.dtype == np.uint16
    np.testing.assert_array_equal(rgb, arr[..., :3])
    gray = io.read_gray(path)
    np.testing.assert_array_equal(gray, io.read_gray(arr[..., :3]))  # the uint16 array convention, exactly
    assert np.unique(gray).size > 90  # 99 pixels of random 16-bit colour: 8-bit data would give at most 256 levels,
    assert not np.array_equal(gray, io.read_gray((arr[..., :3] >> 8).astype(np.uint8)))  # and differ from these
    np.testing.assert_array_equal(io.read_rgb8(path), np.round(arr[..., :3] / 257.0).astype(np.uint8))


def test_16bit_gray_alpha_png_keeps_every_bit(tmp_path):
    arr = _random16((7, 5, 2), seed=1)
    path = tmp_path / "la16.png"
    path.write_bytes(imagefiles.png16(arr))
    np.testing.assert_array_equal(io.read_rgb(path), np.repeat(arr[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(io.read_gray(path), (arr[..., 0] / 65535.0).astype(np.float32))


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("compression", [1, 8])
def test_16bit_colour_tiff_keeps_every_bit(tmp_path, byteorder, compression):
    arr = _random16((6, 13, 3), seed=2)
    path = tmp_path / "c16.tif"
    path.write_bytes(imagefiles.tiff16(arr, byteorder, compression))
    np.testing.assert_array_equal(io.read_rgb(path), arr)


def test_16bit_gray_png_and_ppm(tmp_path):
    gray = _random16((5, 6), seed=3)
    (tmp_path / "g16.png").write_bytes(imagefiles.png16(gray))
    np.testing.assert_array_equal(io.read_gray(tmp_path / "g16.png"), (gray / 65535.0).astype(np.float32))
    rgb = _random16((5, 6, 3), seed=4)
    (tmp_path / "c16.ppm").write_bytes(b"P6 6 5 65535\n" + rgb.astype(">u2").tobytes())
    np.testing.assert_array_equal(io.read_rgb(tmp_path / "c16.ppm"), rgb)
    # maxval 4095 is scaled to 0..65535 and rounded, as Pillow scales a 12-bit PGM.
    (tmp_path / "c12.ppm").write_bytes(b"P6 1 1 4095\n" + np.array([0, 1000, 4095], ">u2").tobytes())
    np.testing.assert_array_equal(io.read_rgb(tmp_path / "c12.ppm"), [[[0, 16004, 65535]]])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_interlaced_pngs_read_exactly(tmp_path, dtype):
    arr = _random16((13, 10, 3), seed=5)
    arr = arr if dtype == np.uint16 else (arr >> 8).astype(np.uint8)
    (tmp_path / "adam7.png").write_bytes(imagefiles.png_bytes(arr, interlace=True))
    assert Image.open(tmp_path / "adam7.png").info.get("interlace") == 1
    np.testing.assert_array_equal(io.read_rgb(tmp_path / "adam7.png"), arr)


@pytest.mark.parametrize("interlace", [False, True])
def test_a_png_whose_data_holds_fewer_rows_than_its_header_is_refused(tmp_path, interlace):
    # Pillow stops where the compressed stream ends and leaves the missing rows black, without a word.
    arr = (_random16((8, 6, 3), seed=6) >> 8).astype(np.uint8)
    path = tmp_path / "short.png"
    path.write_bytes(imagefiles.png_bytes(arr, interlace=interlace, height=9))
    msg = _read_error(path)
    assert msg.startswith(f"{path}: its image data ends early (") and msg.endswith("the file is damaged"), msg


# ------------------------------------------------------------------------------------------ truncated files
# Pillow refuses a cut JPEG or uncompressed TIFF only while ImageFile.LOAD_TRUNCATED_IMAGES is off; that switch is
# process-wide and other code turns it on, and then Pillow reads the missing part as grey (JPEG) or black (TIFF)
# without a word. The reader checks the file's own structure instead, so each test runs with the switch off and on.


def _quiet_read_error(path) -> str:
    """:func:`_read_error`, with no warning beside the error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        msg = _read_error(path)
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    return msg


def _jpegs(data_dir) -> dict[str, bytes]:
    buf = BytesIO()
    Image.open(data_dir / ROADSCENE_VI).save(buf, format="JPEG", progressive=True, quality=90)
    return {"baseline": (data_dir / ROADSCENE_VI).read_bytes(), "progressive": buf.getvalue()}


@pytest.mark.parametrize("load_truncated", [False, True])
@pytest.mark.parametrize("kind", ["baseline", "progressive"])
def test_a_jpeg_cut_short_is_refused(data_dir, tmp_path, monkeypatch, kind, load_truncated):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    data = _jpegs(data_dir)[kind]
    sos = data.index(b"\xff\xda")
    path = tmp_path / "cut.jpg"
    for size in (len(data) * 3 // 10, len(data) * 6 // 10, len(data) - 2, len(data) - 1):  # no EOI, or half of it
        path.write_bytes(data[:size])
        assert io.image_size(path) == (560, 302)  # the header is whole: only the decode finds the cut
        msg = _quiet_read_error(path)
        scan = "1" if kind == "baseline" else r"\d+"  # the progressive file has 10 scans
        assert re.fullmatch(rf"{re.escape(str(path))}: its image data ends early \(the file ends at byte {size} "
                            rf"in scan {scan}, with no end-of-image marker\): the file is truncated", msg), msg
    path.write_bytes(data[:sos - 3])  # inside the segment before the first scan (a table)
    msg = _quiet_read_error(path)
    assert re.fullmatch(rf"{re.escape(str(path))}: it ends early \(at byte {sos - 3}, inside its [A-Z]+[0-9]* segment "
                        rf"of bytes \d+\.\.{sos}\): the file is truncated", msg), msg


def test_jpegs_that_reach_their_end_marker_still_read(data_dir, tmp_path):
    jpegs = _jpegs(data_dir)
    base = jpegs["baseline"]
    sos = base.index(b"\xff\xda")
    buf = BytesIO()
    Image.open(data_dir / ROADSCENE_VI).save(buf, format="JPEG", restart_marker_rows=1)
    assert b"\xff\xd0" in buf.getvalue()
    whole = io.read_rgb8(data_dir / ROADSCENE_VI)
    cases = {
        "progressive": (jpegs["progressive"], None),
        "restart markers": (buf.getvalue(), None),
        "bytes after EOI": (base + b"\0 trailing bytes \xff\xd8\xff\xe0\0\x10", whole),
        "fill bytes before markers": (base[:sos] + b"\xff\xff" + base[sos:-2] + b"\xff\xff\xd9", whole),
    }
    for name, (blob, expected) in cases.items():
        path = tmp_path / "whole.jpg"
        path.write_bytes(blob)
        expected = np.asarray(Image.open(path).convert("RGB")) if expected is None else expected
        np.testing.assert_array_equal(io.read_rgb8(path), expected, err_msg=name)


def _raw_tiff(data_dir) -> bytes:
    """An uncompressed RGB TIFF of real pixels (96x64), as Pillow writes it: header, directory, then the pixels."""
    crop = Image.open(data_dir / MSRS_VI).convert("RGB").crop((200, 150, 296, 214))
    buf = BytesIO()
    crop.save(buf, format="TIFF", compression="raw")
    return buf.getvalue()


@pytest.mark.parametrize("load_truncated", [False, True])
def test_a_raw_tiff_cut_short_is_refused(data_dir, tmp_path, monkeypatch, load_truncated):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    data = _raw_tiff(data_dir)
    (tile,) = Image.open(BytesIO(data)).tile
    start, promised = tile[2], 96 * 64 * 3
    assert len(data) == start + promised
    path = tmp_path / "cut.tif"
    for size in (start + 1, start + promised // 2, len(data) - 1):
        path.write_bytes(data[:size])
        assert io.image_size(path) == (96, 64)
        assert _quiet_read_error(path) == (f"{path}: its image data ends early ({size - start} of the {promised} "
                                           "bytes its header promises): the file is truncated")


@pytest.mark.parametrize("layout", [dict(rows_per_strip=7), dict(tile=(32, 16)), dict(planar=True, rows_per_strip=10),
                                    dict(planar=True, tile=(16, 16))],
                         ids=["strips", "tiles", "planes", "planar tiles"])
@pytest.mark.parametrize("load_truncated", [False, True])
def test_raw_tiffs_in_strips_tiles_and_planes_read_exactly_and_refuse_a_cut(data_dir, tmp_path, monkeypatch, layout,
                                                                            load_truncated):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    rgb = np.asarray(Image.open(data_dir / MSRS_VI).convert("RGB"))[100:171, 200:297]  # 97x71: edge tiles padded
    blob = imagefiles.tiff8(rgb, **layout)
    path = tmp_path / "layout.tif"
    path.write_bytes(blob)
    np.testing.assert_array_equal(io.read_rgb(path), rgb)
    start = min(t[2] for t in Image.open(path).tile)  # the strips or tiles follow each other to the end of the file
    # A cut anywhere in them is refused, in the padding of the last edge tile too (rows below the image), which
    # its TileByteCounts promise.
    for size in (start + 5, (start + len(blob)) // 2, len(blob) - 1):
        path.write_bytes(blob[:size])
        assert _quiet_read_error(path) == (f"{path}: its image data ends early ({size - start} of the "
                                           f"{len(blob) - start} bytes its header promises): the file is truncated")


def test_a_tiff_cut_in_its_directory_is_one_error_and_no_warning(data_dir, tmp_path):
    # Pillow reads a directory cut short with UserWarnings ("Corrupt EXIF data ...") before it gives up on the file
    # or drops the tag; the reader checks the directories first.
    raw = _raw_tiff(data_dir)  # the directory first (at byte 8), then its values, then the pixels
    crop = Image.open(BytesIO(raw))
    buf = BytesIO()
    crop.save(buf, format="TIFF", compression="tiff_lzw")  # through libtiff: the directory last
    lzw = buf.getvalue()
    e = "<" if raw[:2] == b"II" else ">"
    (count,) = struct.unpack(e + "H", raw[8:10])
    entries_end = 8 + 2 + 12 * count + 4
    (lzw_ifd,) = struct.unpack(e + "I", lzw[4:8])
    assert lzw_ifd > len(lzw) // 2
    cases = {
        "header.tif": (raw[:6], "it ends early (at byte 6, inside its TIFF header)"),
        "entries.tif": (raw[:40], f"its directory ends early (it runs to byte {entries_end}, the file has 40 bytes)"),
        "values.tif": (raw[:entries_end + 2], f"its directory points past the end of the file (tag 258's value at "
                                              f"bytes {entries_end}..{entries_end + 6}, the file has {entries_end + 2} "
                                              "bytes)"),
        "lzw.tif": (lzw[:lzw_ifd], f"its directory begins past the end of the file (at byte {lzw_ifd}, the file has "
                                   f"{lzw_ifd} bytes)"),
    }
    for name, (blob, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        ending = "the file is truncated or damaged" if name == "values.tif" else "the file is truncated"
        assert _quiet_read_error(path) == f"{path}: {words}: {ending}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(io.ImageReadError, match=re.escape(words)):
                io.image_size(path)
        assert not caught, [str(w.message) for w in caught]


def test_open_image_decodes_once_for_gray_and_colour(data_dir, tmp_path):
    decoded = io.open_image(data_dir / MSRS_VI)
    assert decoded.size == (640, 480) and decoded.pixels.dtype == np.uint8
    np.testing.assert_array_equal(io.read_gray(decoded), io.read_gray(data_dir / MSRS_VI))
    np.testing.assert_array_equal(io.read_rgb8(decoded), io.read_rgb8(data_dir / MSRS_VI))
    arr = _random16((4, 4, 3))
    (tmp_path / "c16.png").write_bytes(imagefiles.png16(arr))
    np.testing.assert_array_equal(io.open_image(tmp_path / "c16.png").pixels, arr)


def test_float_and_out_of_range_integer_images_are_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32), "F").save(tmp_path / "f.tif")
    assert "floating-point" in _read_error(tmp_path / "f.tif")
    Image.fromarray(np.full((4, 4), 70000, np.int32), "I").save(tmp_path / "i.tif")
    assert "outside 0..65535" in _read_error(tmp_path / "i.tif")


# ------------------------------------------------------------------------------------------ the pixel cap


def test_a_header_claiming_100000x100000_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(imagefiles.png_claiming(100_000, 100_000))
    assert path.stat().st_size < 200
    assert io.image_size(path) == (100_000, 100_000)  # from the header alone
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would raise here, and fail the match
        t0 = time.perf_counter()
        msg = _read_error(path)
        seconds = time.perf_counter() - t0
    assert msg.startswith(f"{path}: its header says 100000x100000 = 10000000000 pixels, more than ddfm-fast's cap "
                          "of 64000000 (64 MP); nothing was decoded"), msg
    assert io.MAX_PIXELS_ENV in msg
    # Measured 7 ms here (a header parse); decoding would allocate 30 GB. 1 s leaves room for a loaded machine.
    assert seconds < 1.0
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's own limit is restored


def test_the_cap_comes_from_the_argument_then_the_environment(data_dir, monkeypatch):
    path = data_dir / MSRS_IR  # 640x480 = 307200 pixels
    assert io.pixel_cap() == io.DEFAULT_MAX_PIXELS == 64_000_000
    monkeypatch.setenv(io.MAX_PIXELS_ENV, "300000")
    assert "640x480 = 307200 pixels, more than ddfm-fast's cap of 300000 (0.3 MP)" in _read_error(path)
    assert io.read_gray(path, max_pixels=307_200).shape == (480, 640)  # the argument wins; the cap is inclusive
    monkeypatch.setenv(io.MAX_PIXELS_ENV, "1_000_000")
    assert io.read_gray(path).shape == (480, 640)
    for bad in ("lots", "-5", "0", "1e9"):
        monkeypatch.setenv(io.MAX_PIXELS_ENV, bad)
        with pytest.raises(ValueError, match=f"{io.MAX_PIXELS_ENV}='{bad}' is not a whole number"):
            io.read_gray(path)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_pixels must be"):
            io.pixel_cap(bad)


def test_a_cap_above_pillows_own_limit_is_honoured_without_its_warning(tmp_path):
    # 12000x12000 = 144 MP is in Pillow's warning band (89..179 MP), 20000x20000 above its error limit. With the
    # cap raised the decode is attempted; these TIFFs hold one pixel, so it fails as truncated, not as a bomb.
    for side in (12_000, 20_000):
        path = tmp_path / f"big{side}.tif"
        path.write_bytes(imagefiles.tiff16(np.zeros((1, 1, 3), np.uint16), size=(side, side)))
        assert io.image_size(path) == (side, side)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            msg = _read_error(path, max_pixels=10**9)
        assert "truncated" in msg and "bomb" not in msg, msg
        assert "cap" in _read_error(path)  # the default cap refuses it from the header


def test_a_pil_image_above_the_cap_is_refused():
    img = Image.new("L", (20, 20))
    with pytest.raises(io.ImageReadError, match=r"ir: its header says 20x20 = 400 pixels, more than .* cap of 100 "):
        io.read_gray(img, name="ir", max_pixels=100)


def test_pair_sizes_are_checked_from_the_headers_before_decoding(data_dir, tmp_path, monkeypatch):
    from ddfm_fast.api import prepare_pair

    big = tmp_path / "big.png"
    big.write_bytes(imagefiles.png_claiming(12_000, 12_000))  # decodes to a truncation error, if it is decoded
    monkeypatch.setenv(io.MAX_PIXELS_ENV, str(10**9))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"differ in size.*12000x12000.*640x480"):
        prepare_pair(big, data_dir / MSRS_VI, "pad")
    assert time.perf_counter() - t0 < 1.0  # measured 0.01 s: two header parses


# ------------------------------------------------------------------------------------------ one frame


@pytest.mark.parametrize(("suffix", "kind"), [(".gif", "an animated GIF"), (".png", "an animated PNG (APNG)"),
                                              (".tif", "a multi-page TIFF"), (".webp", "an animated WebP")])
def test_multi_frame_files_are_refused(tmp_path, suffix, kind):
    frames = [Image.fromarray(np.full((20, 30, 3), v, np.uint8)) for v in (10, 200, 90)]
    path = tmp_path / f"anim{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    msg = _read_error(path)
    assert msg.startswith(f"{path}: {kind} with 3 ") and "save the frame to fuse as its own file" in msg, msg
    frames[0].save(tmp_path / f"one{suffix}")  # one frame in the same format is read
    assert io.read_gray(tmp_path / f"one{suffix}").shape == (20, 30)


def test_a_camera_mpo_reads_its_primary_image(tmp_path):
    primary, preview = (Image.fromarray(np.full((20, 30, 3), v, np.uint8)) for v in (10, 200))
    primary.save(tmp_path / "cam.mpo", save_all=True, append_images=[preview], format="MPO")
    assert Image.open(tmp_path / "cam.mpo").n_frames == 2
    gray = io.read_gray(tmp_path / "cam.mpo")
    assert abs(float(gray.mean()) * 255 - 10) < 2  # JPEG rounding around the primary's value, not the preview's


def test_exif_orientation_is_applied_to_the_header_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "rot.jpg", exif=exif)
    assert io.image_size(tmp_path / "rot.jpg") == (20, 30)
    assert io.read_gray(tmp_path / "rot.jpg").shape == (30, 20)


# ------------------------------------------------------------------------------------------ odd files


def test_every_odd_file_is_a_one_line_error_naming_it(tmp_path, data_dir):
    good = (data_dir / MSRS_IR).read_bytes()
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "half.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "file.png").write_bytes(good)
    cases = {
        "folder.png": "is a folder",
        "fifo.png": "is a named pipe (FIFO)",  # refused from stat: opening it would wait for a writer forever
        "loop.png": "is a symbolic link loop",
        "dangling.png": "is a broken symbolic link",
        "empty.png": "is empty (0 bytes)",
        "text.png": "not in an image format Pillow can read",
        "half.png": "its image data ends early (",
        "missing.png": "no such file",
        "file.png/inner.png": "a part of its path is a file, not a folder",
    }
    for name, problem in cases.items():
        path = tmp_path / name
        msg = _read_error(path)
        assert msg.startswith(f"{path}: {problem}"), msg
        if name != "half.png":  # its header is intact: only the decode finds the truncation
            with pytest.raises(io.ImageReadError, match=re.escape(problem)):
                io.image_size(path)
    assert _read_error("/dev/null").startswith("/dev/null: is a character device")
    assert "NUL character" in _read_error(str(tmp_path / "a\0b.png"))


def test_undecodable_and_control_characters_in_names_stay_on_one_line(tmp_path, data_dir):
    half = (data_dir / MSRS_IR).read_bytes()[:5000]
    raw_dir = os.fsencode(tmp_path)
    for raw, shown in ((b"bad\xff.png", "bad\\xff.png"), (b"new\nline.png", "new\\nline.png")):
        with open(os.path.join(raw_dir, raw), "wb") as fh:
            fh.write(half)
        msg = _read_error(os.fsdecode(os.path.join(raw_dir, raw)))
        assert msg.startswith(f"{tmp_path}/{shown}: its image data ends early"), msg
        msg.encode("utf-8")  # printable to any UTF-8 terminal (a raw surrogate would raise here)
        with open(os.path.join(raw_dir, raw), "wb") as fh:
            fh.write((data_dir / MSRS_IR).read_bytes())
        assert io.read_gray(os.path.join(raw_dir, raw)).shape == (480, 640)  # bytes paths work too


def test_unreadable_and_vanishing_files(tmp_path, data_dir, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes((data_dir / MSRS_IR).read_bytes())
    real_open = os.open
    # Tests run as root in CI, where chmod 000 does not stop a read: the open's answer is what is simulated.
    for err, problem in ((PermissionError(13, "Permission denied"), "permission denied"),
                         (FileNotFoundError(2, "No such file or directory"), "no such file")):
        def fake_open(p, *a, _err=err, **k):
            if os.fspath(p) == str(path):
                raise _err
            return real_open(p, *a, **k)

        monkeypatch.setattr(os, "open", fake_open)
        assert _read_error(path) == f"{path}: {problem}"
        monkeypatch.setattr(os, "open", real_open)


def test_a_file_swapped_for_a_fifo_after_stat_is_still_refused(tmp_path, monkeypatch):
    # The descriptor is checked again after the open, which never blocks: a FIFO put in place between stat and
    # open is refused instead of hanging the reader.
    fifo = tmp_path / "late.png"
    os.mkfifo(fifo)
    real_stat = os.stat

    def stat_says_regular(p, *a, **k):
        return real_stat(__file__) if os.fspath(p) == str(fifo) else real_stat(p, *a, **k)

    monkeypatch.setattr(os, "stat", stat_says_regular)
    assert _read_error(fifo) == f"{fifo}: is a named pipe (FIFO), not a regular file"


def test_arrays_without_pixels_are_refused():
    with pytest.raises(io.ImageReadError, match="without pixels"):
        io.read_gray(np.zeros((0, 5), np.uint8))


# ------------------------------------------------------------------------------------------ writing


def test_atomic_output_gets_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        out = io.save_png(np.zeros((4, 5), np.uint8), tmp_path / "a.png")
    finally:
        os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_read_paths_may_be_path_objects_or_strings(data_dir):
    p = data_dir / MSRS_IR
    np.testing.assert_array_equal(io.read_gray(Path(p)), io.read_gray(str(p)))
