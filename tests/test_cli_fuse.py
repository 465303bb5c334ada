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

from ddfm_fast import io, runner
from ddfm_fast.cli import main
from ddfm_fast.pairing import Pair
from ddfm_fast.summary import SUMMARY_NAME

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
    assert names == ["diffusion.gif", "progress_strip.png", "x0_0000.png", "x0_0001.png", "x0_0002.png",
                     "x_0000.png", "x_0001.png", "x_0002.png"]
    assert Image.open(prog / "x_0002.png").size == (W, H) and Image.open(prog / "x0_0002.png").size == (W, H)
    gif = Image.open(prog / "diffusion.gif")
    assert gif.n_frames == 3 and gif.width == W and gif.height > H  # each frame under its step label
    # The last step's x_{t-1} is x0' itself (alpha_bar_prev = 1 at idx 0): the truncated min-max of the final
    # luminance, which the output rounds instead of truncating (at most 1 grey level apart).
    last = gray(prog / "x_0000.png").astype(int)
    np.testing.assert_array_equal(last, gray(prog / "x0_0000.png"))
    assert np.abs(last - gray(outputs["gray"]).astype(int)).max() <= 1
    # Before the last step x_{t-1} (noisier) and x0' differ.
    assert not np.array_equal(gray(prog / "x_0002.png"), gray(prog / "x0_0002.png"))


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
    item = runner.read_pair(Pair.of(ir, vis), runner.RunConfig(resize="ir", output="color"))
    assert item.prepared.out_hw == (H, W) and item.color_source.shape == (H, W, 3)
    assert item.prepared.anchor.shape == item.prepared.partner.shape == (1, 1, 64, 64)  # padded to /32
    assert item.prepared.anchor.min() >= -1 and item.prepared.anchor.max() <= 1
    assert item.resized == f"vis {W + 6}x{H + 4} -> {W}x{H}"


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
    return json.loads((out / SUMMARY_NAME).read_text())


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
    item = runner.read_pair(Pair.of(ir_dir / "rot.jpg", vis_dir / "rot.png"), runner.RunConfig())
    assert item.prepared.out_hw == (W, H)


def test_interrupted_run_still_writes_its_summary(tmp_path: Path, folders, model_args, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "fuse_batch", interrupt)
    ir_dir, vis_dir = folders
    out = tmp_path / "out"
    res = run(["--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(out), *model_args])
    assert res.exit_code == 130 and "rerun the same command to resume" in res.output  # 128 + SIGINT
    assert [p.name for p in out.iterdir()] == [SUMMARY_NAME]
    s = _summary(out)
    assert s["complete"] is False and s["counts"]["done"] == 0 and s["finished"]


def test_folder_run_reports_bad_pairs_resumes_and_batches(tmp_path: Path, folders, model_args) -> None:
    ir_dir, vis_dir = folders
    out = tmp_path / "out"
    args = ["--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(out), *model_args]
    res = run(args)
    assert res.exit_code == 3, res.output  # some pairs failed
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", SUMMARY_NAME]
    assert all(Image.open(out / f"{s}.png").size == (W, H) for s in "ab")
    s = _summary(out)
    assert s["complete"] and s["counts"] == {"pairs": 4, "done": 2, "skipped": 0, "failed": 2, "pending": 0,
                                             "unpaired": 2, "ignored": 1, "outputs": 2}
    assert [d["stem"] for d in s["done"]] == ["a", "b"] and s["done"][0]["size"] == [W, H]
    failed = {f["stem"]: f["reason"] for f in s["failed"]}
    assert failed["c"].startswith(f"{ir_dir / 'c.png'}: ")  # io names the unreadable file, then why
    assert f"{W}x{H}" in failed["d"] and f"{W + 32}x{H}" in failed["d"]
    assert sorted(Path(u["file"]).name for u in s["unpaired"]) == ["only_ir.png", "only_vis.jpg"]
    assert s["settings"]["sampler"]["seed"] == 3407 and s["settings"]["num_steps"] == 3
    assert s["settings"]["sampler"]["steps"] == 3 and s["settings"]["sampler"]["size_policy"] == "pad"
    assert s["inputs"] == {"ir": str(ir_dir), "vis": str(vis_dir)}
    assert s["plan"]["backend"] == "torch" and s["plan"]["dtype"] == "fp32" and s["plan"]["fallbacks"] == []
    assert s["versions"]["torch"] and s["timing"]["images_per_s"] > 0
    assert "c:" in res.output and "only_ir.png" in res.output
    assert "2 fused, 0 skipped (output exists), 2 failed, 2 unpaired file(s); " in res.output
    assert f"images/s; summary: {out / SUMMARY_NAME}" in res.output

    # Resume: existing outputs are skipped (files untouched); the bad pairs are retried and fail again.
    single = {k: gray(out / f"{k}.png") for k in "ab"}
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    res = run(args)
    assert res.exit_code == 3
    s = _summary(out)
    assert s["counts"]["done"] == 0 and [k["stem"] for k in s["skipped"]] == ["a", "b"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    # Other output-affecting settings on resume: refused, naming the setting, with nothing touched.
    summary_before = (out / SUMMARY_NAME).read_bytes()
    res = run([*args, "--seed", "1"])
    assert res.exit_code == 1 and "seed 3407 -> 1" in res.output and "--overwrite" in res.output
    assert (out / SUMMARY_NAME).read_bytes() == summary_before
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before

    # --overwrite redoes them; --batch-size 2 fuses a and b together (same size) with one EM tau per image,
    # so the result equals the single runs up to float rounding (here: at most 1 grey level after the stretch).
    res = run([*args, "--overwrite", "--batch-size", "2"])
    assert res.exit_code == 3
    s = _summary(out)
    assert [d["stem"] for d in s["done"]] == ["a", "b"] and not s["skipped"] and s["settings"]["run"]["batch_size"] == 2
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
    assert res.exit_code == 1 and "No space left" in res.output and "Traceback" not in res.output  # one line
    assert list((tmp_path / "single").iterdir()) == []

    ir_dir, vis_dir = folders
    for name in ("b.png", "c.png", "d.png"):
        (ir_dir / name).unlink()  # one pair is enough here
    res = run(["--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(tmp_path / "out"), *model_args])
    assert res.exit_code == 3
    assert [p.name for p in (tmp_path / "out").iterdir()] == [SUMMARY_NAME]  # no image, no .part file
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
    assert s["settings"]["run"]["mode"] == "mif" and s["inputs"] == {"func": str(pet), "mri": str(mri)}
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
    out = tmp_path / ("o.npy" if "npy" in flags else "o.png")  # raw npy output is written as .npy
    res = run([*map(str, one_pair), "-o", str(out), "--paper", *flags, *model_args])
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
    assert res.exit_code == 0 and "ddfm-shrink" in res.output and "adm256-uncond" in res.output
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
    from ddfm_fast.config import AccelConfig
    from ddfm_fast.plan import plan

    res = run([], command="info")
    assert res.exit_code == 0, res.output
    assert "torch:" in res.output and "adm256-uncond" in res.output
    # Per device, the plan of a default run and of --fast, each with the reasons a faster path is not taken.
    assert f"    default: {plan('cpu', AccelConfig()).describe()}" in res.output
    assert f"    --fast:  {plan('cpu', AccelConfig.fast()).describe()}" in res.output
    assert "compile: not picked on a CPU" in res.output  # --fast on a CPU says why it stays eager
    rep = json.loads(run(["--json"], command="info").output)
    assert rep["devices"][0]["device"] == "cpu" and rep["presets"][0]["name"] == "adm256-uncond"
    assert rep["devices"][0]["plan"]["fast"] == plan("cpu", AccelConfig.fast()).to_dict()
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
    assert res.exit_code == 2 and "--tv-threshold is only used with --tv-prox soft" in res.output
    res = run([ir, vis, "-o", str(tmp_path / "soft.png"), "--tv-prox", "soft", "--tv-threshold", "0.01",
               "--backend", "torch", *model_args, "--steps", "2"])
    assert res.exit_code == 0, res.output
    res = run([ir, vis, "-o", str(tmp_path / "bf16.png"), "--dtype", "bf16", "--backend", "torch", *model_args,
               "--steps", "2"])
    assert res.exit_code == 0, res.output
    res = run([ir, vis, "-o", str(tmp_path / "x.png"), "--paper", "--prior", "none"])
    assert res.exit_code == 2 and "--prior none" in res.output
    res = run([ir, vis, "-o", str(tmp_path / "x.png"), "--prior", "none", "--save-progress"])
    assert res.exit_code == 2 and "--save-progress" in res.output and not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------------- progress images


def test_save_progress_writes_what_the_official_record_writes(tmp_path: Path, msrs, model_args, reference_dir) -> None:
    """--save-progress's x_<idx>.png are the official p_sample_loop(record=True) images (ddfm_fast.compat), pixel
    for pixel: Y of x_{t-1}, min-max, truncated. A 64x64 crop under --size-policy crop is what the official driver
    feeds the sampler, and --tau-reduce batch is its EM reduction, so both runs compute the same floats."""

    from ddfm_fast import api
    from ddfm_fast.checkpoint import load_model
    from ddfm_fast.compat import create_sampler

    ir = crop(msrs[0], tmp_path / "ir.png", 300, 200, size=(64, 64))
    vis = crop(msrs[1], tmp_path / "vis.png", 300, 200, size=(64, 64))
    prog = tmp_path / "prog"
    res = run([str(ir), str(vis), "-o", str(tmp_path / "o.png"), "--save-progress", "--progress-dir", str(prog),
               "--size-policy", "crop", "--tau-reduce", "batch", *model_args])
    assert res.exit_code == 0, res.output
    pair = api.prepare_pair(ir, vis, "crop")
    model = load_model(reference_dir / "tiny_unet.pt", config=reference_dir / "tiny_unet_config.json")
    official = create_sampler(timestep_respacing=3, backend="torch")
    official.p_sample_loop(model=model, x_start=api.initial_noise((1, 3, 64, 64), 3407), record=True,
                           I=pair.anchor, V=pair.partner, save_root=tmp_path / "official", img_index="0",
                           lamb=0.5, rho=0.001)
    for idx in range(3):
        ours = gray(prog / f"x_{idx:04d}.png")
        np.testing.assert_array_equal(ours, gray(tmp_path / f"official/progress/0/x_{idx:04d}.png"))


# --------------------------------------------------------------------------------------------------- resume


RESUME_BASE = {"--steps": "1", "--tv-prox": "soft", "--tv-threshold": "0.05"}


def _flags(model_args: list[str], changes: dict) -> list[str]:
    """model_args with RESUME_BASE on top and ``changes`` on top of that (None removes a flag, True adds a switch)."""
    merged: dict = {}
    it = iter(model_args)
    for name in it:
        merged[name] = True if name.startswith("--no-") else next(it)
    merged.update(RESUME_BASE)
    merged.update(changes)
    args: list[str] = []
    for name, value in merged.items():
        if value is None:
            continue
        args += [name] if value is True else [name, value]
    return args


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, data_dir: Path, model_args) -> dict:
    """A finished folder run of one 40x36 pair (large enough for --size-policy crop), soft TV, 1 step."""
    root = tmp_path_factory.mktemp("resume")
    crop(data_dir / MSRS[0], root / "ir/p.png", 100, 100, size=(40, 36))
    crop(data_dir / MSRS[1], root / "vis/p.png", 100, 100, size=(40, 36))
    folders = ["--ir-dir", str(root / "ir"), "--vis-dir", str(root / "vis")]
    res = run([*folders, "-o", str(root / "out"), *_flags(model_args, {})])
    assert res.exit_code == 0, res.output
    return {"root": root, "folders": folders}


@pytest.mark.parametrize("named, changes", [
    ("prior", {"--prior": "none", "--checkpoint": None, "--model-config": None}),
    ("tv_prox", {"--tv-prox": None, "--tv-threshold": None}),
    ("tv_threshold", {"--tv-threshold": "0.1"}),
    ("steps", {"--steps": "2"}),
    ("seed", {"--seed": "1"}),
    ("lamb", {"--lamb": "0.25"}),
    ("rho", {"--rho": "0.002"}),
    ("tau_reduce", {"--tau-reduce": "batch"}),
    ("clip", {"--no-clip": True}),
    ("train_timesteps", {"--train-timesteps": "500"}),
    ("checkpoint", {"--checkpoint": None, "--model-config": None}),  # the shipped prior instead
    ("size_policy", {"--size-policy": "crop"}),
    ("output", {"--raw": True}),
    ("resize", {"--resize-to-ir": True}),
    ("unet_dtype", {"--dtype": "bf16"}),
])
def test_resume_refuses_outputs_of_other_settings(tmp_path: Path, resumable, model_args, named, changes) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(resumable["root"] / "out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = run([*resumable["folders"], "-o", str(out), *_flags(model_args, changes)])
    assert res.exit_code == 1, res.output
    error = res.output.strip().splitlines()[-1]
    assert error.startswith("Error: ") and f"{named} " in error and "--overwrite" in error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    # --overwrite redoes the pair with the new settings.
    res = run([*resumable["folders"], "-o", str(out), *_flags(model_args, changes), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert _summary(out)["counts"]["done"] == 1


def test_resume_keeps_outputs_when_only_speed_settings_change(tmp_path: Path, resumable, model_args) -> None:
    """Batch size, backend, compile, channels_last and --fast change float rounding only: the output is kept."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(resumable["root"] / "out", out)
    output = (out / "p.png").read_bytes()
    res = run([*resumable["folders"], "-o", str(out), *_flags(model_args, {}), "--batch-size", "2", "--compile",
               "--compile-backend", "eager", "--channels-last", "--fast"])
    assert res.exit_code == 0, res.output
    s = _summary(out)
    assert s["counts"]["skipped"] == 1 and s["counts"]["done"] == 0 and (out / "p.png").read_bytes() == output
    assert s["settings"]["accel"]["compile"] is True and s["settings"]["run"]["batch_size"] == 2


def test_resume_without_a_summary_refuses_to_count_outputs_as_done(tmp_path: Path, resumable, model_args) -> None:
    """An output that no record vouches for is neither counted as done nor replaced: its pair fails, naming it."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(resumable["root"] / "out", out)
    (out / SUMMARY_NAME).unlink()
    before = (out / "p.png").read_bytes()
    res = run([*resumable["folders"], "-o", str(out), *_flags(model_args, {"--seed": "1"})])
    assert res.exit_code == 3, res.output
    assert f"output {out / 'p.png'} exists, but no record" in res.output and "--overwrite" in res.output
    s = _summary(out)
    assert s["counts"]["skipped"] == 0 and s["counts"]["done"] == 0 and (out / "p.png").read_bytes() == before
    res = run([*resumable["folders"], "-o", str(out), *_flags(model_args, {"--seed": "1"}), "--overwrite"])
    assert res.exit_code == 0 and _summary(out)["counts"]["done"] == 1


# --------------------------------------------------------------------------------------------------- plan, compile, TV


@pytest.mark.slow  # ten Dynamo traces of the tiny step: about a minute on a loaded 2-core CPU
def test_compiled_folder_of_ten_sizes_keeps_compile_on(tmp_path: Path, msrs, model_args) -> None:
    """Ten pairs of ten model sizes under --compile (the eager backend: Dynamo tracing without code generation)
    finish with compile on and no fallback: each size compiles its own step, so Dynamo's recompile limit (8 per
    code object) is never reached."""
    sizes = [(w, h) for w in (30, 60, 90, 104) for h in (30, 60, 90)][:10]  # padded: 10 distinct model sizes
    for k, (w, h) in enumerate(sizes):
        crop(msrs[0], tmp_path / f"ir/p{k}.png", 5 * k, 7 * k, size=(w, h))
        crop(msrs[1], tmp_path / f"vis/p{k}.png", 5 * k, 7 * k, size=(w, h))
    assert len({(-(-w // 32), -(-h // 32)) for w, h in sizes}) == 10
    out = tmp_path / "out"
    res = run(["--ir-dir", str(tmp_path / "ir"), "--vis-dir", str(tmp_path / "vis"), "-o", str(out),
               *_flags(model_args, {"--tv-prox": None, "--tv-threshold": None}), "--compile",
               "--compile-backend", "eager"])
    assert res.exit_code == 0, res.output
    s = _summary(out)
    assert s["counts"]["done"] == 10
    assert s["plan"]["compile"] is True and s["plan"]["compile_backend"] == "eager" and s["plan"]["fallbacks"] == []
    assert "fell back" not in res.output and res.output.count("plan: ") == 1


def test_plan_is_printed_once_and_a_bad_backend_is_one_line(tmp_path: Path, one_pair, model_args, monkeypatch) -> None:
    ir, vis = map(str, one_pair)
    res = run([ir, vis, "-o", str(tmp_path / "o.png"), *model_args])
    assert res.exit_code == 0, res.output
    assert res.output.count("plan: cpu: torch tail, fp32, eager") == 1
    monkeypatch.setenv("DDFM_FAST_BACKEND", "bogus")
    res = run([ir, vis, "-o", str(tmp_path / "p.png"), *model_args])
    assert res.exit_code == 1 and res.output.strip() == (
        "Error: DDFM_FAST_BACKEND='bogus' is not a backend; choose one of auto, torch, triton")


def test_em_only_soft_tv_is_not_the_shrink(tmp_path: Path, one_pair) -> None:
    """--prior none passes the TV options to the EM iterations: the soft threshold gives other floats than the
    official shrink. The TV sub-problem enters F with the weight rho = 0.001, so they differ by ~1e-5 (1.8e-5 on
    an MSRS crop), far above float32 rounding of values below 1 (~1e-7), which the 1e-6 bound separates."""
    import ddfm_fast

    ir, vis = map(str, one_pair)
    outs = {}
    for name, flags in (("shrink", []), ("soft", ["--tv-prox", "soft", "--tv-threshold", "0.01"])):
        outs[name] = tmp_path / f"{name}.npy"
        res = run([ir, vis, "-o", str(outs[name]), "--prior", "none", "--steps", "3", "--raw-format", "npy", *flags])
        assert res.exit_code == 0, res.output
    shrink, soft = np.load(outs["shrink"]), np.load(outs["soft"])
    assert np.abs(soft - shrink).max() > 1e-6
    api = ddfm_fast.fuse(ir, vis, prior="none", steps=3, tv_prox="soft", tv_threshold=0.01, device="cpu")
    np.testing.assert_array_equal(soft, io.luma_to_unit(api.luma))  # the CLI computes what the API computes
