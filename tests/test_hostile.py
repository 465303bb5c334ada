"""What a real user's machine does to a run: bad options and output paths, full and read-only disks, files that
are not what their names say, a second run into the same folder, Ctrl-C and SIGTERM, pipelines.

Every outcome must be a correct result or one clear line (exit codes: ``ddfm_fast.cli_options.EXIT_CODES``),
with nothing lost and nothing wrong counted as done. Most runs here are EM only (``--prior none``: no model, so
they take milliseconds) on small synthetic images; what they check (paths, records, locks, signals, exit codes)
is the same code for the diffusion prior. The images are made here, so the file needs no ``../shared``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import imagefiles
from ddfm_fast import cli_options, io, outputs, resume, runner
from ddfm_fast.cli import COMMANDS, main
from ddfm_fast.summary import SUMMARY_NAME

EM = ["--prior", "none", "--steps", "2", "--no-progress-bar"]
W, H = 40, 36


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def fuse(*args: str, env: dict | None = None):
    return run("fuse", *args, env=env)


def image(path: Path, seed: int, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0: size[1], 0: size[0]]
    noisy = x * 3 + y * 2 + rng.integers(0, 40, (size[1], size[0]))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path)
    return path


def folders(root: Path, stems: str = "abc", seed: int = 0) -> list[str]:
    for k, stem in enumerate(stems):
        image(root / "ir" / f"{stem}.png", seed + 2 * k)
        image(root / "vis" / f"{stem}.png", seed + 2 * k + 1)
    return ["--ir-dir", str(root / "ir"), "--vis-dir", str(root / "vis")]


def summary(out: Path) -> dict:
    return json.loads((out / SUMMARY_NAME).read_text())


def one_line_error(res) -> str:
    """The last line of a failed run, which must be its one error line (and there must be no traceback)."""
    assert "Traceback" not in res.output, res.output
    return res.output.strip().splitlines()[-1]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return image(tmp_path / "in/ir.png", 1), image(tmp_path / "in/vis.png", 2)


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a model is loaded or a pair is fused: the error must come first."""
    def forbidden(*_a, **_k):
        raise AssertionError("the run got as far as loading a model / fusing")

    monkeypatch.setattr(cli_options, "load_model", forbidden)
    monkeypatch.setattr(runner, "fuse_batch", forbidden)


# --------------------------------------------------------------------------------------------------- fast help


def test_help_and_the_cli_import_no_torch() -> None:
    code = ("import sys; from click.testing import CliRunner; import ddfm_fast.cli as c; "
            "assert 'torch' not in sys.modules, 'import ddfm_fast.cli'; "
            "r = CliRunner().invoke(c.main, ['--help']); assert r.exit_code == 0; "
            "assert 'torch' not in sys.modules, 'ddfm-fast --help'; "
            "r = CliRunner().invoke(c.main, ['fuse', '--help']); assert r.exit_code == 0 and '--log-json' in r.output; "
            "assert 'torch' not in sys.modules, 'ddfm-fast fuse --help'; "
            "[CliRunner().invoke(c.main, [n, '--help']) for n in sorted(c.COMMANDS)]; "
            "print(sorted(n for n in ('torch', 'triton') if n in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", "a command's --help imports torch: " + res.stdout


def test_command_list_is_the_commands_own_help() -> None:
    for name, (_module, _attr, first_paragraph) in COMMANDS.items():
        command = main.get_command(click.Context(main), name)
        assert command is not None and command.name == name
        stand_in = click.Command(name, help=first_paragraph)
        for limit in (45, 60, 300):  # ddfm-fast --help shortens the first paragraph as click does
            assert stand_in.get_short_help_str(limit) == command.get_short_help_str(limit), \
                f"update COMMANDS['{name}'] in cli.py to the command's first help paragraph"
    listing = run("--help").output
    assert all(f"  {name} " in listing for name in COMMANDS)


def test_package_names_are_lazy() -> None:
    code = ("import sys, ddfm_fast; assert 'torch' not in sys.modules; "
            "from ddfm_fast import SamplerConfig; assert SamplerConfig().seed == 3407; "
            "assert callable(ddfm_fast.fuse) and 'torch' in sys.modules; assert ddfm_fast.io.SIZE_MULTIPLE == 32; "
            "assert set(ddfm_fast.__all__) <= set(dir(ddfm_fast))\n"
            "try:\n    ddfm_fast.no_such_name\nexcept AttributeError as e:\n    print(e)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "has no attribute 'no_such_name'" in res.stdout


# --------------------------------------------------------------------------------------------------- options


BAD_OPTIONS = [
    (["--seed", str(2**64)], "--seed"),  # beyond 64 bits
    (["--seed", "-1"], "--seed"),
    (["--seed", "1.5"], "--seed"),
    (["--prior", "none", "--steps", "ddim10"], "--steps with prior 'none' count EM iterations"),
    (["--prior", "none", "--steps", "0"], "--steps with prior 'none' count EM iterations"),
    (["--rho", "-1"], "--rho"),
    (["--lamb", "-0.5"], "--lamb"),
    (["--lamb", "0"], "--lamb"),
    (["--lamb", "inf"], "--lamb must be a finite number > 0"),
    (["--rho", "nan"], "--rho must be a finite number > 0"),
    (["--tv-prox", "soft", "--tv-threshold", "nan"], "--tv-threshold must be a finite number >= 0"),
    (["--tv-prox", "soft", "--tv-threshold", "-1"], "--tv-threshold"),
    (["--device", "meta"], "--device"),
    (["--device", "mps"], "--device"),
    (["--device", "bogus"], "--device"),
    (["--steps", "0"], "--steps"),
    (["--steps", "2000"], "--steps"),
    (["--steps", "ddimx"], "--steps"),
    (["--steps", "50", "--train-timesteps", "10"], "cannot divide a section of 10 steps into 50"),
    (["--batch-size", "0"], "--batch-size"),
    (["--dtype", "fp8"], "--dtype"),
    (["--compile-mode", "fastest"], "--compile-mode"),
]


@pytest.mark.parametrize("flags, named", BAD_OPTIONS, ids=[" ".join(f) for f, _ in BAD_OPTIONS])
def test_bad_options_are_usage_errors_before_any_model_loads(tmp_path: Path, pair, no_compute, flags,
                                                              named) -> None:
    res = fuse(*pair, "-o", tmp_path / "o.png", "--no-progress-bar", *flags)
    assert res.exit_code == 2, res.output
    line = one_line_error(res)
    assert line.startswith("Error: ") and named in line, line
    assert not (tmp_path / "o.png").exists()


def test_em_only_steps_count_iterations(tmp_path: Path, pair) -> None:
    res = fuse(*pair, "-o", tmp_path / "o.npy", "--prior", "none", "--steps", "7")
    assert res.exit_code == 0, res.output
    import ddfm_fast

    expected = ddfm_fast.fuse(*map(str, pair), prior="none", steps=7, device="cpu")
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), io.luma_to_unit(expected.luma))


def test_a_bad_pixel_cap_is_one_line_before_anything_runs(tmp_path: Path, pair, no_compute) -> None:
    res = fuse(*pair, "-o", tmp_path / "o.png", *EM, env={io.MAX_PIXELS_ENV: "lots"})
    assert res.exit_code == 1 and io.MAX_PIXELS_ENV in one_line_error(res)


# --------------------------------------------------------------------------------------------------- plan lines


@pytest.mark.parametrize("flags, expected", [
    (["--dtype", "fp16"], "warning: fp16 on a CPU is emulated and many times slower than fp32"),
    (["--compile"], "warning: torch.compile on a CPU costs 15-60 s per image size"),
    (["--fast"], "plan: cpu: torch tail, fp32, eager ("),
])
def test_slow_accelerations_on_a_cpu_are_said_in_one_line(tmp_path: Path, pair, monkeypatch, flags, expected) -> None:
    def stop(*_a, **_k):
        raise click.ClickException("stopped before loading the model")

    monkeypatch.setattr(cli_options, "load_model", stop)
    res = fuse(*pair, "-o", tmp_path / "o.png", "--device", "cpu", "--backend", "torch", *flags)
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.startswith(expected)]
    assert len(lines) == 1, res.output
    if "--fast" in flags:  # what --fast does on a CPU, and why it stays fp32 eager
        assert "fp16/bf16 UNet: not picked on a CPU" in lines[0] and "compile: not picked on a CPU" in lines[0]
    quiet = fuse(*pair, "-o", tmp_path / "o.png", "--device", "cpu", "--backend", "torch", "--quiet", *flags)
    assert quiet.output.strip() == "Error: stopped before loading the model"  # --quiet: nothing but errors


# --------------------------------------------------------------------------------------------------- output paths


def test_unwritable_outputs_fail_before_the_model_loads(tmp_path: Path, pair, no_compute, monkeypatch) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    ins = folders(tmp_path / "data")
    cases = [
        ([*pair, "-o", blocker / "out.png"], 1, f"{blocker} is a file, not a folder"),
        ([*ins, "-o", blocker / "out"], 1, f"{blocker} is a file, not a folder"),
        ([*ins, "-o", blocker], 2, "is a file; folder runs need an output folder"),
        ([*pair, "-o", tmp_path], 2, "is a folder; give the output file"),
        ([*pair, "-o", tmp_path / "o.gif"], 2, "extension '.gif' is not an output format"),
        ([*pair, "-o", tmp_path / "o"], 2, "no extension is not an output format"),
        ([*pair, "-o", tmp_path / "o.jpg", "--raw"], 2, "16-bit raw output is written as .png or .tif, not .jpg"),
        ([*pair, "-o", tmp_path / "o.npy", "--color"], 2, "the colour output is written as"),
        ([*pair, "-o", tmp_path / "o.png", "--format", "jpg"], 2, "--format is for folder runs"),
        ([*ins, "-o", tmp_path / "f", "--format", "npy", "--color"], 2, "the colour output is written as"),
    ]
    for args, code, words in cases:
        res = fuse(*args, *EM)
        assert res.exit_code == code and words in one_line_error(res), (args, res.output)
    # A read-only file system (as os.access reports it: even root cannot write there) and a folder without
    # write permission: both named before anything is computed.
    real_access = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    for args in ([*pair, "-o", tmp_path / "new/deep/o.png"], [*ins, "-o", tmp_path / "outdir"]):
        res = fuse(*args, *EM)
        assert res.exit_code == 1, res.output
        assert "-o/--output: cannot write there: " in one_line_error(res)
        assert f"{tmp_path} is not writable" in res.output
    assert not (tmp_path / "new").exists() and not (tmp_path / "outdir").exists()


def test_missing_output_folders_are_created(tmp_path: Path, pair) -> None:
    res = fuse(*pair, "-o", tmp_path / "a/b/c/o.png", *EM)
    assert res.exit_code == 0 and (tmp_path / "a/b/c/o.png").is_file()


@pytest.mark.parametrize("name, pil_format, mode", [
    ("o.png", "PNG", "L"), ("o.jpg", "JPEG", "L"), ("o.JPEG", "JPEG", "L"), ("o.tif", "TIFF", "L"),
    ("o.tiff", "TIFF", "L"), ("o.bmp", "BMP", "L"),
])
def test_output_format_from_the_extension(tmp_path: Path, pair, name, pil_format, mode) -> None:
    res = fuse(*pair, "-o", tmp_path / name, *EM)
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / name) as img:
        assert img.format == pil_format and img.mode == mode and img.size == (W, H)
    reference = tmp_path / "ref.png"
    assert fuse(*pair, "-o", reference, *EM).exit_code == 0
    ours, ref = (np.asarray(Image.open(p)).astype(int) for p in (tmp_path / name, reference))
    # Lossless formats hold the official output exactly. JPEG at quality 95: measured max 7 grey levels (mean 1.6)
    # on this noisy 40x36 image; the bound 14 is twice that, and a format mix-up (a 16-bit or stretched image, a
    # wrong mode) differs by far more.
    assert np.abs(ours - ref).max() <= (14 if pil_format == "JPEG" else 0)


def test_sixteen_bit_tiff_and_npy_from_the_extension(tmp_path: Path, pair) -> None:
    for name in ("raw.png", "raw.tif"):
        assert fuse(*pair, "-o", tmp_path / name, "--raw", *EM).exit_code == 0
    png, tif = (Image.open(tmp_path / n) for n in ("raw.png", "raw.tif"))
    assert png.mode.startswith("I;16") and tif.mode.startswith("I;16") and tif.format == "TIFF"
    np.testing.assert_array_equal(np.asarray(png), np.asarray(tif))  # the same 16-bit values
    res = fuse(*pair, "-o", tmp_path / "raw.npy", *EM)  # .npy means the raw float output, no --raw needed
    assert res.exit_code == 0, res.output
    unit = np.load(tmp_path / "raw.npy")
    assert unit.dtype == np.float32 and unit.shape == (H, W)
    np.testing.assert_array_equal(np.asarray(png), np.rint(np.clip(unit.astype(np.float64), 0, 1) * 65535))


def test_folder_format_and_resume(tmp_path: Path) -> None:
    ins = folders(tmp_path)
    out = tmp_path / "out"
    res = fuse(*ins, "-o", out, "--format", "jpg", *EM)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "b.jpg", "c.jpg", SUMMARY_NAME]
    res = fuse(*ins, "-o", out, "--format", "jpg", *EM)
    assert res.exit_code == 0 and summary(out)["counts"]["skipped"] == 3
    jpgs = {p.name: p.read_bytes() for p in out.glob("*.jpg")}
    res = fuse(*ins, "-o", out, *EM)  # PNG now: other file names, so both sets live side by side
    assert res.exit_code == 0 and summary(out)["counts"]["done"] == 3
    assert {p.name: p.read_bytes() for p in out.glob("*.jpg")} == jpgs
    assert sorted(summary(out)["outputs"]) == ["a.jpg", "a.png", "b.jpg", "b.png", "c.jpg", "c.png"]


# --------------------------------------------------------------------------------------------------- write failures


@contextmanager
def _failing_writes(monkeypatch, after: int, code: int = errno.ENOSPC):
    """io.atomic_path that works ``after`` times, then fails like a full disk (for outputs and the summary)."""
    real = io.atomic_path
    calls = {"n": 0}

    @contextmanager
    def atomic_path(dest):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(code, os.strerror(code), str(dest))
        with real(dest) as tmp:
            yield tmp

    monkeypatch.setattr(io, "atomic_path", atomic_path)
    yield calls
    monkeypatch.setattr(io, "atomic_path", real)


def test_full_disk_stops_a_folder_run_and_nothing_is_lost(tmp_path: Path, monkeypatch) -> None:
    ins = folders(tmp_path, "abcd")
    out = tmp_path / "out"
    with _failing_writes(monkeypatch, after=1):  # a.png is written, then the disk is full (the summary too)
        res = fuse(*ins, "-o", out, *EM)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert "the run stopped: " in res.output and "No space left on device" in res.output
    assert f"{out / SUMMARY_NAME}: cannot write it (No space left on device)" in res.output
    assert "rerun the same command to resume" in res.output
    names = sorted(p.name for p in out.iterdir())
    assert "a.png" in names and "b.png" not in names and not [n for n in names if n.endswith(".part")]
    assert [n for n in names if n.startswith(resume.JOURNAL_PREFIX)]  # a.png's record survives the failure
    # Space again: the same command resumes; a.png is verified from its journaled record, the rest is fused.
    a_bytes = (out / "a.png").read_bytes()
    res = fuse(*ins, "-o", out, *EM)
    assert res.exit_code == 0, res.output
    s = summary(out)
    assert [k["stem"] for k in s["skipped"]] == ["a"] and [d["stem"] for d in s["done"]] == ["b", "c", "d"]
    assert sorted(s["outputs"]) == ["a.png", "b.png", "c.png", "d.png"] and (out / "a.png").read_bytes() == a_bytes
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # journal and lock gone


def test_summary_write_failure_is_reported_not_raised(tmp_path: Path, monkeypatch) -> None:
    from ddfm_fast import summary as summary_module

    def read_only(doc, dest):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dest))

    ins = folders(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(summary_module, "write_summary", read_only)
    res = fuse(*ins, "-o", out, *EM)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"{out / SUMMARY_NAME}: cannot write it (Read-only file system)" in res.output
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "c.png"]
    monkeypatch.undo()
    res = fuse(*ins, "-o", out, *EM)  # the journal vouches for the outputs
    assert res.exit_code == 0 and summary(out)["counts"]["skipped"] == 3


def test_a_single_pair_that_cannot_be_written_is_one_line(tmp_path: Path, pair, monkeypatch) -> None:
    with _failing_writes(monkeypatch, after=0):
        res = fuse(*pair, "-o", tmp_path / "o.png", *EM)
    assert res.exit_code == 1
    assert one_line_error(res) == f"Error: {tmp_path / 'o.png'}: cannot write it (No space left on device)"
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob(".o*"))


# --------------------------------------------------------------------------------------------------- bad pairs


def test_each_bad_pair_fails_alone(tmp_path: Path, monkeypatch) -> None:
    """Unreadable, sizes that differ, over the pixel cap (from the header), non-finite, a write refused: each is
    recorded with its reason, nothing is written for it, and every other pair is fused."""
    from ddfm_fast import api
    from ddfm_fast.em_only import EMOnlyNonFiniteError

    ins = folders(tmp_path, "gn")
    (tmp_path / "ir/junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    image(tmp_path / "vis/junk.png", 9)
    image(tmp_path / "ir/size.png", 10)
    image(tmp_path / "vis/size.png", 11, size=(W + 8, H))
    (tmp_path / "ir/bomb.png").write_bytes(imagefiles.png_claiming(100_000, 100_000))
    image(tmp_path / "vis/bomb.png", 12)
    image(tmp_path / "ir/write.png", 13)
    image(tmp_path / "vis/write.png", 14)
    real_fuse, real_write = api.fuse_prepared, outputs.write_output

    def fuse_prepared(pairs, config, *args, **kwargs):  # n's pair goes non-finite (its anchor: a bright image)
        if any(float(p.anchor.mean()) == nan_mean for p in pairs):
            raise EMOnlyNonFiniteError("EM-only fusion went non-finite (NaN or inf); nothing was written")
        return real_fuse(pairs, config, *args, **kwargs)

    def write_output(array, dest, fmt, **kwargs):
        if Path(dest).name == "write.png":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(dest))
        return real_write(array, dest, fmt, **kwargs)

    nan_mean = float(api.prepare_pair(tmp_path / "ir/n.png", tmp_path / "vis/n.png", "pad").anchor.mean())
    monkeypatch.setattr(api, "fuse_prepared", fuse_prepared)
    monkeypatch.setattr(outputs, "write_output", write_output)
    out = tmp_path / "out"
    res = fuse(*ins, "-o", out, *EM)
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output
    s = summary(out)
    reasons = {f["stem"]: f["reason"] for f in s["failed"]}
    assert sorted(reasons) == ["bomb", "junk", "n", "size", "write"] and [d["stem"] for d in s["done"]] == ["g"]
    assert reasons["bomb"].startswith(str(tmp_path / "ir/bomb.png")) and "100000x100000" in reasons["bomb"]
    assert reasons["junk"].startswith(str(tmp_path / "ir/junk.png"))
    assert f"{W}x{H}" in reasons["size"] and f"{W + 8}x{H}" in reasons["size"]
    assert "non-finite result" in reasons["n"]
    assert reasons["write"] == f"{out / 'write.png'}: cannot write it (Permission denied)"
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_NAME, "g.png"]


def test_a_non_finite_single_pair_writes_nothing(tmp_path: Path, pair, monkeypatch) -> None:
    from ddfm_fast import api
    from ddfm_fast.sampler import NonFiniteError

    def nan(*_a, **_k):
        raise NonFiniteError("the x0 prediction went non-finite at step 1 (UNet output)")

    monkeypatch.setattr(api, "fuse_prepared", nan)
    res = fuse(*pair, "-o", tmp_path / "o.png", *EM)
    assert res.exit_code == 1
    line = one_line_error(res)
    assert "non-finite result: the x0 prediction went non-finite at step 1" in line and str(pair[0]) in line
    assert not (tmp_path / "o.png").exists()


def test_image_pixels_never_raises(tmp_path: Path) -> None:
    from ddfm_fast import distributed

    (tmp_path / "bomb.png").write_bytes(imagefiles.png_claiming(100_000, 100_000))
    (tmp_path / "big.png").write_bytes(imagefiles.png_claiming(9000, 9000))  # 81 MP: over the 64 MP cap
    assert distributed.image_pixels(tmp_path / "bomb.png") == 0 and distributed.image_pixels(tmp_path / "big.png") == 0
    (tmp_path / "dir.png").mkdir()
    assert distributed.image_pixels(tmp_path / "dir.png") == 0


# --------------------------------------------------------------------------------------------------- resume


def test_resume_trusts_only_what_it_can_verify(tmp_path: Path) -> None:
    ins = folders(tmp_path / "A", "abcdef")
    out = tmp_path / "out"
    assert fuse(*ins, "-o", out, *EM).exit_code == 0
    first = summary(out)
    assert set(first["outputs"]["a.png"]) >= {"settings", "inputs_sha256", "output_sha256", "output_bytes"}
    (out / "a.png").write_bytes(b"")  # a 0-byte file
    (out / "b.png").write_text("not an image")  # a text file
    (out / "c.png").unlink()
    (out / "c.png").mkdir()  # a folder where the output was
    image(tmp_path / "A/ir/d.png", 99)  # an input changed since its output was made
    stray = image(tmp_path / "stray.png", 5)
    (out / "e.png").write_bytes(stray.read_bytes())  # an image no record accounts for
    res = fuse(*ins, "-o", out, *EM)
    assert res.exit_code == 3, res.output
    s = summary(out)
    assert [d["stem"] for d in s["done"]] == ["a", "b", "d"] and [k["stem"] for k in s["skipped"]] == ["f"]
    failed = {f["stem"]: f["reason"] for f in s["failed"]}
    assert "is a folder" in failed["c"] and "changed since ddfm-fast wrote it" in failed["e"]
    assert "--overwrite" in failed["e"]
    assert (out / "e.png").read_bytes() == stray.read_bytes()  # not replaced
    assert {r["stem"] for r in s["replaced"]} == {"a", "b", "d"}
    # Other input folders with the same stems into the same output folder: refused per pair, nothing replaced.
    other = folders(tmp_path / "B", "abdf", seed=50)
    before = {p.name: p.read_bytes() for p in out.glob("*.png") if p.is_file()}
    res = fuse(*other, "-o", out, *EM)
    assert res.exit_code == 3
    failed = {f["stem"]: f["reason"] for f in summary(out)["failed"]}
    assert sorted(failed) == ["a", "b", "d", "f"] and all("made from other input files" in r for r in failed.values())
    assert {p.name: p.read_bytes() for p in out.glob("*.png") if p.is_file()} == before
    # The summary kept every earlier record: three runs, and e's file is still refused.
    assert len(summary(out)["runs"]) == 3 and "a.png" in summary(out)["outputs"]
    # Back to the first data set: its outputs are verified again (the refusals above kept their records).
    res = fuse(*ins, "-o", out, *EM)
    assert res.exit_code == 3 and [k["stem"] for k in summary(out)["skipped"]] == ["a", "b", "d", "f"]


def test_stale_part_files_are_removed_at_the_start(tmp_path: Path) -> None:
    ins = folders(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".a.x8k2l1.png.part").write_bytes(b"\x89PNG half")
    res = fuse(*ins, "-o", out, *EM)
    assert res.exit_code == 0 and not list(out.glob(".*.part"))
    assert "removed 1 stale temporary file(s)" in res.output and summary(out)["warnings"]


def test_a_second_run_into_a_locked_folder_is_one_line(tmp_path: Path, no_compute) -> None:
    ins = folders(tmp_path)
    out = tmp_path / "out"
    with resume.FolderLock(out):
        res = fuse(*ins, "-o", out, *EM)
    assert res.exit_code == 1
    assert one_line_error(res).startswith(f"Error: output folder {out} is being written by another ddfm-fast run "
                                          f"(pid {os.getpid()} on ")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------- interrupts


def test_ctrl_c_keeps_everything_done_and_says_how_to_resume(tmp_path: Path, monkeypatch) -> None:
    ins = folders(tmp_path, "abcd")
    out = tmp_path / "out"
    (tmp_path / "ir/b.png").rename(tmp_path / "b_ir.png")  # the first run fuses a, c, d without b
    assert fuse(*ins, "-o", out, *EM).exit_code == 0
    (tmp_path / "b_ir.png").rename(tmp_path / "ir/b.png")
    (out / "c.png").unlink()
    (out / "d.png").unlink()
    made_a = summary(out)["outputs"]["a.png"]["made"]
    real, calls = runner.fuse_batch, {"n": 0}

    def interrupted_second_time(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "fuse_batch", interrupted_second_time)
    res = fuse(*ins, "-o", out, *EM)
    assert res.exit_code == 130, res.output
    assert ("interrupted by Ctrl-C (SIGINT): 1 pair(s) fused in this run, 2 output(s) done in all in "
            f"{out} and kept, 2 of 4 pair(s) not reached; rerun the same command to resume") in res.output
    s = summary(out)
    assert s["complete"] is False and s["counts"]["outputs"] == 2 and s["counts"]["pending"] == 2
    assert [d["stem"] for d in s["done"]] == ["b"] and [k["stem"] for k in s["skipped"]] == ["a"]
    assert s["outputs"]["a.png"]["made"] == made_a and len(s["runs"]) == 2  # the first run's records kept
    monkeypatch.undo()
    res = fuse(*ins, "-o", out, *EM)
    assert res.exit_code == 0
    s = summary(out)
    assert [k["stem"] for k in s["skipped"]] == ["a", "b"] and [d["stem"] for d in s["done"]] == ["c", "d"]
    assert s["complete"] and len(s["runs"]) == 3 and s["runs"][1]["complete"] is False


def test_single_pair_interrupt(tmp_path: Path, pair, monkeypatch) -> None:
    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "fuse_batch", interrupt)
    res = fuse(*pair, "-o", tmp_path / "o.png", *EM)
    assert res.exit_code == 130 and "interrupted by Ctrl-C (SIGINT)" in res.output
    assert not list(tmp_path.glob("*o.png*"))


@pytest.mark.slow  # a real process (imports torch): a few seconds
def test_sigterm_in_a_real_folder_run(tmp_path: Path) -> None:
    ins = folders(tmp_path, "abcdefghij")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ddfm_fast", "fuse", *ins, "-o", str(out), "--prior", "none", "--steps", "400",
           "--no-progress-bar"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.png")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "rerun the same command to resume" in err and "Traceback" not in err
    s = summary(out)
    done = sorted(p.name for p in out.glob("*.png"))
    assert s["complete"] is False and sorted(s["outputs"]) == done and 1 <= len(done) < 10
    assert not list(out.glob(".*"))  # no lock, no temporary file; the journal went into the summary
    res = fuse(*ins, "-o", out, *EM[:2], "--steps", "400", "--no-progress-bar")
    assert res.exit_code == 0 and summary(out)["counts"]["skipped"] == len(done)


# --------------------------------------------------------------------------------------------------- pipelines


def test_log_json_and_quiet(tmp_path: Path) -> None:
    ins = folders(tmp_path)
    (tmp_path / "ir/c.png").write_bytes(b"broken")
    out = tmp_path / "out"
    res = fuse(*ins, "-o", out, *EM, "--quiet", "--log-json")
    assert res.exit_code == 3
    events = [json.loads(line) for line in res.stdout.splitlines()]  # every stdout line is one JSON object
    assert [(e["event"], e.get("status"), e.get("stem")) for e in events] == [
        ("pair", "done", "a"), ("pair", "done", "b"), ("pair", "failed", "c"), ("end", None, None)]
    end = events[-1]
    assert end["event"] == "end" and end["exit_code"] == 3 and end["counts"]["done"] == 2
    assert end["summary"] == str(out / SUMMARY_NAME)
    done = next(e for e in events if e.get("stem") == "a")
    assert done["output"] == str(out / "a.png") and len(done["output_sha256"]) == 64
    reason = events[2]["reason"]
    assert reason.startswith(str(tmp_path / "ir/c.png"))
    assert res.stderr.splitlines() == [f"failed: c: {reason}"]  # --quiet: the errors, once, and nothing else
    # One pair: a pair line and the end line; an error ends with an end line too.
    res = fuse(tmp_path / "ir/a.png", tmp_path / "vis/a.png", "-o", tmp_path / "o.png", *EM, "--log-json", "-q")
    assert res.exit_code == 0 and res.stderr == ""
    assert [json.loads(x)["event"] for x in res.stdout.splitlines()] == ["pair", "end"]
    res = fuse(tmp_path / "ir/c.png", tmp_path / "vis/c.png", "-o", tmp_path / "o.png", *EM, "--log-json", "-q")
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert res.exit_code == 1 and [(e["event"], e.get("status")) for e in lines] == [("pair", "failed"), ("end", None)]
    assert lines[-1]["exit_code"] == 1 and str(tmp_path / "ir/c.png") in lines[-1]["error"]
    assert res.stderr.strip().splitlines() == [f"Error: {lines[0]['reason']}"]


# --------------------------------------------------------------------------------------------------- --debug


def test_debug_shows_the_traceback_and_only_then(tmp_path: Path, pair, monkeypatch) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("ddfm_fast.cli_fuse.run_single", boom)
    res = fuse(*pair, "-o", tmp_path / "o.png", *EM)
    assert res.exit_code == 1 and one_line_error(res) == (
        "Error: RuntimeError: boom second line (run `ddfm-fast --debug ...` to see the traceback)")
    res = CliRunner().invoke(main, ["--debug", "fuse", *map(str, pair), "-o", str(tmp_path / "o.png"), *EM])
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)
    res = CliRunner().invoke(main, ["fuse", *map(str, pair), "-o", str(tmp_path / "o.png"), *EM],
                             env={"DDFM_FAST_DEBUG": "1"})
    assert isinstance(res.exception, RuntimeError)
    # An error with a cause (a one-line ClickException) shows the cause's traceback with --debug.
    res = run("--debug", "fuse", tmp_path / "missing.png", pair[1], "-o", tmp_path / "o.png", *EM)
    assert res.exit_code == 1 and "no such file" in res.output


def test_a_folder_pair_of_different_sizes_is_refused_from_the_headers(tmp_path: Path, monkeypatch) -> None:
    """A 140-byte PNG whose header claims 12000x12000 (within a raised cap) beside a small image: refused as a
    size mismatch from the two headers; neither image is decoded."""
    ins = folders(tmp_path, "g")
    (tmp_path / "ir/big.png").write_bytes(imagefiles.png_claiming(12_000, 12_000))
    image(tmp_path / "vis/big.png", 12)
    decoded: list[str] = []
    real_open = io.open_image

    def open_image(path, **kwargs):
        decoded.append(Path(path).name)
        return real_open(path, **kwargs)

    monkeypatch.setattr(io, "open_image", open_image)
    out = tmp_path / "out"
    res = fuse(*ins, "-o", out, *EM, env={io.MAX_PIXELS_ENV: str(10**9)})
    assert res.exit_code == 3, res.output
    reasons = {f["stem"]: f["reason"] for f in summary(out)["failed"]}
    assert "differ in size" in reasons["big"] and "12000x12000" in reasons["big"]
    assert "big.png" not in decoded and "g.png" in decoded


# --------------------------------------------------------------------------------------------------- outputs on inputs


def _digest(path: Path) -> bytes:
    return path.read_bytes()


def test_no_command_writes_over_what_it_reads(tmp_path: Path, pair, no_compute) -> None:
    """Every file a command writes beside its main output (a montage, progress images, difference pictures, a
    report, trained weights) is checked against the inputs before anything runs: one line naming the option, and
    every input byte for byte as it was."""
    ir, vis = pair
    kept = {p: _digest(p) for p in (ir, vis)}
    # fuse --montage: OUT-stem_montage.png next to OUT is the infrared input.
    montage_in = tmp_path / "in" / "f_montage.png"
    image(montage_in, 5)
    kept[montage_in] = _digest(montage_in)
    res = fuse(montage_in, vis, "-o", tmp_path / "in" / "f.png", *EM, "--montage")
    assert res.exit_code == 2 and "--montage" in res.output and "it would be replaced" in res.output, res.output
    # Folder runs: OUTDIR_montage/ is the infrared folder.
    ins = folders(tmp_path / "d")
    run_montage = tmp_path / "run_montage"
    (tmp_path / "d" / "ir").rename(run_montage)
    ins[1] = str(run_montage)
    kept.update({p: _digest(p) for p in run_montage.iterdir()})
    res = fuse(*ins, "-o", tmp_path / "run", *EM, "--montage")
    assert res.exit_code == 2 and "--montage" in res.output, res.output
    # compare: -o on an image of DIR1, --diff-dir equal to DIR1.
    d1, d2 = tmp_path / "c1", tmp_path / "c2"
    for d, seed in ((d1, 7), (d2, 8)):
        image(d / "p.png", seed)
    kept.update({d1 / "p.png": _digest(d1 / "p.png")})
    for args, what in ((["-o", d1 / "p.png"], "-o/--out"), (["--diff-dir", d1], "--diff-dir")):
        res = run("compare", d1, d2, *args)
        assert res.exit_code == 2 and what in res.output and "it would be replaced" in res.output, res.output
    # report: -o onto its own results file, or a name that is not a page.
    results = tmp_path / "res.html"
    results.write_text("{}")
    kept[results] = _digest(results)
    res = run("report", results, "-o", results)
    assert res.exit_code == 2 and "it would be replaced" in res.output, res.output
    res = run("report", results, "-o", tmp_path / "page.png")
    assert res.exit_code == 2 and "name it .html" in res.output, res.output
    # train-prior: weights named as an image of --data.
    res = run("train-prior", "--data", tmp_path / "in", "--out", ir, "--steps", "1")
    assert res.exit_code == 2 and "name it .safetensors" in res.output, res.output
    for path, data in kept.items():
        assert _digest(path) == data, f"{path} was changed"


def test_save_progress_cannot_replace_the_inputs(tmp_path: Path, pair) -> None:
    """The progress folder may hold the inputs (its frames have names of their own), unless an input has one of
    those names: the recorder would write over it (or clear it as an earlier run's frame)."""
    ir, vis = pair
    frame_named = image(ir.parent / "x_0001.png", 9)
    before = _digest(frame_named)
    res = fuse(frame_named, vis, "-o", tmp_path / "f.png", "--steps", "2", "--save-progress", "--progress-dir",
               ir.parent)
    assert res.exit_code == 2 and "--progress-dir" in res.output and "it would be replaced" in res.output, res.output
    assert _digest(frame_named) == before
    frame_named.unlink()
    kept = {p: _digest(p) for p in (ir, vis)}
    res = fuse(ir, vis, "-o", tmp_path / "f.png", "--steps", "2", "--save-progress", "--progress-dir", ir.parent)
    assert res.exit_code == 0, res.output
    assert (ir.parent / "x_0000.png").exists() and all(_digest(p) == d for p, d in kept.items())


def test_a_rerun_may_write_its_own_output_into_an_input_folder_again(tmp_path: Path) -> None:
    d1, d2 = tmp_path / "c1", tmp_path / "c2"
    for d, seed in ((d1, 7), (d2, 8)):
        image(d / "p.png", seed)
    for _ in range(2):
        res = run("compare", d1, d2, "-o", d1 / "compare.json")
        assert res.exit_code == 0, res.output


def test_failures_never_reach_stdout(tmp_path: Path) -> None:
    """stdout carries --log-json's objects (or nothing): a live failure line goes to stderr like every other."""
    ins = folders(tmp_path)
    (tmp_path / "ir/c.png").write_bytes(b"broken")
    for extra in ([], ["--log-json"]):
        out = tmp_path / f"out{len(extra)}"
        res = fuse(*ins, "-o", out, *EM, *extra)
        assert res.exit_code == 3
        assert "failed: c:" in res.stderr
        if extra:
            assert all(json.loads(line) for line in res.stdout.splitlines())
        else:
            assert "failed" not in res.stdout, res.stdout


def test_links_that_lead_nowhere_fail_their_pair_by_name(tmp_path: Path) -> None:
    ins = folders(tmp_path, "ab")
    (tmp_path / "ir/a.png").unlink()
    (tmp_path / "ir/a.png").symlink_to(tmp_path / "nowhere.png")
    res = fuse(*ins, "-o", tmp_path / "out", *EM)
    assert res.exit_code == 3, res.output
    assert "failed: a:" in res.stderr and "broken symbolic link" in res.stderr and "unpaired:" not in res.stderr


def test_eval_with_an_empty_folder_part_is_refused(tmp_path: Path) -> None:
    ins = folders(tmp_path, "a")
    for spec in ("X=", "", "X= "):
        res = run("eval", "--fused", spec, *ins)
        assert res.exit_code == 2 and "no folder given" in res.output, (spec, res.output)


def test_model_config_without_a_checkpoint_is_refused(tmp_path: Path, pair, no_compute) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{}")
    for extra in ([], ["--prior", "none"]):
        res = fuse(*pair, "-o", tmp_path / "f.png", "--model-config", cfg, *extra)
        assert res.exit_code == 2 and "--model-config" in res.output and "no checkpoint" in res.output, res.output


def test_an_image_fused_with_itself_is_said(tmp_path: Path, pair) -> None:
    ir, _ = pair
    res = fuse(ir, ir, "-o", tmp_path / "f.png", *EM)
    assert res.exit_code == 0 and "fused with itself" in res.stderr
    ins = folders(tmp_path, "a")
    res = fuse("--ir-dir", ins[1], "--vis-dir", ins[1], "-o", tmp_path / "out", *EM)
    assert res.exit_code == 0 and "fused with itself" in res.stderr


def test_fusion_result_save_writes_the_format_its_name_asks_for(tmp_path: Path, pair) -> None:
    import ddfm_fast

    res = ddfm_fast.fuse(*pair, prior="none", steps=2)
    for name, pil_format in (("f.png", "PNG"), ("f.jpg", "JPEG"), ("f.tif", "TIFF"), ("f.bmp", "BMP")):
        with Image.open(res.save(tmp_path / name)) as img:
            assert img.format == pil_format and img.size == res.size[::-1]
    raw = np.load(res.save(tmp_path / "f.npy"), allow_pickle=False)
    assert raw.dtype == np.float32 and raw.shape == res.size
    cli = tmp_path / "cli.npy"  # the same numbers as the command line's raw output
    assert fuse(*pair, "-o", cli, "--raw", *EM).exit_code == 0
    np.testing.assert_array_equal(raw, np.load(cli))
    for bad, words in ((tmp_path / "f.gif", "not an output format"), (tmp_path / "noext", "no extension"),
                       (tmp_path, "is a folder"), (tmp_path / "f.png" / "x.png", "is a file")):
        with pytest.raises(ValueError, match=words):
            res.save(bad)


def test_flat_inputs_are_said_not_passed_off_as_a_picture(tmp_path: Path) -> None:
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(flat)
    res = fuse(flat, flat, "-o", tmp_path / "f.png", *EM)
    assert res.exit_code == 0 and "are the inputs flat?" in res.stderr, res.stderr


def test_eval_names_fused_images_of_one_grey_level(tmp_path: Path) -> None:
    size = (80, 70)  # VIF's pyramid needs 65 px
    for d, seed in (("ir", 1), ("vis", 2), ("f", 3)):
        image(tmp_path / d / "a.png", seed, size)
        image(tmp_path / d / "b.png", seed + 10, size)
    Image.fromarray(np.zeros(size[::-1], np.uint8)).save(tmp_path / "f" / "b.png")
    res = run("eval", "--fused", tmp_path / "f", "--ir-dir", tmp_path / "ir", "--vis-dir", tmp_path / "vis")
    assert res.exit_code == 0 and "1 fused image(s) are one grey level" in res.stderr and ": b" in res.stderr
    assert "RuntimeWarning" not in res.output


def test_odd_file_names_and_json_fields_stay_one_line(tmp_path: Path) -> None:
    from ddfm_fast.montage import label_band
    from ddfm_fast.report import ReportError, load_results
    from ddfm_fast.unet import UNetConfig

    assert label_band("two\nlines\tand a tab", 120).height == label_band("one line", 120).height
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"methods": None}))
    with pytest.raises(ReportError, match="not a results file"):
        load_results(bad)
    with pytest.raises(ValueError, match="model_channels is num_channels here"):
        UNetConfig.from_create_model_args({"model_channels": 16, "image_size": 32, "num_res_blocks": 1})


def test_saved_weights_get_the_usual_file_permissions(tmp_path: Path) -> None:
    import stat as stat_

    from ddfm_fast.checkpoint import save_safetensors
    from ddfm_fast.unet import UNetConfig, UNetModel

    net = UNetModel(UNetConfig.from_create_model_args(dict(image_size=16, num_channels=8, num_res_blocks=1,
                                                           channel_mult="1", attention_resolutions="",
                                                           norm_groups=8)))
    umask = os.umask(0o022)
    try:
        path = save_safetensors(net, tmp_path / "w.safetensors")
    finally:
        os.umask(umask)
    assert stat_.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name != "w.safetensors"]
