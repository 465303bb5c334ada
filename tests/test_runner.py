"""``ddfm_fast.runner``: the run type, the resume identity derived from the configs, and the batching."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddfm_fast.config import AccelConfig, SamplerConfig
from ddfm_fast.pairing import Pair
from ddfm_fast.plan import plan
from ddfm_fast.runner import (
    RunConfig,
    StaleOutputsError,
    check_resume,
    output_identity,
    pending_pairs,
    read_pair,
    size_buckets,
)
from ddfm_fast.summary import SUMMARY_NAME, SUMMARY_SCHEMA


def test_identity_is_every_sampler_field_and_the_output_fields() -> None:
    run = RunConfig(sampler=SamplerConfig(steps=5), accel=AccelConfig(dtype="bf16", compile=True))
    identity = run.identity(plan("cpu", run.accel))
    sampler_fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    assert sampler_fields <= set(identity)  # a new SamplerConfig field is covered by being a field
    assert set(identity) - sampler_fields == {"mode", "output", "resize", "checkpoint", "model_config", "unet_dtype"}
    assert identity["unet_dtype"] == "bf16" and identity["checkpoint"] == "ddfm-small"  # None: the shipped prior
    # Accelerations other than the dtype, and the batch size, change float rounding only.
    fast = dataclasses.replace(run, accel=AccelConfig(dtype="bf16", channels_last=True, backend="torch"), batch_size=4)
    assert fast.identity(plan("cpu", fast.accel)) == identity
    em = RunConfig(sampler=SamplerConfig(prior="none"))
    assert em.identity(plan("cpu", AccelConfig(dtype="fp16")))["unet_dtype"] is None  # no UNet
    assert em.identity(None)["checkpoint"] is None
    # The identity read back from a summary equals the one computed from the run.
    doc = json.loads(json.dumps({"settings": run.to_dict(), "plan": plan("cpu", run.accel).to_dict()}))
    assert output_identity(doc["settings"], doc["plan"]) == identity


def test_model_names_are_absolute(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "w.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert RunConfig(checkpoint="w.pt").to_dict()["run"]["checkpoint"] == str(tmp_path / "w.pt")
    assert RunConfig(checkpoint="adm256-uncond").to_dict()["run"]["checkpoint"] == "adm256-uncond"


def _summary(out: Path, run: RunConfig, schema: int = SUMMARY_SCHEMA) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema": schema, "settings": run.to_dict(), "plan": plan("cpu", run.accel).to_dict()}
    (out / SUMMARY_NAME).write_text(json.dumps(doc))


def test_check_resume(tmp_path: Path) -> None:
    run = RunConfig(sampler=SamplerConfig(steps=3))
    ident = run.identity(plan("cpu", run.accel))
    assert check_resume(tmp_path, ident, kept=0) is None  # nothing kept, nothing to check
    assert "no ddfm_summary.json" in check_resume(tmp_path, ident, kept=2)
    _summary(tmp_path, run)
    assert check_resume(tmp_path, ident, kept=2) is None
    other = RunConfig(sampler=SamplerConfig(steps=3, seed=1, lamb=0.25))
    with pytest.raises(StaleOutputsError, match=r"2 output\(s\) made with other settings \(lamb 0.5 -> 0.25; "
                                                r"seed 3407 -> 1\); rerun with --overwrite"):
        check_resume(tmp_path, other.identity(plan("cpu", other.accel)), kept=2)
    _summary(tmp_path, run, schema=1)
    with pytest.raises(StaleOutputsError, match="schema 1"):
        check_resume(tmp_path, ident, kept=1)
    (tmp_path / SUMMARY_NAME).write_text("{broken")
    with pytest.raises(StaleOutputsError, match="cannot be read"):
        check_resume(tmp_path, ident, kept=1)


def test_pending_pairs_and_size_buckets(tmp_path: Path) -> None:
    sizes = {"a": (40, 30), "b": (50, 20), "c": (70, 30), "d": (40, 30), "e": (33, 33)}
    for stem, (w, h) in sizes.items():
        for side in ("ir", "vis"):
            (tmp_path / side).mkdir(exist_ok=True)
            Image.fromarray(np.full((h, w), 100, np.uint8)).save(tmp_path / side / f"{stem}.png")
    pairs = [Pair.of(tmp_path / "ir" / f"{s}.png", tmp_path / "vis" / f"{s}.png") for s in sizes]
    (tmp_path / "out").mkdir()
    (tmp_path / "out/e.png").write_bytes(b"done")
    todo, skipped = pending_pairs(pairs, tmp_path / "out", ".png", overwrite=False)
    assert [p.stem for p in todo] == list("abcd") and [s["stem"] for s in skipped] == ["e"]
    assert len(pending_pairs(pairs, tmp_path / "out", ".png", overwrite=True)[0]) == 5
    items = [read_pair(p, RunConfig()) for p in todo]
    assert [i.model_hw for i in items] == [(32, 64), (32, 64), (32, 96), (32, 64)]
    batches = [[i.pair.stem for i in b] for b in size_buckets(items, 2)]
    assert batches == [["a", "b"], ["c"], ["d"]]  # a full bucket goes at once, the rest at the end
