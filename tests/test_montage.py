"""Pictures: labelled montages (``ddfm_fast.montage``), ``fuse --example`` / ``--montage``, the labelled progress
GIF and strip (``ddfm_fast.progress``), and ``compare --diff-dir``.

Montage pixels are checked where they must be exact: a panel shown at its own height is the image itself, pixel
for pixel, under a dark label band that holds light text pixels. Fusion runs use EM only (``--prior none``, no
model: about a second) or the tiny random-weight UNet on 45x35 crops, as tests/test_cli_fuse.py does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddfm_fast import io
from ddfm_fast.cli import main
from ddfm_fast.montage import BAND, difference_image, label_above, montage_grid, montage_row
from ddfm_fast.progress import PROGRESS_GIF, PROGRESS_STRIP, ProgressRecorder, progress_frame, strip_indices
from ddfm_fast.sampler import StepOutput
from ddfm_fast.samples import example_pair


def _ramp(h: int, w: int, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 3 + y * 5 + seed * 40) % 256).astype(np.uint8)


def _band_height(pic: np.ndarray) -> int:
    """Rows from the top whose every pixel is the band colour or text (the band is BAND-coloured at its edges)."""
    k = 0
    while k < pic.shape[0] and tuple(pic[k, 0]) == BAND:
        k += 1
    return k


def test_montage_row_keeps_each_image_under_its_label():
    a = _ramp(60, 80, 0)
    b = np.stack([_ramp(60, 80, 1), _ramp(60, 80, 2), _ramp(60, 80, 3)], -1)
    pic = np.asarray(montage_row([(a, "infrared: a.png"), (b, "visible: b.png")], height=60))
    band = _band_height(pic)
    assert 10 <= band <= 40
    # At its own height a panel is the image itself (gray shown as R = G = B), then a 4 px gap, then the next.
    np.testing.assert_array_equal(pic[band:, :80, 0], a)
    np.testing.assert_array_equal(pic[band:, :80, 1], a)
    np.testing.assert_array_equal(pic[band:, 84:164], b)
    assert pic.shape == (band + 60, 164, 3)
    # The label band holds text: light pixels on the dark band, in both panels.
    for x0, x1 in ((0, 80), (84, 164)):
        assert (pic[:band, x0:x1].max(axis=-1) > 200).sum() > 20
    # Scaled panels keep their aspect ratio: 60x80 at height 120 is 160 wide.
    assert np.asarray(montage_row([(a, "x")], height=120)).shape[1] == 160


def test_montage_grid_and_label_above():
    rows = [[(_ramp(40, 50, k), f"row {k} A"), (_ramp(40, 30, k + 1), "B")] for k in range(3)]
    grid = np.asarray(montage_grid(rows, height=40, title="three pairs"))
    assert grid.shape[1] == 50 + 4 + 30 and grid.shape[0] > 3 * 40
    framed = np.asarray(label_above(_ramp(40, 50), "step 1/3  t=999"))
    band = framed.shape[0] - 40
    np.testing.assert_array_equal(framed[band:, :, 0], _ramp(40, 50))


def test_difference_image_is_stretched_to_the_largest_difference():
    x = _ramp(30, 40)
    y = x.copy()
    y[5, 7] = np.uint8(int(x[5, 7]) ^ 4)  # one pixel 4 levels off
    y[9, 9] = np.uint8(int(x[9, 9]) ^ 1)  # one pixel 1 level off
    diff, gain = difference_image(x, y)
    d = np.asarray(diff)[..., 0]
    assert gain == 255 / 4 and d[5, 7] == 255 and d[9, 9] == round(255 / 4) and d.sum() == 255 + round(255 / 4)
    same, g = difference_image(x, x)
    assert g == 1 and not np.asarray(same).any()
    with pytest.raises(ValueError, match="size mismatch"):
        difference_image(x, x[:, :30])


# --------------------------------------------------------------------------------------------------- progress


def _fake_steps(n: int, hw: tuple[int, int]) -> list[StepOutput]:
    """``n`` steps as the sampler reports them: j = 0..n-1, idx counting down, a falling timestep."""
    g = torch.Generator().manual_seed(0)
    out = []
    for j in range(n):
        x = torch.rand((1, 3, *hw), generator=g) * 2 - 1
        out.append(StepOutput(j=j, idx=n - 1 - j, timestep=999 - 100 * j, x_prev=x, pred_xstart=x * 0.5, state=None))
    return out


def test_progress_recorder_labels_gif_and_strip_keeps_official_frames(tmp_path: Path):
    hw = (48, 64)
    steps = _fake_steps(10, hw)
    rec = ProgressRecorder(tmp_path / "p", hw)
    for s in steps:
        rec(s)
    folder = rec.finish()
    # The per-step files stay the official unlabelled images.
    for s in steps:
        np.testing.assert_array_equal(np.asarray(Image.open(folder / f"x_{s.idx:04d}.png")),
                                      progress_frame(s.x_prev, hw))
    gif = Image.open(folder / PROGRESS_GIF)
    assert gif.n_frames == 10 and gif.width == 64 and gif.height > 48  # a label band above every frame
    band = gif.height - 48
    for k in (0, 9):
        gif.seek(k)
        frame = np.asarray(gif.convert("L"))
        np.testing.assert_array_equal(frame[band:], progress_frame(steps[k].x_prev, hw))
        assert (frame[:band] > 200).sum() > 20  # text on the band
    gif.seek(0)
    first = np.asarray(gif.convert("L"))[:band]
    gif.seek(9)
    assert not np.array_equal(first, np.asarray(gif.convert("L"))[:band])  # "step 1/10 t=999" vs "step 10/10 t=99"
    strip = Image.open(folder / PROGRESS_STRIP)
    assert strip.width >= 8 * 64  # 8 of the 10 steps, each panel at least 64 px wide (96 px tall, scaled up)
    assert strip_indices(10) == [0, 1, 3, 4, 5, 6, 8, 9] and strip_indices(3) == [0, 1, 2]
    assert strip_indices(100)[0] == 0 and strip_indices(100)[-1] == 99 and len(strip_indices(100)) == 8


# --------------------------------------------------------------------------------------------------- commands


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def test_fuse_example_both_kinds_with_montage(tmp_path: Path):
    for kind in ("ivf", "mif"):
        out = tmp_path / f"{kind}.png"
        args = ["fuse", "--example", kind, "-o", str(out), "--prior", "none", "--steps", "2", "--montage"]
        res = run(args if kind == "mif" else [a for a in args if a != "ivf"])  # --example alone means ivf
        assert res.exit_code == 0, res.output
        ir, vis = example_pair(kind)
        fused = np.asarray(Image.open(out))
        assert fused.shape == io.read_gray(vis).shape  # the sample pair's own size (pad policy)
        pic = np.asarray(Image.open(tmp_path / f"{kind}_montage.png"))
        band = _band_height(pic)
        h = pic.shape[0] - band
        assert h == 256  # montage panels are 256 px tall
        w_ir = round(Image.open(ir).width * 256 / Image.open(ir).height)
        assert pic.shape[1] == 3 * w_ir + 8  # three panels of the sources' aspect ratio, two 4 px gaps
        assert f"montage: {tmp_path / f'{kind}_montage.png'}" in res.output


def test_fuse_example_usage_errors(tmp_path: Path):
    ir, vis = example_pair("ivf")
    res = run(["fuse", "--example", str(ir), str(vis), "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 2  # the value of --example is ivf or mif, not a path
    res = run(["fuse", "--example", "ivf", str(ir), str(vis), "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "give no images or folders" in res.output
    res = run(["fuse", "--example", "mif", "--mode", "ivf", "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "--example mif is a mif pair, but --mode is ivf" in res.output
    assert not (tmp_path / "x.png").exists()


def test_fuse_folder_montages(tmp_path: Path, data_dir: Path):
    for stem, (x, y) in {"p1": (200, 200), "p2": (300, 150)}.items():
        for sub, role in (("ir", "ir"), ("vi", "vi")):
            dest = tmp_path / role / f"{stem}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.open(data_dir / "ivf/MSRS" / sub / "00055D.png").crop((x, y, x + 96, y + 80)).save(dest)
    out = tmp_path / "out"
    res = run(["fuse", "--ir-dir", str(tmp_path / "ir"), "--vis-dir", str(tmp_path / "vi"), "-o", str(out),
               "--prior", "none", "--steps", "2", "--montage"])
    assert res.exit_code == 0, res.output
    montages = tmp_path / "out_montage"
    assert sorted(p.name for p in montages.iterdir()) == ["p1.png", "p2.png"]
    assert not any(p.name.endswith("_montage.png") for p in out.iterdir())  # nothing extra in the output folder
    pic = np.asarray(Image.open(montages / "p1.png"))
    band = _band_height(pic)
    # The third panel is the fused output, upscaled from 80 to 256 rows: compare it at the output's size.
    w = round(96 * 256 / 80)
    panel = Image.fromarray(pic[band:, 2 * (w + 4): 3 * w + 8]).resize((96, 80), Image.BOX)
    fused = np.asarray(Image.open(out / "p1.png").convert("RGB"))
    assert np.abs(np.asarray(panel).astype(int) - fused.astype(int)).mean() < 3  # resampling error only


def _sets(tmp_path: Path) -> tuple[Path, Path]:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    for k, stem in enumerate(["p", "q", "r"]):
        io.save_png(_ramp(70, 72, k), d1 / f"{stem}.png")
        io.save_png(_ramp(70, 72, k), d2 / f"{stem}.png")
    return d1, d2


def test_compare_diff_dir_shows_the_worst_pairs(tmp_path: Path):
    d1, d2 = _sets(tmp_path)
    q = _ramp(70, 72, 1)
    q[10:20, 10:20] ^= 16  # 16 levels off: the worst
    io.save_png(q, d2 / "q.png")
    r = _ramp(70, 72, 2)
    r[0, 0] ^= 2
    io.save_png(r, d2 / "r.png")
    res = run(["compare", str(d1), str(d2), "--diff-dir", str(tmp_path / "diff"), "--worst", "5"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "diff").iterdir()) == ["q.png", "r.png"]  # p is identical
    assert "most different pair(s) (q, r)" in res.output
    pic = np.asarray(Image.open(tmp_path / "diff" / "q.png"))
    band = _band_height(pic)
    diff = pic[band:, 2 * (72 + 4):, 0]
    assert diff.shape == (70, 72) and diff.max() == 255 and (diff == 255).sum() == 100  # 16 levels -> x15.9
    res = run(["compare", str(d1), str(d1), "--diff-dir", str(tmp_path / "none")])
    assert res.exit_code == 0 and "every pair is identical" in res.output and not (tmp_path / "none").exists()


def test_method_label():
    from ddfm_fast.montage import method_label

    assert method_label("diffusion", None, 20) == "ddfm-shrink, 20 steps"  # None is the shipped prior
    assert method_label("diffusion", "/w/tiny_unet.pt", 3) == "tiny_unet.pt, 3 steps"
    assert method_label("diffusion", "adm256-uncond", 100) == "adm256-uncond, 100 steps"
    assert method_label("none", None, 20) == "EM only, 20 iterations"


def test_fuse_one_pair_montage_names_the_model_and_steps(tmp_path: Path, data_dir: Path, reference_dir: Path):
    """With a diffusion prior (the tiny random-weight UNet, 2 steps on a 45x35 crop), the montage is written beside
    the output and its third panel's label band differs from an EM-only run's (another method label)."""
    ins = {}
    for sub, name in (("ir", "ir.png"), ("vi", "vis.png")):
        ins[sub] = tmp_path / name
        Image.open(data_dir / "ivf/MSRS" / sub / "00055D.png").crop((200, 200, 245, 235)).save(ins[sub])
    model = ["--checkpoint", str(reference_dir / "tiny_unet.pt"), "--model-config",
             str(reference_dir / "tiny_unet_config.json"), "--steps", "2", "--backend", "torch", "--no-progress-bar"]
    res = run(["fuse", str(ins["ir"]), str(ins["vi"]), "-o", str(tmp_path / "d.png"), "--montage", *model])
    assert res.exit_code == 0, res.output
    em = run(["fuse", str(ins["ir"]), str(ins["vi"]), "-o", str(tmp_path / "e.png"), "--montage", "--prior", "none",
              "--steps", "2"])
    assert em.exit_code == 0, em.output
    d, e = (np.asarray(Image.open(tmp_path / f"{k}_montage.png")) for k in "de")
    band = _band_height(d)
    w = round(45 * 256 / 35)
    third = slice(2 * (w + 4), 3 * w + 8)
    np.testing.assert_array_equal(d[:band, :w], e[:band, :w])  # same infrared label
    assert not np.array_equal(d[:band, third], e[:band, third])  # "tiny_unet.pt, 2 steps" vs "EM only, ..."
