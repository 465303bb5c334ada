"""``ddfm_fast.runner``: the run type, the resume identity derived from the configs, resume decisions, batching."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddfm_fast import api, outputs, resume
from ddfm_fast.config import AccelConfig, ConfigError, SamplerConfig
from ddfm_fast.pairing import Pair
from ddfm_fast.plan import plan
from ddfm_fast.runner import (
    DEFAULT_PRIOR,
    RunConfig,
    StaleOutputsError,
    output_identity,
    plan_resume,
    read_pair,
    size_buckets,
)
from ddfm_fast.summary import SUMMARY_NAME, SUMMARY_SCHEMA


def test_identity_is_every_sampler_field_and_the_output_fields() -> None:
    run = RunConfig(sampler=SamplerConfig(steps=5), accel=AccelConfig(dtype="bf16", compile=True))
    identity = run.identity(plan("cpu", run.accel))
    sampler_fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    assert sampler_fields <= set(identity)  # a new SamplerConfig field is covered by being a field
    assert set(identity) - sampler_fields == {"mode", "output", "resize", "checkpoint", "model_config", "file_format",
                                              "model_digest", "unet_dtype"}
    assert identity["unet_dtype"] == "bf16" and identity["checkpoint"] == "ddfm-shrink"  # None: the shipped prior
    assert identity["file_format"] == "png"
    # Accelerations other than the dtype, and the batch size, change float rounding only.
    fast = dataclasses.replace(run, accel=AccelConfig(dtype="bf16", channels_last=True, backend="torch"), batch_size=4)
    assert fast.identity(plan("cpu", fast.accel)) == identity
    em = RunConfig(sampler=SamplerConfig(prior="none"))
    assert em.identity(plan("cpu", AccelConfig(dtype="fp16")))["unet_dtype"] is None  # no UNet
    assert em.identity(None)["checkpoint"] is None
    # The identity read back from a summary equals the one computed from the run.
    doc = json.loads(json.dumps({"settings": run.to_dict(), "plan": plan("cpu", run.accel).to_dict()}))
    assert output_identity(doc["settings"], doc["plan"]) == identity
    assert DEFAULT_PRIOR == api.DEFAULT_PRIOR  # the runner names the shipped prior without importing the api


def test_file_format_follows_the_output_kind() -> None:
    assert RunConfig().suffix == ".png" and RunConfig(output="npy").suffix == ".npy"
    assert RunConfig(output="png16", file_format="tiff").suffix == ".tif"
    assert RunConfig(file_format="jpeg").suffix == ".jpg"
    assert RunConfig(output="color", file_format="bmp").suffix == ".bmp"
    with pytest.raises(ConfigError, match=r"16-bit raw output is written as \.png or \.tif, not \.jpg"):
        RunConfig(output="png16", file_format="jpeg")
    with pytest.raises(ConfigError, match="raw float output"):
        RunConfig(output="npy", file_format="png")
    with pytest.raises(ConfigError, match="colour output"):
        RunConfig(output="color", file_format="npy")


def test_model_names_are_absolute(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "w.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert RunConfig(checkpoint="w.pt").to_dict()["run"]["checkpoint"] == str(tmp_path / "w.pt")
    assert RunConfig(checkpoint="adm256-uncond").to_dict()["run"]["checkpoint"] == "adm256-uncond"


# --------------------------------------------------------------------------------------------------- resume


def _pair_files(root: Path, stem: str, value: int = 100, size: tuple[int, int] = (40, 30)) -> Pair:
    for side in ("ir", "vis"):
        (root / side).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(size[::-1], value, np.uint8)).save(root / side / f"{stem}.png")
    return Pair.of(root / "ir" / f"{stem}.png", root / "vis" / f"{stem}.png")


def _write_with_record(pair: Pair, dest: Path, run: RunConfig, identity: dict) -> dict:
    """An output as a folder run writes it, with the record it journals."""
    printed = outputs.write_output(np.full((30, 40), 7, np.uint8), dest, run.file_format)
    return {"stem": pair.stem, "ir": str(pair.ir), "vis": str(pair.vis), "output": str(dest),
            "settings": resume.settings_digest(identity),
            "inputs_sha256": {"ir": outputs.fingerprint(pair.ir).sha256, "vis": outputs.fingerprint(pair.vis).sha256},
            "output_sha256": printed.sha256, "output_bytes": printed.bytes}


def _records(*recs: dict, identity: dict) -> resume.FolderRecords:
    return resume.FolderRecords(outputs={Path(r["output"]).name: r for r in recs},
                                identities={resume.settings_digest(identity): identity})


def test_plan_resume_keeps_only_verified_outputs(tmp_path: Path) -> None:
    run = RunConfig(sampler=SamplerConfig(steps=3))
    identity = run.identity(plan("cpu", run.accel))
    out = tmp_path / "out"
    out.mkdir()
    pairs = {s: _pair_files(tmp_path, s) for s in ("good", "changed", "other", "empty", "text", "stray", "dir", "new")}
    recs = [_write_with_record(pairs[s], out / f"{s}.png", run, identity) for s in ("good", "changed", "other")]
    # "changed": its infrared file was edited since; "other": made from another data set's files of that stem.
    Image.fromarray(np.full((30, 40), 5, np.uint8)).save(pairs["changed"].ir)
    recs[2] = {**recs[2], "ir": str(tmp_path / "elsewhere/ir/other.png"), "inputs_sha256": {"ir": "0" * 64,
                                                                                         "vis": "1" * 64}}
    (out / "empty.png").write_bytes(b"")
    (out / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(out / "stray.png")  # an image no record accounts for
    (out / "dir.png").mkdir()
    decided = plan_resume(pairs.values(), out, run, identity, _records(*recs, identity=identity))
    assert [p.stem for p in decided.todo] == ["changed", "empty", "text", "new"]
    assert [s["stem"] for s in decided.skipped] == ["good"] and "good.png" in decided.kept
    reasons = {f["stem"]: f["reason"] for f in decided.refused}
    assert sorted(reasons) == ["dir", "other", "stray"]
    assert "was made from other input files" in reasons["other"] and "elsewhere" in reasons["other"]
    assert "no record in the folder says what made it" in reasons["stray"] and "--overwrite" in reasons["stray"]
    assert "is a folder" in reasons["dir"]
    replaced = {r["stem"]: r["reason"] for r in decided.replaced}
    assert "its input changed" in replaced["changed"] and "ir file's bytes differ" in replaced["changed"]
    assert "is empty (0 bytes)" in replaced["empty"] and "does not open as png" in replaced["text"]
    # The output changed after it was written (a byte flipped): no longer verified, and not replaced either.
    data = bytearray((out / "good.png").read_bytes())
    data[-20] ^= 0xFF
    (out / "good.png").write_bytes(bytes(data))
    again = plan_resume([pairs["good"]], out, run, identity, _records(*recs, identity=identity))
    assert not again.skipped and "changed since ddfm-fast wrote it" in again.refused[0]["reason"]
    # --overwrite redoes everything that can be replaced; a folder in the way still fails its pair.
    forced = plan_resume(pairs.values(), out, run, identity, _records(*recs, identity=identity), overwrite=True)
    assert [f["stem"] for f in forced.refused] == ["dir"] and len(forced.todo) == len(pairs) - 1


def test_plan_resume_refuses_outputs_of_other_settings(tmp_path: Path) -> None:
    run = RunConfig(sampler=SamplerConfig(steps=3))
    identity = run.identity(plan("cpu", run.accel))
    out = tmp_path / "out"
    out.mkdir()
    pairs = [_pair_files(tmp_path, s) for s in "ab"]
    recs = [_write_with_record(p, out / f"{p.stem}.png", run, identity) for p in pairs]
    other = RunConfig(sampler=SamplerConfig(steps=3, seed=1, lamb=0.25))
    with pytest.raises(StaleOutputsError, match=r"2 output\(s\) made with other settings \(lamb 0.5 -> 0.25; "
                                                r"seed 3407 -> 1\); rerun with --overwrite"):
        plan_resume(pairs, out, other, other.identity(plan("cpu", other.accel)), _records(*recs, identity=identity))
    for problem in ("x.json was written by another version", "x.json cannot be read"):
        with pytest.raises(StaleOutputsError, match="cannot be checked"):
            plan_resume(pairs, out, run, identity, resume.FolderRecords(problem=problem))


def test_another_model_under_the_same_name_is_not_trusted(tmp_path: Path, tiny_unet_files) -> None:
    """The identity holds what the model computes, not only its name: the shipped prior with another contrast, or a
    weights file replaced at its path, makes outputs that a resume must not take for this run's."""
    from ddfm_fast.checkpoint import load_model
    from ddfm_fast.shrinkage import ShrinkagePrior

    assert RunConfig(sampler=SamplerConfig(steps=3)).for_model(ShrinkagePrior()).model_digest is None  # not asked
    run = RunConfig(sampler=SamplerConfig(steps=3)).for_model(ShrinkagePrior(), digest=True)
    assert run.model_digest == resume.model_digest(ShrinkagePrior())
    other = RunConfig(sampler=SamplerConfig(steps=3)).for_model(ShrinkagePrior(contrast=0.3), digest=True)
    assert other.model_digest != run.model_digest and other.checkpoint == run.checkpoint is None
    identity = run.identity(plan("cpu", run.accel))
    out = tmp_path / "out"
    out.mkdir()
    pairs = [_pair_files(tmp_path, "a")]
    recs = [_write_with_record(pairs[0], out / "a.png", run, identity)]
    with pytest.raises(StaleOutputsError, match=r"1 output\(s\) made with other settings \(model_digest "):
        plan_resume(pairs, out, other, other.identity(plan("cpu", other.accel)), _records(*recs, identity=identity))
    # Weights: one changed value anywhere changes the digest; the same weights on a copy of the model do not.
    net = load_model(tiny_unet_files[0], config=tiny_unet_files[1])
    digest = resume.model_digest(net)
    assert resume.model_digest(copy.deepcopy(net)) == digest
    # The same weights in another memory layout are the same model (the bytes are hashed in logical order).
    assert resume.model_digest(copy.deepcopy(net).to(memory_format=torch.channels_last)) == digest
    with torch.no_grad():
        next(reversed(list(net.parameters()))).view(-1)[-1] += 1e-3
    assert resume.model_digest(net) != digest
    assert RunConfig(sampler=SamplerConfig(prior="none")).for_model(None, digest=True).model_digest is None
    # Outputs recorded before the digest existed cannot be vouched for: the refusal says so in words.
    old_identity = {k: v for k, v in identity.items() if k != "model_digest"}
    with pytest.raises(StaleOutputsError, match="did not record which model"):
        plan_resume(pairs, out, run, identity, _records(*[_write_with_record(pairs[0], out / "a.png", run,
                                                                            old_identity)], identity=old_identity))


def test_progress_images_of_em_only_are_refused_by_the_library_too(tmp_path: Path) -> None:
    from ddfm_fast.pairing import InputError
    from ddfm_fast.runner import run_single

    pair = _pair_files(tmp_path, "a")
    with pytest.raises(InputError, match="EM only .* has none"):
        run_single(None, pair, tmp_path / "a.png", RunConfig(sampler=SamplerConfig(prior="none", steps=3)),
                   device=torch.device("cpu"), progress_dir=tmp_path / "steps")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "steps").exists()


def test_load_records_reads_summaries_and_journals(tmp_path: Path) -> None:
    assert resume.load_records(tmp_path, SUMMARY_NAME).problem is None  # an empty folder
    (tmp_path / SUMMARY_NAME).write_text(json.dumps({"schema": 2}))
    assert "schema 2" in resume.load_records(tmp_path, SUMMARY_NAME).problem
    (tmp_path / SUMMARY_NAME).write_text("{broken")
    assert "cannot be read" in resume.load_records(tmp_path, SUMMARY_NAME).problem
    doc = {"schema": SUMMARY_SCHEMA, "outputs": {"a.png": {"output": "a.png", "stem": "a"}}, "identities": {},
           "runs": [{"started": "t0"}]}
    (tmp_path / SUMMARY_NAME).write_text(json.dumps(doc))
    journal = resume.Journal(tmp_path, "t1-1-r0", {"seed": 1}, "d1")
    journal.append({"output": str(tmp_path / "b.png"), "stem": "b"})
    journal.close()
    with open(journal.path, "a") as fh:
        fh.write('{"record": {"output": "c.pn')  # a write cut by a kill
    records = resume.load_records(tmp_path, SUMMARY_NAME)
    assert records.problem is None and set(records.outputs) == {"a.png"} and set(records.journaled) == {"b.png"}
    assert records.identities == {"d1": {"seed": 1}} and records.runs == [{"started": "t0"}]
    assert set(records.all_records()) == {"a.png", "b.png"}


def test_stale_parts_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".a.k1ll3d.png.part").write_bytes(b"half")
    (tmp_path / ".ddfm_summary.x.json.part").write_bytes(b"{")
    (tmp_path / "keep.part").write_bytes(b"a user's file: not hidden, not ours")
    (tmp_path / ".dir.part").mkdir()
    assert resume.remove_stale_parts(tmp_path) == [".a.k1ll3d.png.part", ".ddfm_summary.x.json.part"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dir.part", "keep.part"]


def test_folder_lock_excludes_a_second_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with resume.FolderLock(out) as lock:
        assert lock.held and (out / resume.LOCK_NAME).exists()
        info = json.loads((out / resume.LOCK_NAME).read_text())
        with pytest.raises(resume.FolderBusyError, match=rf"output folder {out} is being written by another "
                                                         rf"ddfm-fast run \(pid {info['pid']} on "):
            resume.FolderLock(out).acquire()  # its own open file description: flock locks it out
    assert not out.exists()  # created by the lock, left empty: removed again
    out.mkdir()
    with resume.FolderLock(out):
        (out / "x.png").write_bytes(b"1")
    assert [p.name for p in out.iterdir()] == ["x.png"]  # the lock file goes, the folder and outputs stay
    with resume.FolderLock(out):  # free again
        pass


def test_pending_pairs_and_size_buckets(tmp_path: Path) -> None:
    sizes = {"a": (40, 30), "b": (50, 20), "c": (70, 30), "d": (40, 30)}
    pairs = [_pair_files(tmp_path, s, size=wh) for s, wh in sizes.items()]
    items = [read_pair(p, RunConfig()) for p in pairs]
    assert [i.model_hw for i in items] == [(32, 64), (32, 64), (32, 96), (32, 64)]
    assert items[0].inputs_sha256 == {"ir": outputs.fingerprint(pairs[0].ir).sha256,
                                      "vis": outputs.fingerprint(pairs[0].vis).sha256}
    batches = [[i.pair.stem for i in b] for b in size_buckets(items, 2)]
    assert batches == [["a", "b"], ["c"], ["d"]]  # a full bucket goes at once, the rest at the end


def test_case_folding_file_systems_do_not_merge_two_outputs(tmp_path: Path) -> None:
    run = RunConfig(sampler=SamplerConfig(steps=3))
    identity = run.identity(plan("cpu", run.accel))
    pairs = [_pair_files(tmp_path / "x", "A"), _pair_files(tmp_path / "y", "a")]
    decided = plan_resume(pairs, tmp_path / "out", run, identity, resume.FolderRecords(), fold_case=True)
    assert [p.stem for p in decided.todo] == ["A"]
    assert "output a.png and A.png are one file" in decided.refused[0]["reason"]
    assert len(plan_resume(pairs, tmp_path / "out", run, identity, resume.FolderRecords()).todo) == 2
    (tmp_path / "probe").write_text("")
    assert resume.case_insensitive(tmp_path) == (tmp_path / "PROBE").exists()  # what this file system does
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ddfm-fast-case-probe")]


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path: Path) -> None:
    (tmp_path / resume.LOCK_NAME).write_text('{"pid": 1, "host": "gone"}')  # SIGKILL leaves the file, not the lock
    with resume.FolderLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / resume.LOCK_NAME).read_text())["pid"] != 1
    assert not (tmp_path / resume.LOCK_NAME).exists()


def test_an_interrupt_dropped_in_a_finalizer_still_stops_a_folder_run(tmp_path: Path) -> None:
    """The CLI's SIGTERM handler raises wherever the signal lands; in a finalizer Python drops the exception. The
    handler notes the signal first, and the folder run stops at its next pair all the same."""
    import signal

    from ddfm_fast.pairing import pair_sources
    from ddfm_fast.runner import RunInterrupted, note_signal, run_folder

    for stem in "abc":
        _pair_files(tmp_path, stem)
    run = RunConfig(sampler=SamplerConfig(prior="none", steps=1))
    note_signal(signal.SIGTERM)  # as if its Interrupted had been raised inside a __del__ and dropped
    with pytest.raises(RunInterrupted) as caught:
        run_folder(None, pair_sources(tmp_path / "ir", tmp_path / "vis"), tmp_path / "out", run,
                   device=torch.device("cpu"))
    assert caught.value.signum == signal.SIGTERM and "interrupted by SIGTERM" in caught.value.message
    assert caught.value.summary.complete is False and caught.value.summary.pending == 3
    # Seen once: the rerun resumes and finishes.
    done = run_folder(None, pair_sources(tmp_path / "ir", tmp_path / "vis"), tmp_path / "out", run,
                      device=torch.device("cpu"))
    assert done.complete and [d["stem"] for d in done.done] == ["a", "b", "c"]


def test_the_same_weights_under_another_architecture_are_another_model() -> None:
    """A UNet's architecture is its config, not its weights: the same state dict read as v-prediction, or with
    other attention heads, computes another output, so it must digest differently."""
    from ddfm_fast.unet import UNetConfig, UNetModel

    cfg = UNetConfig(image_size=32, model_channels=16, num_res_blocks=1, channel_mult=(1, 2),
                     attention_resolutions=(2,), num_heads=1, norm_groups=8)
    torch.manual_seed(0)
    a = UNetModel(cfg).eval()
    digests = {resume.model_digest(a)}
    for change in (dict(prediction="v"), dict(num_heads=4)):
        b = UNetModel(dataclasses.replace(cfg, **change)).eval()
        b.load_state_dict(a.state_dict())
        digests.add(resume.model_digest(b))
    assert len(digests) == 3


def _folder(tmp_path: Path, stems: str = "abc"):
    from ddfm_fast.pairing import pair_sources

    for stem in stems:
        if not (tmp_path / "ir" / f"{stem}.png").exists():  # made once: a test edits them between runs
            _pair_files(tmp_path, stem, value=60 + 40 * "abc".index(stem))
    return pair_sources(tmp_path / "ir", tmp_path / "vis")


def test_a_redo_that_does_not_happen_keeps_the_old_output_record(tmp_path: Path) -> None:
    """Until a redone output is written, the file on disk is the old one, and so is its record: an --overwrite run
    interrupted before reaching a pair, or a redo whose input fails to read, leaves an output a rerun keeps."""
    import signal

    from ddfm_fast.runner import RunInterrupted, note_signal, run_folder

    run = RunConfig(sampler=SamplerConfig(prior="none", steps=1))
    out = tmp_path / "out"
    cpu = torch.device("cpu")
    assert len(run_folder(None, _folder(tmp_path), out, run, device=cpu).done) == 3

    def stop_after_first(event: dict) -> None:
        if event["status"] == "done":
            note_signal(signal.SIGTERM)  # lands between two pairs

    with pytest.raises(RunInterrupted):
        run_folder(None, _folder(tmp_path), out, run, device=cpu, overwrite=True, on_event=stop_after_first)
    again = run_folder(None, _folder(tmp_path), out, run, device=cpu)
    assert not again.failed and not again.done and len(again.skipped) == 3
    # A redo (an input changed) whose input cannot be read: the pair fails, the old output and its record stay.
    good = (tmp_path / "ir" / "c.png").read_bytes()
    (tmp_path / "ir" / "c.png").write_bytes(good[: len(good) // 2])
    broken = run_folder(None, _folder(tmp_path), out, run, device=cpu)
    assert [f["stem"] for f in broken.failed] == ["c"] and "c.png" in broken.outputs
    (tmp_path / "ir" / "c.png").write_bytes(good)
    restored = run_folder(None, _folder(tmp_path), out, run, device=cpu)
    assert not restored.failed and not restored.done and len(restored.skipped) == 3


def test_an_interrupt_right_after_an_output_is_renamed_keeps_its_record(tmp_path: Path, monkeypatch) -> None:
    """The record is journaled before the rename; an interrupt between the rename and the record reaching the
    summary leaves the journal in place, and the rerun keeps the output instead of refusing it as unknown."""
    import os

    from ddfm_fast.runner import RunInterrupted, run_folder

    run = RunConfig(sampler=SamplerConfig(prior="none", steps=1))
    out = tmp_path / "out"
    real_replace = os.replace

    def replace_then_interrupt(src, dst) -> None:
        real_replace(src, dst)
        if Path(dst).name == "b.png":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(RunInterrupted):
        run_folder(None, _folder(tmp_path), out, run, device=torch.device("cpu"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "b.png").exists() and resume.journal_paths(out)
    again = run_folder(None, _folder(tmp_path), out, run, device=torch.device("cpu"))
    assert not again.failed, again.failed
    assert [s["stem"] for s in again.skipped] == ["a", "b"] and [d["stem"] for d in again.done] == ["c"]
    assert not resume.journal_paths(out)  # all in the summary now


def test_ctrl_c_during_the_resume_check_releases_the_folder(tmp_path: Path, monkeypatch) -> None:
    from ddfm_fast.runner import run_folder

    run = RunConfig(sampler=SamplerConfig(prior="none", steps=1))
    out = tmp_path / "out"
    run_folder(None, _folder(tmp_path), out, run, device=torch.device("cpu"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(resume, "input_fingerprints", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_folder(None, _folder(tmp_path), out, run, device=torch.device("cpu"))
    assert not (out / resume.LOCK_NAME).exists()
    assert len(run_folder(None, _folder(tmp_path), out, run, device=torch.device("cpu")).skipped) == 3


def test_a_batch_tau_makes_the_batch_size_part_of_the_identity(tmp_path: Path) -> None:
    """With the official batch mean of tau an output depends on the pairs beside it: another batch size is
    another output. A batch of one is the per-image tau, and keeps the identity it always had."""
    paper = SamplerConfig.paper(steps=3)
    ids = {b: RunConfig(sampler=paper, batch_size=b).identity(None) for b in (1, 2, 4)}
    assert "batch_size" not in ids[1] and ids[2]["batch_size"] == 2 and len({json.dumps(i, sort_keys=True)
                                                                             for i in ids.values()}) == 3
    image = SamplerConfig(steps=3, tau_reduce="image")
    assert RunConfig(sampler=image, batch_size=1).identity(None) == RunConfig(sampler=image, batch_size=4).identity(None)
    out = tmp_path / "out"
    out.mkdir()
    pairs = [_pair_files(tmp_path, "a")]
    recs = [_write_with_record(pairs[0], out / "a.png", RunConfig(sampler=paper, batch_size=2), ids[2])]
    with pytest.raises(StaleOutputsError, match=r"batch_size 2 -> 1"):
        plan_resume(pairs, out, RunConfig(sampler=paper), ids[1], _records(*recs, identity=ids[2]))
    # A folder run says out loud that its outputs depend on the batching.
    from ddfm_fast.runner import run_folder

    em = RunConfig(sampler=SamplerConfig(prior="none", steps=1, tau_reduce="batch"), batch_size=2)
    summary = run_folder(None, _folder(tmp_path / "f"), tmp_path / "f" / "out", em, device=torch.device("cpu"))
    assert any("tau_reduce 'batch' with batch size 2" in w for w in summary.warnings), summary.warnings


def test_settings_em_only_does_not_read_are_not_part_of_its_identity() -> None:
    em = SamplerConfig(prior="none", steps=3)
    base = RunConfig(sampler=em).identity(None)
    for unused in (dict(seed=1), dict(clip=False), dict(train_timesteps=500)):
        assert RunConfig(sampler=em.replace(**unused)).identity(None) == base, unused
    assert RunConfig(sampler=em.replace(lamb=0.25)).identity(None) != base
    ddfm = SamplerConfig(steps=3)
    assert RunConfig(sampler=ddfm.replace(seed=1)).identity(None) != RunConfig(sampler=ddfm).identity(None)


def test_folders_written_by_ddfm_fast_0_1_0_still_resume(tmp_path: Path) -> None:
    """0.1.0 recorded EM only's unread seed / clip / schedule length and digested a UNet without its config: its
    outputs of what this run makes alike are kept (and relabelled), not refused as other settings."""
    from ddfm_fast.runner import legacy_digests
    from ddfm_fast.unet import UNetConfig, UNetModel

    out = tmp_path / "out"
    out.mkdir()
    pairs = [_pair_files(tmp_path, "a")]
    em = RunConfig(sampler=SamplerConfig(prior="none", steps=2, seed=5))
    identity = em.identity(None)
    old = {**identity, "seed": 5}  # what 0.1.0 recorded
    recs = [_write_with_record(pairs[0], out / "a.png", em, old)]
    with pytest.raises(StaleOutputsError, match="seed 5 -> 3407"):
        plan_resume(pairs, out, em, identity, _records(*recs, identity=old))
    decided = plan_resume(pairs, out, em, identity, _records(*recs, identity=old),
                          equivalent=legacy_digests(em, identity, None))
    assert [s["stem"] for s in decided.skipped] == ["a"]
    assert decided.kept["a.png"]["settings"] == resume.settings_digest(identity)  # relabelled
    # A UNet: the same weights digested the 0.1.0 way.
    net = UNetModel(UNetConfig.from_create_model_args(dict(image_size=16, num_channels=8, num_res_blocks=1,
                                                           channel_mult="1", attention_resolutions="",
                                                           norm_groups=8)))
    run = RunConfig(sampler=SamplerConfig(steps=2), checkpoint="w.safetensors").for_model(net, digest=True)
    identity = run.identity(plan("cpu", run.accel))
    old = {**identity, "model_digest": resume.model_digest(net, with_config=False)}
    assert old != identity
    recs = [_write_with_record(pairs[0], out / "a.png", run, old)]
    decided = plan_resume(pairs, out, run, identity, _records(*recs, identity=old),
                          equivalent=legacy_digests(run, identity, net))
    assert [s["stem"] for s in decided.skipped] == ["a"]
    # Another model under the old digest scheme is still another model.
    other = copy.deepcopy(net)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1.0
    with pytest.raises(StaleOutputsError, match="model_digest"):
        plan_resume(pairs, out, run, identity, _records(*recs, identity=old),
                    equivalent=legacy_digests(run, identity, other))
