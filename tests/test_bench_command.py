"""``ddfm-fast bench``: the quick suite runs the waterfall code end to end on CPU and writes its JSON report."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ddfm_fast.cli import main


def test_quick_suite_writes_a_report(tmp_path):
    out = tmp_path / "quick.json"
    res = CliRunner().invoke(main, ["bench", "--suite", "quick", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["device"].startswith("cpu") and env["torch"] and "date" in env
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"fp32 eager (reference)", "fp32 eager", "bf16", "fp32 + compile (dynamo only)"}
    for r in rows.values():
        assert r["error"] is None and r["per_image_s"] > 0 and r["size"] == "32x32"
    # Same arithmetic as the reference row: identical 8-bit output; bf16 close but not identical.
    assert rows["fp32 eager"]["psnr_vs_fp32_db"] == float("inf")
    assert rows["fp32 + compile (dynamo only)"]["psnr_vs_fp32_db"] == float("inf")
    assert 30 < rows["bf16"]["psnr_vs_fp32_db"] < float("inf")


def test_gpu_suite_needs_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(main, ["bench", "--suite", "gpu", "-o", str(tmp_path / "g.json")])
    assert res.exit_code == 1 and "CUDA" in res.output
