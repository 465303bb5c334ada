"""Distributed runs (``torchrun ... -m ddfm_fast fuse|eval``) and the sharding behind them (``ddfm_fast.distributed``).

Two kinds of tests:

- sharding, environment detection and summary merging as plain functions (no processes);
- ``test_torchrun_*``: real ``torchrun --standalone`` launches of 2 or 3 CPU ranks (gloo) with the tiny
  random-weight UNet, 2 steps, on 6 pairs of two model sizes (64x64 and 32x32 after padding) of which one is
  corrupt. They are marked ``slow`` (each launch starts 2-3 Python processes: about 10 s on a loaded 2-core
  CPU) and run in CI. Every process runs at one thread (``OMP_NUM_THREADS=1``; the in-process single-process
  reference sets ``torch.set_num_threads(1)``), the thread count at which outputs must be byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import imagefiles
from ddfm_fast import distributed, resume
from ddfm_fast.pairing import InputError, Pair, pair_sources
from ddfm_fast.config import SamplerConfig
from ddfm_fast.runner import RunConfig, run_folder
from ddfm_fast.summary import SUMMARY_NAME, RunSummary
from ddfm_fast.cli import main

MSRS = ("ivf/MSRS/ir/00055D.png", "ivf/MSRS/vi/00055D.png")
# stem -> (x, y, w, h) crops of one MSRS pair: 45x35 pads to 64x64, 30x20 to 32x32 (two batch sizes / shapes)
CROPS = {"a": (0, 150, 45, 35), "b": (100, 150, 45, 35), "c": (200, 200, 45, 35),
         "d": (300, 150, 30, 20), "e": (400, 100, 30, 20)}
GOOD = sorted(CROPS)
BAD = "f"  # its infrared file's header claims 100000 x 100000 pixels: over the pixel cap, refused from the header
TORCHRUN_TIMEOUT_S = 240  # a launch takes ~10 s on a loaded 2-core CPU; this only stops a hung run

torchrun_test = pytest.mark.slow  # launches torchrun: the test_torchrun_* tests


# --------------------------------------------------------------------------------------------------- no processes


def test_env_detection() -> None:
    full = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert distributed.env_from_environ({}) is None
    assert distributed.env_from_environ({**full, "WORLD_SIZE": "1", "RANK": "0"}) is None  # torchrun with 1 proc
    env = distributed.env_from_environ(full)
    assert env == distributed.DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2) and not env.is_main
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK"):
        distributed.env_from_environ({"WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="RANK=4 is outside"):
        distributed.env_from_environ({**full, "RANK": "4"})
    assert distributed.choose_device(env, "cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert distributed.choose_device(env) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.choose_device(env, "cuda")


def test_lpt_shards_deterministic_balanced_ties_by_key() -> None:
    rng = np.random.default_rng(0)
    keys = [f"{i:05d}" for i in range(200)]
    costs = [int(c) for c in rng.choice([640 * 512, 1280 * 1024, 256 * 256, 0], size=200)]
    for world in (1, 2, 3, 7, 250):
        shards = distributed.lpt_shards(keys, costs, world)
        assert len(shards) == world
        assert sorted(i for s in shards for i in s) == list(range(200))  # each item exactly once
        assert all(s == sorted(s, key=lambda i: keys[i]) for s in shards)
        loads = [sum(costs[i] for i in s) for s in shards]
        assert max(loads) - min(loads) <= max(costs)  # the LPT bound
        # Deterministic, whatever order the items come in.
        perm = rng.permutation(200)
        again = distributed.lpt_shards([keys[i] for i in perm], [costs[i] for i in perm], world)
        assert [sorted(keys[perm[i]] for i in s) for s in again] == [sorted(keys[i] for i in s) for s in shards]
    # Equal costs: taken in key order, each to the least-loaded, lowest rank.
    assert distributed.lpt_shards(["b", "a", "d", "c"], [1, 1, 1, 1], 2) == [[1, 3], [0, 2]]
    # Largest first: one big image balances three small ones.
    assert distributed.lpt_shards(["s1", "s2", "s3", "big"], [1, 1, 1, 3], 2) == [[3], [0, 1, 2]]
    with pytest.raises(ValueError):
        distributed.lpt_shards(["a"], [1], 0)


def test_image_pixels(tmp_path: Path) -> None:
    Image.new("L", (45, 35)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    assert distributed.image_pixels(tmp_path / "a.png") == 64 * 64
    assert distributed.image_pixels(tmp_path / "a.png", "crop") == 32 * 32
    assert distributed.image_pixels(tmp_path / "a.png", multiple=1) == 45 * 35
    assert distributed.image_pixels(tmp_path / "bad.png") == 0
    assert distributed.image_pixels(tmp_path / "missing.png") == 0


class _Shard:
    """A coordinator that records what it is asked to shard and gives this process nothing (another rank does
    them: nothing is fused here, so no model is needed)."""

    rank, world_size, is_main = 0, 2, True

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def agree(self, error, todo):
        if error is not None:
            raise error
        return todo

    def shard(self, todo: list[Pair]) -> list[Pair]:
        self.seen.append([p.stem for p in todo])
        return []

    def gather(self, obj):
        return [obj, obj]  # the other rank computes the same identity


class _OtherModel(_Shard):
    """Rank 1 would fuse with another model under the same checkpoint name (another file at that path)."""

    def gather(self, obj):
        return [obj, {**obj, "model_digest": "0123456789abcdef"}]


def test_run_folder_shards_only_pending_pairs(tmp_path: Path) -> None:
    """Resume happens before sharding: the shard hook never sees a pair whose output is verified, and a kill's
    temporary file is removed first."""
    ir_dir, vis_dir, out = tmp_path / "ir", tmp_path / "vis", tmp_path / "out"
    for folder in (ir_dir, vis_dir, out):
        folder.mkdir()
    for stem in "xyz":
        Image.new("L", (8, 8)).save(ir_dir / f"{stem}.png")
        Image.new("L", (8, 8)).save(vis_dir / f"{stem}.png")
    run = RunConfig(sampler=SamplerConfig(prior="none", steps=1))
    # y was done by an earlier (killed) run: its output and the record it journaled before the rename.
    first = run_folder(None, pair_sources(ir_dir, vis_dir).limit(2), out, run, device=torch.device("cpu"),
                       write_summary=False)
    assert [d["stem"] for d in first.done] == ["x", "y"]
    (out / "x.png").unlink()
    (out / ".z.abc.png.part").write_bytes(b"half")  # a write that a kill interrupted: not an output
    coordinator = _Shard()
    summary = run_folder(None, pair_sources(ir_dir, vis_dir), out, run, device=torch.device("cpu"),
                         coordinator=coordinator, write_summary=False)
    assert coordinator.seen == [["x", "z"]]
    assert [s["stem"] for s in summary.skipped] == ["y"] and not summary.done and not summary.failed
    assert summary.complete and not (out / SUMMARY_NAME).exists()
    assert not (out / ".z.abc.png.part").exists() and not (out / ".ddfm-fast.lock").exists()
    # Every pending pair lands on exactly one rank, whatever the world size.
    for world in (1, 2, 3, 5):
        shards = distributed.lpt_shards(["x", "z"], [64, 64], world)
        assert sorted(i for s in shards for i in s) == [0, 1]


def test_ranks_that_would_fuse_differently_stop_the_run_before_anything_is_written(tmp_path: Path) -> None:
    ir_dir, vis_dir, out = tmp_path / "ir", tmp_path / "vis", tmp_path / "out"
    for folder in (ir_dir, vis_dir, out):
        folder.mkdir()
    Image.new("L", (8, 8)).save(ir_dir / "x.png")
    Image.new("L", (8, 8)).save(vis_dir / "x.png")
    run = RunConfig(sampler=SamplerConfig(prior="none", steps=1))
    with pytest.raises(InputError, match=r"^rank 1 would fuse with other settings than rank 0 \(model_digest None -> "
                                         r"'0123456789abcdef'\): every rank must load the same model file"):
        run_folder(None, pair_sources(ir_dir, vis_dir), out, run, device=torch.device("cpu"),
                   coordinator=_OtherModel(), write_summary=False)
    assert sorted(p.name for p in out.iterdir()) == []  # no output, no journal, the lock released


def test_merge_summaries() -> None:
    def part(done: list[str], failed: list[str], fusion_s: float, wall_s: float,
             fallbacks: tuple[str, ...] = ()) -> RunSummary:
        s = RunSummary(settings={"seed": 1}, inputs={"ir": "A"}, output_dir="O", complete=True,
                       fusion_s=fusion_s, wall_s=wall_s, plan={"dtype": "fp32", "fallbacks": list(fallbacks)})
        s.done = [{"stem": k} for k in done]
        s.failed = [{"stem": k, "reason": "bad"} for k in failed]
        return s

    rank0 = part(["c", "a"], [], 2.0, 3.0)
    rank0.skipped = [{"stem": "z"}]
    rank0.unpaired = [{"file": "u.png", "reason": "alone"}]
    parts = [(rank0, {"host": "h0", "device": "cuda:0"}), (part(["b"], ["f"], 0.5, 4.0, ("compile given up: x",)), {"host": "h0"})]
    doc = distributed.merge_summaries(parts, plan={"pairs": [2, 2], "pixels": [8, 5]}, backend="nccl")
    assert [d["stem"] for d in doc["done"]] == ["a", "b", "c"] and [d["rank"] for d in doc["done"]] == [0, 1, 0]
    assert doc["failed"] == [{"stem": "f", "reason": "bad", "rank": 1}]
    assert doc["counts"] == {"pairs": 5, "done": 3, "skipped": 1, "failed": 1, "pending": 0, "unpaired": 1,
                             "ignored": 0, "outputs": 0}
    assert doc["timing"]["wall_s"] == 4.0 and doc["timing"]["fusion_s"] == 2.5
    assert doc["timing"]["images_per_s"] == 1.0 + 2.0 and doc["timing"]["images_per_wall_s"] == 0.75
    ranks = doc["distributed"]["ranks"]
    assert doc["distributed"]["world_size"] == 2 and doc["distributed"]["backend"] == "nccl"
    assert [(r["rank"], r["done"], r["failed"], r["pairs_assigned"]) for r in ranks] == [(0, 2, 0, 2), (1, 1, 1, 2)]
    assert ranks[0]["device"] == "cuda:0" and ranks[1]["images_per_s"] == 2.0
    # The summary's plan is rank 0's; a fast path another rank gave up is recorded with its rank.
    assert doc["plan"]["fallbacks"] == ["rank 1: compile given up: x"] and ranks[1]["fallbacks"] == ["compile given up: x"]


def test_single_pair_under_torchrun_is_a_usage_error(tmp_path: Path, monkeypatch) -> None:
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    Image.new("L", (8, 8)).save(tmp_path / "ir.png")
    Image.new("L", (8, 8)).save(tmp_path / "vis.png")
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "ir.png"), str(tmp_path / "vis.png"),
                                    "-o", str(tmp_path / "o.png"), "--checkpoint", "x"])
    assert res.exit_code == 2 and "single pair without torchrun" in res.output


# --------------------------------------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def model_args(reference_dir: Path) -> list[str]:
    return ["--checkpoint", str(reference_dir / "tiny_unet.pt"),
            "--model-config", str(reference_dir / "tiny_unet_config.json"),
            "--steps", "2", "--no-progress-bar", "--backend", "torch"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, data_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist_data")
    ir_dir, vis_dir = root / "ir", root / "vis"
    ir_dir.mkdir()
    vis_dir.mkdir()
    ir, vis = Image.open(data_dir / MSRS[0]), Image.open(data_dir / MSRS[1])
    for stem, (x, y, w, h) in CROPS.items():
        ir.crop((x, y, x + w, y + h)).save(ir_dir / f"{stem}.png")
        vis.crop((x, y, x + w, y + h)).save(vis_dir / f"{stem}.png")
    (ir_dir / f"{BAD}.png").write_bytes(imagefiles.png_claiming(100_000, 100_000))
    vis.crop((0, 0, 45, 35)).save(vis_dir / f"{BAD}.png")
    return ir_dir, vis_dir


@pytest.fixture(scope="module")
def single(tmp_path_factory, dataset, model_args) -> Path:
    """The single-process run (in this process, at one thread) that the distributed runs must reproduce."""
    ir_dir, vis_dir = dataset
    out = tmp_path_factory.mktemp("dist_single") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(main, ["fuse", "--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(out),
                                        *model_args])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 3, res.output  # the bad pair
    assert sorted(p.name for p in out.glob("*.png")) == [f"{s}.png" for s in GOOD]
    return out


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           "-m", "ddfm_fast", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)


def _summary(out: Path) -> dict:
    return json.loads((out / SUMMARY_NAME).read_text())


def _assert_same_outputs(out: Path, single: Path) -> None:
    assert sorted(p.name for p in out.glob("*.png")) == [f"{s}.png" for s in GOOD]
    for stem in GOOD:
        assert (out / f"{stem}.png").read_bytes() == (single / f"{stem}.png").read_bytes(), stem


@torchrun_test
def test_torchrun_fuse_matches_single_process_and_reports_bad_pair(tmp_path: Path, dataset, single,
                                                                   model_args) -> None:
    ir_dir, vis_dir = dataset
    out = tmp_path / "out"
    res = torchrun(2, ["fuse", "--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(out), *model_args])
    log = res.stdout + res.stderr
    # The ranks met after the summary was written and exit 3 (a pair failed). torchrun stops the group at the
    # first non-zero exit (the others may show as SIGTERM while exiting) and itself exits 1.
    assert res.returncode != 0, log
    assert "exitcode  : 3" in log, log
    assert "5 fused, 0 skipped (output exists), 1 failed, 0 unpaired file(s) on 2 ranks; " in log, log
    _assert_same_outputs(out, single)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    s = _summary(out)
    assert s["complete"] and s["counts"] == {"pairs": 6, "done": 5, "skipped": 0, "failed": 1, "pending": 0,
                                             "unpaired": 0, "ignored": 0, "outputs": 5}
    assert sorted(s["outputs"]) == [f"{k}.png" for k in GOOD]  # each with what made it
    assert not [p for p in out.iterdir() if p.name.startswith(".ddfm-fast")]  # journals and lock gone
    assert [d["stem"] for d in s["done"]] == GOOD  # each pair exactly once
    # The shards are LPT over the padded pixel counts (a, b, c: 64*64; d, e: 32*32; f unreadable: 0).
    stems = GOOD + [BAD]
    expect = distributed.lpt_shards(stems, [64 * 64] * 3 + [32 * 32] * 2 + [0], 2)
    rank_of = {stems[i]: r for r, shard in enumerate(expect) for i in shard}
    assert {d["stem"]: d["rank"] for d in s["done"]} == {k: rank_of[k] for k in GOOD}
    (failure,) = s["failed"]
    assert failure["stem"] == BAD and failure["rank"] == rank_of[BAD] and failure["reason"].startswith(str(dataset[0] / f"{BAD}.png"))
    dist_info = s["distributed"]
    assert dist_info["world_size"] == 2 and dist_info["backend"] == "gloo"
    ranks = dist_info["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["device"] == "cpu" and r["threads"] == 1 for r in ranks)
    for r in ranks:
        assert r["done"] == sum(d["rank"] == r["rank"] for d in s["done"]) and r["images_per_s"] > 0
        assert r["pairs_assigned"] == len(expect[r["rank"]])
    assert sum(r["done"] for r in ranks) == 5 and sum(r["failed"] for r in ranks) == 1
    assert s["timing"]["images_per_s"] == pytest.approx(sum(r["images_per_s"] for r in ranks), abs=1e-3)
    assert s["settings"]["run"]["batch_size"] == 1 and s["settings"]["num_steps"] == 2
    assert s["plan"]["backend"] == "torch" and s["plan"]["fallbacks"] == []
    assert f"failed (rank {rank_of[BAD]}): {BAD}" in log and "on 2 ranks" in log


@torchrun_test
def test_torchrun_resume_with_another_world_size(tmp_path: Path, dataset, single, model_args) -> None:
    """A killed run left two outputs with their journaled records and a temporary file; three ranks finish it: no
    pair twice, none lost, the kill's records kept in the summary."""
    ir_dir, vis_dir = dataset
    out = tmp_path / "out"
    out.mkdir()
    made = _summary(single)
    journal = [{"journal": 1, "settings": made["settings_digest"],
                "identity": made["identities"][made["settings_digest"]]}]
    for stem in ("a", "d"):
        shutil.copy2(single / f"{stem}.png", out / f"{stem}.png")
        journal.append({"record": {**made["outputs"][f"{stem}.png"], "output": str(out / f"{stem}.png")}})
    (out / ".ddfm-fast-journal.killed.jsonl").write_text("".join(json.dumps(j) + "\n" for j in journal))
    (out / ".b.k1ll3d.png.part").write_bytes(b"\x89PNG half written")
    before = {stem: (out / f"{stem}.png").stat().st_mtime_ns for stem in ("a", "d")}
    res = torchrun(3, ["fuse", "--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(out), *model_args])
    log = res.stdout + res.stderr
    assert res.returncode != 0 and "exitcode  : 3" in log, log
    _assert_same_outputs(out, single)
    assert {stem: (out / f"{stem}.png").stat().st_mtime_ns for stem in ("a", "d")} == before  # not redone
    s = _summary(out)
    assert [k["stem"] for k in s["skipped"]] == ["a", "d"]
    assert [d["stem"] for d in s["done"]] == ["b", "c", "e"] and [f["stem"] for f in s["failed"]] == [BAD]
    assert s["distributed"]["world_size"] == 3
    assert [r["pairs_assigned"] for r in s["distributed"]["ranks"]] == [1, 1, 2]  # b | c | e + f (LPT)
    assert s["counts"]["pairs"] == 6 and sorted(s["outputs"]) == [f"{k}.png" for k in GOOD]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # journals, lock and the .part file gone


@torchrun_test
def test_torchrun_refuses_a_locked_folder(tmp_path: Path, dataset, model_args) -> None:
    """Another run holds the output folder: every rank ends with one line naming it, before loading a model."""
    ir_dir, vis_dir = dataset
    out = tmp_path / "out"
    with resume.FolderLock(out):
        res = torchrun(2, ["fuse", "--ir-dir", str(ir_dir), "--vis-dir", str(vis_dir), "-o", str(out), *model_args])
    log = res.stdout + res.stderr
    assert res.returncode != 0 and "exitcode  : 1" in log, log
    # Each rank says it in one line; the one traceback is torchrun's own report of a failed worker.
    assert log.count(f"Error: output folder {out} is being written by another ddfm-fast run (pid {os.getpid()} "
                     "on ") == 2, log
    assert log.count("Traceback") == 1 and "ChildFailedError" in log, log
    assert not out.exists()  # nothing written: the folder the test's lock made went with the lock


def _eval_image(seed: int, hw: tuple[int, int]) -> Image.Image:
    """A deterministic 8-bit image with a ramp and texture (the metrics need at least 65x65 pixels)."""
    y, x = np.mgrid[0 : hw[0], 0 : hw[1]]
    tex = np.random.default_rng(seed).integers(0, 40, hw)
    return Image.fromarray(np.clip((x * (2 + seed) + y * 3) % 256 + tex, 0, 255).astype(np.uint8))


@torchrun_test
def test_torchrun_eval_matches_single_process(tmp_path: Path) -> None:
    """Five triples of two sizes, a corrupt fused image (a rank's skip) and a fused image without sources."""
    folders = {name: tmp_path / name for name in ("fused", "ir", "vis")}
    for folder in folders.values():
        folder.mkdir()
    for i, stem in enumerate("abcde"):
        hw = (72, 80) if i % 2 else (66, 70)
        for k, name in enumerate(folders):
            _eval_image(3 * i + k, hw).save(folders[name] / f"{stem}.png")
    (folders["fused"] / "c.png").write_bytes(b"\x89PNG broken")
    _eval_image(99, (66, 70)).save(folders["fused"] / "lonely.png")
    args = ["eval", "--fused", str(folders["fused"]), "--ir-dir", str(folders["ir"]), "--vis-dir", str(folders["vis"])]
    one = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    res = torchrun(2, [*args, "-o", str(tmp_path / "two")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == one.stdout  # rank 0 alone prints the table, the one a single process prints
    for suffix in (".csv", ".json"):
        assert (tmp_path / f"two{suffix}").read_text() == (tmp_path / f"one{suffix}").read_text()
    doc = json.loads((tmp_path / "two.json").read_text())
    assert sorted(_first(doc, "images")) == ["a", "b", "d", "e"]
    assert [s["image"] for s in _first(doc, "skipped")] == ["c", "lonely"]


def _first(doc, key: str):
    """The first value under ``key`` in a nested JSON document (the eval report may group it per method)."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        for value in doc.values():
            found = _first(value, key)
            if found is not None:
                return found
    return None
