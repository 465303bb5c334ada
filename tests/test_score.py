"""``ddfm-fast score`` (``ddfm_fast.scoring``): fuse a dataset folder, score it, print it beside the paper's row.

A tiny dataset folder of 2 MSRS pairs cropped to 96x96 (the evaluator's VIF needs at least 65x65, so 64x64 crops
cannot be scored) fused with the tiny random-weight UNet and 2 steps: these tests check the plumbing (detection,
resume, scores equal to ``metrics.evaluate`` on the fused files, result files, errors), not image quality.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddfm_fast.summary import SUMMARY_NAME
from ddfm_fast.cli_score import score_command
from ddfm_fast.metrics import METRIC_NAMES, evaluate, read_gray_eval
from ddfm_fast.scoring import (
    PAPER_METRICS,
    PAPER_NUMBERS,
    DatasetError,
    DatasetNameError,
    dataset_layout,
    detect_dataset,
)

SIZE = 96  # crop (width = height); 96 is a multiple of 32, so pad and crop keep it
MSRS_STEMS = ("00004N", "00055D")


@click.group()
def cli() -> None:
    """A local group: cli.py registers `score` itself."""


cli.add_command(score_command)


def run(args: list[str]):
    return CliRunner().invoke(cli, ["score", *map(str, args)])


@pytest.fixture(scope="module")
def model_args(reference_dir: Path) -> list[str]:
    return ["--checkpoint", str(reference_dir / "tiny_unet.pt"),
            "--model-config", str(reference_dir / "tiny_unet_config.json"),
            "--steps", "2", "--no-progress-bar", "--device", "cpu",
            # conftest sets TRITON_INTERPRET=1, under which `auto` may pick the (slow) interpreted Triton tail.
            "--backend", "torch"]


def crop_into(src: Path, dest: Path, x: int = 200, y: int = 200) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src).crop((x, y, x + SIZE, y + SIZE)).save(dest)
    return dest


@pytest.fixture(scope="module")
def msrs_run(tmp_path_factory, data_dir: Path, model_args) -> dict:
    root = tmp_path_factory.mktemp("score")
    ds = root / "ivf" / "MSRS"
    for stem in MSRS_STEMS:
        for sub in ("ir", "vi"):
            crop_into(data_dir / "ivf/MSRS" / sub / f"{stem}.png", ds / sub / f"{stem}.png")
    out = root / "out"
    res = run([ds, "-o", out, *model_args, "-v"])
    return {"ds": ds, "out": out, "res": res}


def test_scores_equal_evaluate_on_the_fused_images(msrs_run) -> None:
    res, ds, out = msrs_run["res"], msrs_run["ds"], msrs_run["out"]
    assert res.exit_code == 0, res.output
    fused = out / "fused"
    assert sorted(p.name for p in fused.iterdir()) == sorted([f"{s}.png" for s in MSRS_STEMS] + [SUMMARY_NAME])
    doc = json.loads((out / "scores.json").read_text())
    assert doc["dataset"] == "MSRS" and doc["mode"] == "ivf" and doc["count"] == 2
    want = {}
    for stem in MSRS_STEMS:
        f = read_gray_eval(fused / f"{stem}.png")
        assert f.shape == (SIZE, SIZE)
        want[stem] = evaluate(f, read_gray_eval(ds / "ir" / f"{stem}.png"), read_gray_eval(ds / "vi" / f"{stem}.png"))
        assert doc["images"][stem] == pytest.approx(want[stem], rel=1e-12)
    mean = {k: float(np.mean([want[s][k] for s in MSRS_STEMS])) for k in METRIC_NAMES}
    assert doc["mean"] == pytest.approx(mean, rel=1e-12)
    # The paper's row for MSRS, and the delta.
    assert doc["paper"] == PAPER_NUMBERS["MSRS"] and doc["paper_metrics"] == list(PAPER_METRICS)
    assert doc["delta"] == pytest.approx({k: mean[k] - PAPER_NUMBERS["MSRS"][k] for k in PAPER_METRICS})
    assert doc["fusion"]["counts"]["done"] == 2 and doc["fusion"]["settings"]["num_steps"] == 2
    # The printed tables: per image (-v), then mean ± std, the paper's row and the delta, over the paper's six.
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["image", *PAPER_METRICS]
    assert [line.split()[0] for line in lines[1:3]] == list(MSRS_STEMS)
    assert lines[3].split() == ["method", "n", *PAPER_METRICS]
    std = {k: float(np.std([want[s][k] for s in MSRS_STEMS])) for k in METRIC_NAMES}
    assert lines[4].split()[:5] == ["mean", "2", f"{mean['EN']:.2f}", "±", f"{std['EN']:.2f}"]
    assert lines[5].split() == ["paper", "MSRS", *(f"{PAPER_NUMBERS['MSRS'][k]:.2f}" for k in PAPER_METRICS)]
    assert lines[6].startswith("delta")
    # What was compared, and why it is not the paper's protocol (2 steps of a tiny random UNet on 96x96 crops).
    text = " ".join(res.stdout.split())
    assert "compared: 2 pair(s) of MSRS, 96x96, 2 steps of tiny_unet.pt, size policy pad" in text
    assert "the paper's row: its whole MSRS test set at full resolution (640x480), 100 steps of adm256-uncond" in text
    for diff in ("prior tiny_unet.pt (the paper: adm256-uncond", "2 steps (the paper: 100)",
                 "images 96x96, not the dataset's 640x480 (downscaled or cropped)", "size policy pad"):
        assert diff in text, diff
    assert "sanity check, not as a reproduction" in text
    assert doc["compared"]["pairs"] == 2 and doc["compared"]["sizes"] == ["96x96"] and doc["compared"]["steps"] == 2
    assert doc["guide"] == "docs/METRICS.md" and "docs/METRICS.md" in res.stderr
    # scores.csv: one row per image, nothing else; scores_summary.csv: mean (with std), the paper's row, the delta.
    csv_lines = (out / "scores.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(["image", *METRIC_NAMES])
    assert [line.split(",")[0] for line in csv_lines[1:]] == list(MSRS_STEMS)
    summary = (out / "scores_summary.csv").read_text().splitlines()
    assert summary[0].split(",")[:4] == ["method", "count", "EN", "EN_std"]
    assert [line.split(",")[0] for line in summary[1:]] == ["mean", "paper MSRS", "delta"]
    assert float(summary[1].split(",")[2]) == pytest.approx(mean["EN"], rel=1e-12)


def test_resume_and_limit(msrs_run, model_args) -> None:
    out, ds = msrs_run["out"], msrs_run["ds"]
    assert msrs_run["res"].exit_code == 0, msrs_run["res"].output
    before = {p.name: p.stat().st_mtime_ns for p in (out / "fused").glob("*.png")}
    res = run([ds, "-o", out, *model_args, "--limit", "1"])
    assert res.exit_code == 0, res.output
    assert "0 fused, 1 kept" in res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "fused").glob("*.png")} == before  # nothing re-fused
    doc = json.loads((out / "scores.json").read_text())
    assert doc["count"] == 1 and list(doc["images"]) == [MSRS_STEMS[0]]  # only the limited pairs are scored
    assert "00055D" not in res.stdout
    assert "a subset: 1 of the folder's 2 pairs" in " ".join(res.stdout.split())


def test_paper_numbers_are_metrics_md() -> None:
    # The repository's metrics guide lists the paper's table; score's numbers must be that table.
    metrics_md = Path(__file__).resolve().parents[1] / "docs" / "METRICS.md"
    text = metrics_md.read_text().split("## The paper's reported numbers", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    assert rows[0] == ["set", *PAPER_METRICS]
    table = {r[0]: [float(x) for x in r[1:]] for r in rows[2:]}
    keys = {"MSRS": "MSRS", "M3FD": "M3FD", "RoadScene": "RoadScene", "TNO": "TNO", "Harvard (MIF)": "Harvard",
            "RoadScene, EM only, no diffusion prior (ablation I)": "RoadScene-EM-only"}
    assert set(table) == set(keys) and len(PAPER_NUMBERS) == len(keys)
    for label, key in keys.items():
        assert [PAPER_NUMBERS[key][k] for k in PAPER_METRICS] == table[label], label


def test_detection(tmp_path: Path, data_dir: Path) -> None:
    def make(path: Path, *subs: str) -> Path:
        for s in subs:
            (path / s).mkdir(parents=True)
        return path

    pet = make(tmp_path / "mif/MRI_PET", "MRI", "PET")
    assert detect_dataset(pet) == ("Harvard", "mif")
    lay = dataset_layout(pet)
    assert lay.a_dir.name == "PET" and lay.b_dir.name == "MRI" and lay.subset == "MRI_PET"
    assert lay.paper == PAPER_NUMBERS["Harvard"]
    assert detect_dataset(data_dir / "mif/MRI_SPECT") == ("Harvard", "mif")
    assert detect_dataset(data_dir / "ivf/MSRS") == ("MSRS", "ivf")
    assert detect_dataset(data_dir / "ivf/RoadScene") == ("RoadScene", "ivf")
    mine = make(tmp_path / "mine", "ir", "vi")
    assert detect_dataset(mine) == ("mine", "ivf") and dataset_layout(mine).paper is None
    assert detect_dataset(mine, "roadscene") == ("RoadScene", "ivf")
    assert detect_dataset(mine, "RoadScene EM-only") == ("RoadScene-EM-only", "ivf")
    assert detect_dataset(pet, "Harvard (MIF)") == ("Harvard", "mif")
    with pytest.raises(DatasetNameError, match="unknown dataset name"):
        detect_dataset(mine, "Kitti")
    with pytest.raises(DatasetNameError, match="mif"):
        detect_dataset(pet, "MSRS")
    with pytest.raises(DatasetError, match="several functional folders"):
        detect_dataset(make(tmp_path / "two", "MRI", "CT", "PET"))
    with pytest.raises(DatasetError, match="not a dataset folder.*pass one of them"):
        detect_dataset(tmp_path / "mif")


def test_not_a_dataset_is_rejected(tmp_path: Path, model_args) -> None:
    folder = tmp_path / "photos"
    (folder / "misc").mkdir(parents=True)
    out = tmp_path / "out"
    res = run([folder, "-o", out, *model_args])
    assert res.exit_code == 2
    assert "not a dataset folder" in res.output and "ir/ + vi/" in res.output and "MRI/" in res.output
    assert not out.exists()
    res = run([tmp_path / "nope", "-o", out, *model_args])
    assert res.exit_code == 2 and "no such folder" in res.output
    (tmp_path / "empty/ir").mkdir(parents=True)
    (tmp_path / "empty/vi").mkdir()
    res = run([tmp_path / "empty", "-o", out, *model_args])
    assert res.exit_code == 1 and "holds no images" in res.output and not out.exists()
    res = run([tmp_path / "empty", "-o", out, "--dataset", "Nowhere", *model_args])
    assert res.exit_code == 2 and "--dataset" in res.output and "unknown dataset name" in res.output
    res = run([tmp_path / "empty", "-o", out, "--paper", "--size-policy", "pad", *model_args])
    assert res.exit_code == 2 and "--paper" in res.output and "--size-policy pad" in res.output


def test_mif_pair_scored_with_functional_as_a(tmp_path: Path, data_dir: Path, model_args) -> None:
    ds = tmp_path / "MRI_PET"
    for sub in ("MRI", "PET"):
        for stem in ("11", "15"):
            crop_into(data_dir / "mif/MRI_PET" / sub / f"{stem}.png", ds / sub / f"{stem}.png", 80, 80)
    # A bad pair (sizes differ): its fusion fails, the run goes on, the scores are written, exit code 3.
    crop_into(data_dir / "mif/MRI_PET/MRI/15.png", ds / "MRI/12.png", 80, 80)
    Image.open(data_dir / "mif/MRI_PET/PET/15.png").crop((0, 0, 100, 90)).save(ds / "PET/12.png")
    out = tmp_path / "out"
    res = run([ds, "-o", out, *model_args, "--limit", "2"])  # 11 and 12
    assert res.exit_code == 3, res.output
    assert "12: not fused" in res.stderr and "differ in size" in res.stderr
    doc = json.loads((out / "scores.json").read_text())
    assert doc["dataset"] == "Harvard" and doc["mode"] == "mif" and doc["subset"] == "MRI_PET"
    assert doc["paper"] == PAPER_NUMBERS["Harvard"] and doc["count"] == 1
    assert [s["image"] for s in doc["skipped"]] == ["12"] and doc["fusion"]["counts"]["failed"] == 1
    assert Path(doc["folders"]["A"]).name == "PET" and Path(doc["folders"]["B"]).name == "MRI"
    f = read_gray_eval(out / "fused/11.png")
    want = evaluate(f, read_gray_eval(ds / "PET/11.png"), read_gray_eval(ds / "MRI/11.png"))
    assert doc["mean"] == pytest.approx(want, rel=1e-12)
    assert re.search(r"^paper Harvard", res.stdout, re.M)
    assert not (out / "fused/15.png").exists()
    assert os.path.exists(out / "scores.csv")


def test_score_em_only_needs_no_model(tmp_path, data_dir):
    """--prior none (ablation I) fuses with the EM step alone and is scored like any run."""
    from click.testing import CliRunner

    from ddfm_fast.cli import main

    ds = tmp_path / "MSRS"
    for role in ("ir", "vi"):
        (ds / role).mkdir(parents=True)
        Image.open(data_dir / "ivf" / "MSRS" / role / "00004N.png").crop((200, 150, 296, 246)).save(ds / role / "a.png")
    res = CliRunner().invoke(main, ["score", str(ds), "-o", str(tmp_path / "out"), "--prior", "none", "--steps", "3",
                                    "--no-progress-bar"])
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["dataset"] == "MSRS" and len(scores["images"]) == 1


def test_a_data_set_named_by_option_is_said_when_the_folder_is_another(tmp_path: Path) -> None:
    from ddfm_fast.runner import RunConfig
    from ddfm_fast.config import SamplerConfig
    from ddfm_fast.scoring import compare_with_paper

    for s in ("MSRS/ir", "MSRS/vi", "mine/ir", "mine/vi", "RoadScene/ir", "RoadScene/vi"):
        (tmp_path / s).mkdir(parents=True)
    em = RunConfig(sampler=SamplerConfig(prior="none", steps=2, size_policy="crop"))
    diffs = compare_with_paper(dataset_layout(tmp_path / "MSRS", "roadscene-em-only"), em, 3, 3, ("320x240",))
    assert "the folder MSRS/ is MSRS, not RoadScene (named by --dataset)" in diffs.differences
    assert "2 EM iterations (the paper's loop: 100)" in diffs.differences
    diffs = compare_with_paper(dataset_layout(tmp_path / "mine", "RoadScene"),
                               RunConfig(sampler=SamplerConfig.paper()), 3, 3, ())
    assert any("does not say it is RoadScene" in d for d in diffs.differences), diffs.differences
    ok = compare_with_paper(dataset_layout(tmp_path / "RoadScene", "roadscene-em-only"),
                            RunConfig(sampler=SamplerConfig.paper(prior="none", steps=100)), 3, 3, ())
    assert not [d for d in ok.differences if "folder" in d or "iterations" in d], ok.differences


def test_two_folders_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    for s in ("ir", "IR", "vi"):
        (tmp_path / "both" / s).mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds both IR/ and ir/"):
        dataset_layout(tmp_path / "both")
