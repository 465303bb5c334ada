"""``ddfm_fast.pairing``: one pairing rule, one role table and one suffix list for every command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddfm_fast import io, train
from ddfm_fast.pairing import ROLES, InputError, Pair, pair_by_stem, pair_sources, roles

# Pillow mode and format per suffix: what a file of that suffix usually holds.
_WRITE = {".png": "L", ".jpg": "RGB", ".jpeg": "RGB", ".bmp": "RGB", ".tif": "L", ".tiff": "RGB", ".webp": "RGB",
          ".ppm": "RGB", ".pgm": "L", ".pnm": "RGB", ".gif": "L"}


def _image(path: Path, mode: str = "L", size: tuple[int, int] = (9, 7)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) * 3 % 256).astype(np.uint8)
    img = Image.fromarray(ramp)
    (img if mode == "L" else img.convert(mode)).save(path)
    return path


def test_one_suffix_list_that_io_reads(tmp_path: Path) -> None:
    assert set(_WRITE) == set(io.IMAGE_SUFFIXES)
    assert train.IMAGE_SUFFIXES is io.IMAGE_SUFFIXES  # train-prior finds the same files as fuse and eval
    for suffix, mode in _WRITE.items():
        _image(tmp_path / "ir" / f"a{suffix[1:]}{suffix}", mode)
        _image(tmp_path / "vis" / f"a{suffix[1:]}{suffix.upper()}", mode)  # suffixes match case-insensitively
    pairing = pair_sources(tmp_path / "ir", tmp_path / "vis")
    assert len(pairing.pairs) == len(io.IMAGE_SUFFIXES) and not pairing.unmatched
    for pair in pairing.pairs:
        assert io.read_gray(pair.ir).shape == io.read_gray(pair.vis).shape == (7, 9)


def test_pair_by_stem_reports_what_does_not_pair(tmp_path: Path) -> None:
    ir, vis = tmp_path / "ir", tmp_path / "vis"
    for stem in ("a", "b", "only_ir"):
        _image(ir / f"{stem}.png")
    _image(vis / "a.jpg", "RGB")  # another extension pairs
    _image(vis / "b.png")
    _image(vis / "b.bmp", "RGB")  # b is ambiguous on the visible side
    _image(vis / "only_vis.png")
    (vis / "notes.txt").write_text("not an image")
    (vis / ".hidden.png").write_bytes(b"")  # hidden files (our .part files too) are not looked at
    (vis / "sub").mkdir()
    pairing = pair_sources(ir, vis)
    assert [(p.stem, p.ir.name, p.vis.name) for p in pairing.pairs] == [("a", "a.png", "a.jpg")]
    assert [u.stem for u in pairing.ambiguous] == ["b"]
    assert "2 visible files share the stem 'b' (b.bmp, b.png); keep one of them" in pairing.ambiguous[0].reason
    assert pairing.unpaired == [
        {"file": str(ir / "only_ir.png"), "reason": f"no visible file only_ir.* in {vis}"},
        {"file": str(vis / "only_vis.png"), "reason": f"no infrared file only_vis.* in {ir}"},
    ]
    assert pairing.ignored == [vis / "notes.txt"]
    assert [p.stem for p in pairing.limit(1).pairs] == ["a"] and pairing.limit(5) is pairing
    with pytest.raises(ValueError):
        pairing.limit(0)


def test_driver_folder_and_folder_errors(tmp_path: Path) -> None:
    fused, a = tmp_path / "fused", tmp_path / "a"
    _image(fused / "x.png")
    _image(a / "x.png")
    _image(a / "y.png")
    pairing = pair_by_stem({"fused": fused, "A": a}, driver="fused")
    assert [p.stem for p in pairing.pairs] == ["x"] and pairing.undriven == ["y"] and not pairing.unmatched
    assert pairing.pairs[0].files == {"fused": fused / "x.png", "A": a / "x.png"}
    with pytest.raises(InputError, match=f"A folder {tmp_path / 'nope'}: no such folder"):
        pair_by_stem({"fused": fused, "A": tmp_path / "nope"})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("")
    with pytest.raises(InputError, match="holds no images"):
        pair_by_stem({"fused": fused, "A": tmp_path / "empty"})
    with pytest.raises(InputError, match="not a folder"):
        pair_by_stem({"fused": fused / "x.png"})


def test_one_role_table() -> None:
    ivf, mif = roles("ivf"), roles("mif")
    assert (ivf.ir, ivf.vis, ivf.ir_name, ivf.vis_name, ivf.color_side) == ("ir", "vis", "infrared", "visible", "vis")
    assert (mif.ir, mif.vis, mif.ir_name, mif.vis_name, mif.color_side) == ("func", "mri", "functional", "MRI", "ir")
    assert mif.ir_folders == ("CT", "PET", "SPECT") and mif.vis_folders == ("MRI",) and ivf.vis_folders == ("vi", "vis")
    assert set(ROLES) == {"ivf", "mif"}
    with pytest.raises(ValueError, match="mode must be one of ivf, mif"):
        roles("xyz")
    assert Pair.of(Path("d/ir.png"), Path("e/vis.png")).stem == "ir"
