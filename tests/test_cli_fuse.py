"""``ddfm-fast fuse`` and ``ddfm-fast info`` end to end, with the tiny random-weight UNet and 3 steps.

Inputs are small crops (90x70: not a multiple of 32, so padding and cropping both act) of real pairs from
``shared/data``. The tiny model has random weights: these tests check plumbing (roles, sizes, formats, resume,
errors, atomic writes), not image quality; the numerics are tested against the official goldens elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddfm_fast import batch, io
from ddfm_fast.cli import main

W, H = 45, 35  # crop size (width x height): padded to 64x64 for the model, cropped to 32x32 by --size-policy crop
CROP_HW = (32, 32)


@pytest.fixture(scope="module")
def model_args(reference_dir: Path) -> list[str]:
    return ["--checkpoint", str(reference_dir / "tiny_unet.pt"),
            "--model-config", str(reference_dir / "tiny_unet_config.json"),
            "--steps", "3", "--no-progress-bar",
            # conftest sets TRITON_INTERPRET=1, under which `auto` may pick the (slow) interpreted Triton tail.
            "--backend", "torch"]


def run(args: list[str], command: str = "fuse"):
    return CliRunner().invoke(main, [command, *args])


def crop(src: Path, dest: Path, x: int = 0, y: int = 0, size: tuple[int, int] = (W, H)) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src).crop((x, y, x + size[0], y + size[1])).save(dest)
    return dest


MSRS = ("ivf/MSRS/ir/00055D.png", "ivf/MSRS/vi/00055D.png")  # gray infrared, colour visible, 640x480


@pytest.fixture
def msrs(data_dir: Path) -> tuple[Path, Path]:
    return data_dir / MSRS[0], data_dir / MSRS[1]


@pytest.fixture
def one_pair(tmp_path: Path, msrs) -> tuple[Path, Path]:
    """A colour visible image (JPEG) and a gray infrared image (PNG) of 45x35."""
    return crop(msrs[0], tmp_path / "in/ir.png", 200, 200), crop(msrs[1], tmp_path / "in/vis.jpg", 200, 200)


def gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, data_dir: Path, model_args) -> dict[str, Path]:
    """One pair fused four ways: official gray (with --save-progress), --color, --raw png16, --raw npy."""
    root = tmp_path_factory.mktemp("single")
    ir = crop(data_dir / MSRS[0], root / "in/ir.png", 200, 200)
    vis = crop(data_dir / MSRS[1], root / "in/vis.jpg", 200, 200)
    (root / "out").mkdir()
    (root / "out/gray.png").write_bytes(b"old")  # a single pair replaces OUT
    runs = {
        "gray": ["-o", str(root / "out/gray.png"), "--save-progress"],
        "color": ["-o", str(root / "out/color.png"), "--color"],
        "png16": ["-o", str(root / "out/raw.png"), "--raw"],
        "npy": ["-o", str(root / "out/raw.npy"), "--raw-format", "npy"],  # implies --raw
    }
    paths = {"root": root, "ir": ir, "vis": vis}
    for key, args in runs.items():
        res = run([str(ir), str(vis), *args, *model_args])
        assert res.exit_code == 0, res.output
        paths[key] = Path(args[1])
    return paths


# --------------------------------------------------------------------------------------------------- one pair


def test_one_pair_pad_keeps_size(outputs) -> None:
    img = Image.open(outputs["gray"])
    assert img.mode == "L" and img.size == (W, H)
    assert sorted(p.name for p in (outputs["root"] / "out").iterdir()) == [
        "color.png", "gray.png", "gray_progress", "raw.npy", "raw.png"]


def test_color_output_keeps_the_fused_luminance(outputs) -> None:
    g = gray(outputs["gray"]).astype(np.float64)
    c_img = Image.open(outputs["color"])
    assert c_img.mode == "RGB" and c_img.size == (W, H)
    c = np.asarray(c_img, dtype=np.float64)
    y = c @ np.array([0.299, 0.587, 0.114])
    # Each channel is rounded (|err| <= 0.5, weights sum to 1); clipping to 0..255 may move saturated pixels.
    unclipped = ((c > 0) & (c < 255)).all(axis=-1)
    assert unclipped.mean() > 0.8
    assert np.abs(y - g)[unclipped].max() <= 0.5 + 1e-9
    assert io.has_chroma(c.astype(np.uint8))  # the visible crop is in colour
    # The chroma is the visible image's (Cb, Cr unchanged up to rounding where nothing was clipped).
    src = io.rgb_to_ycbcr_full(np.asarray(Image.open(outputs["vis"]).convert("RGB")))
    out = io.rgb_to_ycbcr_full(c)
    assert np.abs(out[..., 1:] - src[..., 1:])[unclipped].max() <= 1.0


def test_raw_outputs(outputs) -> None:
    png16 = Image.open(outputs["png16"])
    assert png16.mode.startswith("I;16") and png16.size == (W, H)
    v = np.asarray(png16).astype(np.float64)
    unit = np.load(outputs["npy"])
    assert unit.dtype == np.float32 and unit.shape == (H, W)
    # The documented 16-bit scaling: v = round(clip((Y + 1) / 2, 0, 1) * 65535) with (Y + 1) / 2 as in the npy.
    np.testing.assert_array_equal(v, np.rint(np.clip(unit.astype(np.float64), 0, 1) * 65535))
    assert np.unique(v).size > 256  # 16-bit precision is used, not 8-bit values
    # The official 8-bit output is the min-max stretch of the same luminance (affine: rounding differences only).
    stretched = io.to_uint8_official(io.minmax_0_255(unit))
    assert np.abs(stretched.astype(int) - gray(outputs["gray"]).astype(int)).max() <= 1


def test_save_progress_one_pair(outputs) -> None:
    prog = outputs["gray"].parent / "gray_progress"
    names = sorted(p.name for p in prog.iterdir())
    assert names == ["diffusion.gif", "x_0000.png", "x_0001.png", "x_0002.png"]
    assert Image.open(prog / "x_0002.png").size == (W, H)
    gif = Image.open(prog / "diffusion.gif")
    assert gif.n_frames == 3 and gif.size == (W, H)
    # The last step's image is the truncated min-max of the final luminance (official record=True).
    last = gray(prog / "x_0000.png").astype(int)
    assert np.abs(last - gray(outputs["gray"]).astype(int)).max() <= 1


def test_raw_output_suffix_is_checked(outputs, model_args) -> None:
    res = run([str(outputs["ir"]), str(outputs["vis"]), "-o", str(outputs["root"] / "r2.png"),
               "--raw-format", "npy", *model_args])
    assert res.exit_code == 2 and ".npy" in res.output


def test_size_mismatch_and_resize(tmp_path: Path, msrs, model_args) -> None:
    ir = crop(msrs[0], tmp_path / "ir.png", size=(W, H))
    vis = crop(msrs[1], tmp_path / "vis.png", size=(W + 6, H + 4))
    res = run([str(ir), str(vis), "-o", str(tmp_path / "o.png"), *model_args])
    assert res.exit_code == 1
    assert f"{W}x{H}" in res.output and f"{W + 6}x{H + 4}" in res.output and "--resize-to-ir" in res.output
    assert not (tmp_path / "o.png").exists()
    res = run([str(ir), str(vis), "-o", str(tmp_path / "o.png"), "--resize-to-vis", *model_args])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "o.png").size == (W + 6, H + 4)
    # The other direction, without running the model.
    settings = batch.RunSettings(resize="ir", output="color")
    prepared = batch.prepare(batch.Pair("p", ir, vis), settings)
    assert prepared.vis.shape == prepared.ir.shape == (H, W) and prepared.color_source.shape == (H, W, 3)
    assert prepared.vis.min() >= 0 and prepared.vis.max() <= 1 and prepared.resized == f"vis {W + 6}x{H + 4} -> {W}x{H}"


# --------------------------------------------------------------------------------------------------- folders


@pytest.fixture
def folders(tmp_path: Path, msrs) -> tuple[Path, Path]:
    """ir/ and vis/ with two good pairs (a: 16-bit infrared + palette JPEG-free visible; b: gray + RGBA), a corrupt
    pair (c), a size mismatch (d), an unpaired file on each side, a non-image file and a hidden file."""
    ir_dir, vis_dir = tmp_path / "ir", tmp_path / "vis"
    ir_dir.mkdir()
    vis_dir.mkdir()
    ir8 = np.asarray(Image.open(msrs[0]).convert("L").crop((0, 150, W, 150 + H)), dtype=np.uint16)
    Image.fromarray(ir8 * 257 + np.arange(W, dtype=np.uint16)[None, :] % 200).save(ir_dir / "a.png")  # 16-bit
    vis_a = Image.open(msrs[1]).crop((0, 150, W, 150 + H))
    vis_a.convert("P", palette=Image.Palette.ADAPTIVE).save(vis_dir / "a.bmp")  # palette, other extension
    crop(msrs[0], ir_dir / "b.png", 300, 150)
    Image.open(msrs[1]).crop((300, 150, 300 + W, 150 + H)).convert("RGBA").save(vis_dir / "b.png")
    (ir_dir / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    crop(msrs[1], vis_dir / "c.png")
    crop(msrs[0], ir_dir / "d.png")
    crop(msrs[1], vis_dir / "d.png", size=(W + 32, H))
    crop(msrs[0], ir_dir / "only_ir.png")
    crop(msrs[1], vis_dir / "only_vis.jpg")
    (vis_dir / "notes.txt").write_text("not an image")
    (vis_dir / ".DS_Store").write_bytes(b"")
    return ir_dir, vis_dir


def _summary(out: Path) -> dict:
    return json.loads((out / batch.SUMMARY_NAME).read_text())


def test_folder_inputs_are_read(folders) -> None:
    ir_dir, vis_dir = folders
    assert Image.open(ir_dir / "a.png").mode.startswith("I;16")
    a16 = io.read_gray(ir_dir / "a.png")
    assert np.unique(a16).size > np.unique(np.round(a16 * 255)).size  # 16-bit detail kept
    assert Image.open(vis_dir / "a.bmp").mode == "P" and Image.open(vis_dir / "b.png").mode == "RGBA"
    assert io.read_rgb8(vis_dir / "b.png").shape == (H, W, 3)
    # EXIF orientation 6 (rotate 90 degrees clockwise) is applied: the stored 45x35 image is read as 35x45.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(vis_dir / "c.png").save(ir_dir / "rot.jpg", exif=exif)
    Image.open(vis_dir / "c.png").transpose(Image.Transpose.ROTATE_270).save(vis_dir / "rot.png")
    prepared = batch.prepare(batch.Pair("rot", ir_dir / "rot.jpg", vis_dir / "rot.png"), batch.RunSettings())
    assert prepared.ir.shape == prepared.vis.shape == (W, H)


def test_interrupted_run_still_writes_its_summary(tmp_path: Path, folders, model_args, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "fuse_prepared", interrupt)
    ir_dir, vis_dir = folders
    out = tmp_path / "out"
    res = run(["--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(out), *model_args])
    assert res.exit_code != 0 and "Aborted" in res.output
    assert [p.name for p in out.iterdir()] == [batch.SUMMARY_NAME]
    s = _summary(out)
    assert s["complete"] is False and s["counts"]["done"] == 0 and s["finished"]


def test_folder_run_reports_bad_pairs_resumes_and_batches(tmp_path: Path, folders, model_args) -> None:
    ir_dir, vis_dir = folders
    out = tmp_path / "out"
    args = ["--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(out), *model_args]
    res = run(args)
    assert res.exit_code == 3, res.output  # some pairs failed
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", batch.SUMMARY_NAME]
    assert all(Image.open(out / f"{s}.png").size == (W, H) for s in "ab")
    s = _summary(out)
    assert s["complete"] and s["counts"] == {"pairs": 4, "done": 2, "skipped": 0, "failed": 2, "unpaired": 2,
                                             "ignored": 1}
    assert [d["stem"] for d in s["done"]] == ["a", "b"] and s["done"][0]["size"] == [W, H]
    failed = {f["stem"]: f["reason"] for f in s["failed"]}
    assert str(ir_dir / "c.png") in failed["c"] and "cannot be read" in failed["c"]
    assert f"{W}x{H}" in failed["d"] and f"{W + 32}x{H}" in failed["d"]
    assert sorted(Path(u["file"]).name for u in s["unpaired"]) == ["only_ir.png", "only_vis.jpg"]
    assert s["settings"]["seed"] == 3407 and s["settings"]["num_steps"] == 3
    assert s["settings"]["size_policy"] == "pad" and s["inputs"] == {"ir": str(ir_dir), "vis": str(vis_dir)}
    assert s["versions"]["torch"] and s["timing"]["images_per_s"] > 0
    assert "c:" in res.output and "only_ir.png" in res.output
    assert "2 fused, 0 skipped (output exists), 2 failed, 2 unpaired file(s); " in res.output
    assert f"images/s; summary: {out / batch.SUMMARY_NAME}" in res.output

    # Resume: existing outputs are skipped (files untouched); the bad pairs are retried and fail again.
    single = {k: gray(out / f"{k}.png") for k in "ab"}
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    res = run(args)
    assert res.exit_code == 3
    s = _summary(out)
    assert s["counts"]["done"] == 0 and [k["stem"] for k in s["skipped"]] == ["a", "b"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    # Other settings on resume: a warning in the summary and on stderr, outputs kept.
    res = run([*args, "--seed", "1"])
    assert any("seed" in w for w in _summary(out)["warnings"]) and "warning" in res.output

    # --overwrite redoes them; --batch-size 2 fuses a and b together (same size) with one EM tau per image,
    # so the result equals the single runs up to float rounding (here: at most 1 grey level after the stretch).
    res = run([*args, "--overwrite", "--batch-size", "2"])
    assert res.exit_code == 3
    s = _summary(out)
    assert [d["stem"] for d in s["done"]] == ["a", "b"] and not s["skipped"] and s["settings"]["batch_size"] == 2
    for k in "ab":
        assert np.abs(gray(out / f"{k}.png").astype(int) - single[k].astype(int)).max() <= 1


def test_folder_errors(tmp_path: Path, folders, model_args) -> None:
    ir_dir, vis_dir = folders
    res = run(["--ir-dir", str(tmp_path / "nope"), "--vis-dir", str(vis_dir), "-o", str(tmp_path / "o"), *model_args])
    assert res.exit_code == 1 and "nope" in res.output and "no such folder" in res.output
    (tmp_path / "empty").mkdir()
    res = run(["--ir-dir", str(tmp_path / "empty"), "--vis-dir", str(vis_dir), "-o", str(tmp_path / "o"), *model_args])
    assert res.exit_code == 1 and "holds no images" in res.output
    assert not (tmp_path / "o").exists()
    res = run(["--ir-dir", str(ir_dir), "-o", str(tmp_path / "o"), *model_args])
    assert res.exit_code == 2 and "--vis-dir" in res.output
    res = run(["--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(vis_dir), *model_args])
    assert res.exit_code == 2 and "input folder" in res.output
    res = run(["--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(tmp_path / "o"), "--save-progress",
               *model_args])
    assert res.exit_code == 2 and "one pair" in res.output


def test_interrupted_write_leaves_no_partial_file(tmp_path: Path, folders, one_pair, model_args, monkeypatch) -> None:
    def broken_save(self, fp, format=None, **params):  # PIL's signature
        Path(fp).write_bytes(b"\x89PNG half written")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    out = tmp_path / "single" / "out.png"
    res = run([*map(str, one_pair), "-o", str(out), *model_args])
    assert res.exit_code != 0 and isinstance(res.exception, OSError)
    assert list((tmp_path / "single").iterdir()) == []

    ir_dir, vis_dir = folders
    for name in ("b.png", "c.png", "d.png"):
        (ir_dir / name).unlink()  # one pair is enough here
    res = run(["--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(tmp_path / "out"), *model_args])
    assert res.exit_code == 3
    assert [p.name for p in (tmp_path / "out").iterdir()] == [batch.SUMMARY_NAME]  # no image, no .part file
    (failure,) = _summary(tmp_path / "out")["failed"]
    assert failure["stem"] == "a" and "No space left" in failure["reason"]


# --------------------------------------------------------------------------------------------------- medical


def test_mif_folders(tmp_path: Path, data_dir: Path, model_args) -> None:
    mri, pet, ct = tmp_path / "mri", tmp_path / "pet", tmp_path / "ct"
    crop(data_dir / "mif/MRI_PET/MRI/11.png", mri / "11.png", 100, 100)
    crop(data_dir / "mif/MRI_PET/PET/11.png", pet / "11.png", 100, 100)
    # --mri-dir/--func-dir imply --mode mif.
    res = run(["--mri-dir", str(mri), "--func-dir", str(pet), "-o", str(tmp_path / "o"), "--color", *model_args])
    assert res.exit_code == 0, res.output
    s = _summary(tmp_path / "o")
    assert s["settings"]["mode"] == "mif" and s["inputs"] == {"func": str(pet), "mri": str(mri)}
    assert s["done"][0]["func"] == str(pet / "11.png") and s["done"][0]["mri"] == str(mri / "11.png")
    assert io.has_chroma(np.asarray(Image.open(tmp_path / "o/11.png")))  # PET gives the colour

    # MRI-CT: both gray, so the colour output is gray (R = G = B), with a note. Single pair: FUNC first, then MRI.
    crop(data_dir / "mif/MRI_CT/CT/11.png", ct / "11.png", 100, 100)
    out = tmp_path / "ct.png"
    res = run(["--mode", "mif", str(ct / "11.png"), str(mri / "11.png"), "-o", str(out), "--color", *model_args])
    assert res.exit_code == 0, res.output
    assert "gray" in res.output and not io.has_chroma(np.asarray(Image.open(out)))

    res = run(["--mode", "ivf", "--mri-dir", str(mri), "--func-dir", str(pet), "-o", str(tmp_path / "x"),
               *model_args])
    assert res.exit_code == 2 and "--mode mif" in res.output


# --------------------------------------------------------------------------------------------------- flags and errors


@pytest.mark.parametrize("flags, named", [
    (["--size-policy", "pad"], "--size-policy pad"),
    (["--seed", "1"], "--seed 1"),
    (["--color"], "--color"),
    (["--raw-format", "npy"], "--raw"),
    (["--batch-size", "2"], "--batch-size 2"),
])
def test_paper_rejects_contradicting_flags(tmp_path: Path, one_pair, model_args, flags, named) -> None:
    res = run([*map(str, one_pair), "-o", str(tmp_path / "o.png"), "--paper", *flags, *model_args])
    assert res.exit_code == 2 and "--paper" in res.output and named in res.output
    assert not (tmp_path / "o.png").exists()


def test_paper_protocol(tmp_path: Path, one_pair, model_args, monkeypatch) -> None:
    ir, vis = map(str, one_pair)
    # Consistent explicit flags are fine; --paper crops to /32 (the official top-left crop).
    res = run([ir, vis, "-o", str(tmp_path / "p.png"), "--paper", "--size-policy", "crop", "--seed", "3407",
               *model_args])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "p.png").size == (CROP_HW[1], CROP_HW[0])
    # Without --checkpoint, --paper means the paper's prior: a missing file is an error saying where to put it.
    monkeypatch.setenv("DDFM_FAST_HOME", str(tmp_path / "home"))
    res = run([ir, vis, "-o", str(tmp_path / "q.png"), "--paper", "--steps", "3"])
    assert res.exit_code == 1 and "adm256-uncond" in res.output and str(tmp_path / "home") in res.output


def test_checkpoint_errors(tmp_path: Path, one_pair) -> None:
    ir, vis = map(str, one_pair)
    res = run([ir, vis, "-o", str(tmp_path / "default.png"), "--steps", "2"])  # the shipped prior, announced
    assert res.exit_code == 0 and "ddfm-small" in res.output and "adm256-uncond" in res.output
    assert (tmp_path / "default.png").exists()
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"this is not a checkpoint")
    res = run([ir, vis, "-o", str(tmp_path / "o.png"), "--checkpoint", str(bad), "--steps", "3"])
    assert res.exit_code == 1 and str(bad) in res.output
    res = run([ir, vis, "-o", str(tmp_path / "o.png"), "--checkpoint", "no-such-preset"])
    assert res.exit_code == 1 and "no-such-preset" in res.output and "adm256-uncond" in res.output
    assert not (tmp_path / "o.png").exists()


def test_usage_errors(tmp_path: Path, one_pair, model_args) -> None:
    ir, vis = map(str, one_pair)
    res = run([ir, str(tmp_path / "missing.png"), "-o", str(tmp_path / "o.png"), *model_args])
    assert res.exit_code == 1 and "missing.png" in res.output and "no such file" in res.output
    res = run([ir, "-o", str(tmp_path / "o.png"), *model_args])
    assert res.exit_code == 2 and "two images" in res.output
    res = run([ir, vis, "-o", str(tmp_path / "o.png"), "--color", "--raw", *model_args])
    assert res.exit_code == 2 and "--color" in res.output
    res = run([ir, vis, "-o", str(tmp_path / "o.png"), *model_args, "--steps", "ddimx"])
    assert res.exit_code == 2 and "--steps" in res.output
    res = run([ir, vis, "-o", ir, *model_args])
    assert res.exit_code == 2 and "one of the inputs" in res.output
    res = run([ir, vis, "-o", str(tmp_path / "o.png"), "--device", "cuda:7", *model_args])
    assert res.exit_code == 2 and "--device" in res.output


def test_info() -> None:
    res = run([], command="info")
    assert res.exit_code == 0, res.output
    assert "torch:" in res.output and "(requested 'auto')" in res.output and "adm256-uncond" in res.output
    rep = json.loads(run(["--json"], command="info").output)
    assert rep["devices"][0]["device"] == "cpu" and rep["presets"][0]["name"] == "adm256-uncond"
    assert rep["preset_search_dirs"]


def test_help_states_modes_and_roles() -> None:
    text = run(["--help"]).output
    for word in ("--mode", "ivf", "mif", "--mri-dir", "--func-dir", "MRI plays the visible", "ddfm_summary.json"):
        assert word in text


def test_prior_none_tv_prox_and_fast_flags(tmp_path: Path, one_pair, model_args) -> None:
    ir, vis = map(str, one_pair)
    res = run([ir, vis, "-o", str(tmp_path / "em.png"), "--prior", "none", "--steps", "3"])
    assert res.exit_code == 0, res.output
    em = np.asarray(Image.open(tmp_path / "em.png"))
    import ddfm_fast

    expected = ddfm_fast.fuse(ir, vis, prior="none", steps=3, device="cpu").fused
    np.testing.assert_array_equal(em, expected)
    res = run([ir, vis, "-o", str(tmp_path / "x.png"), "--prior", "none", *model_args])
    assert res.exit_code == 2 and "--prior none" in res.output
    res = run([ir, vis, "-o", str(tmp_path / "x.png"), "--tv-prox", "soft", *model_args])
    assert res.exit_code == 2 and "--tv-threshold" in res.output
    res = run([ir, vis, "-o", str(tmp_path / "x.png"), "--tv-threshold", "0.1", *model_args])
    assert res.exit_code == 2 and "only applies" in res.output
    res = run([ir, vis, "-o", str(tmp_path / "soft.png"), "--tv-prox", "soft", "--tv-threshold", "0.01",
               "--backend", "torch", *model_args, "--steps", "2"])
    assert res.exit_code == 0, res.output
    res = run([ir, vis, "-o", str(tmp_path / "bf16.png"), "--dtype", "bf16", "--backend", "torch", *model_args,
               "--steps", "2"])
    assert res.exit_code == 0, res.output
    res = run([ir, vis, "-o", str(tmp_path / "x.png"), "--paper", "--prior", "none"])
    assert res.exit_code == 2 and "--prior none" in res.output
