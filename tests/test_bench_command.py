"""``ddfm-fast bench``: the quick suite runs the waterfall code end to end on CPU and writes its JSON report."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ddfm_fast.cli import main


def test_quick_suite_writes_a_report(tmp_path):
    out = tmp_path / "quick.json"
    res = CliRunner().invoke(main, ["bench", "--suite", "quick", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["complete"] is True
    env = report["environment"]
    assert env["device"].startswith("cpu") and env["torch"] and "date" in env
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"fp32 eager (reference)", "fp32 eager", "bf16", "fp32 + compile (dynamo only)",
                         "fp32 eager, channels_last"}
    for r in rows.values():
        assert r["error"] is None and r["per_image_s"] > 0 and r["size"] == "32x32"
    # Same arithmetic as the reference row: identical 8-bit output; bf16 close but not identical.
    assert rows["fp32 eager"]["psnr_vs_fp32_db"] == float("inf")
    assert rows["fp32 + compile (dynamo only)"]["psnr_vs_fp32_db"] == float("inf")
    assert 30 < rows["bf16"]["psnr_vs_fp32_db"] < float("inf")
    # channels_last reorders the convolutions' accumulation at most: 8-bit output equal or nearly so.
    assert rows["fp32 eager, channels_last"]["psnr_vs_fp32_db"] > 60
    assert all(r["speedup_vs_upstream"] is None for r in rows.values()) and report["upstream"] is None


def test_gpu_suite_needs_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(main, ["bench", "--suite", "gpu", "-o", str(tmp_path / "g.json")])
    assert res.exit_code == 1 and "CUDA" in res.output


def test_gpu_waterfall_adds_one_acceleration_per_row():
    """The GPU chain is the issue's order, and each row differs from the one before by exactly one switch."""
    from ddfm_fast import benchmarks

    rows = benchmarks.GPU_PLAN.rows
    assert [r.name for r in rows] == ["fp32 eager, materialised attention", "fp16", "+ SDPA", "+ compile",
                                      "+ Triton tail", "+ CUDA graphs"]

    def switches(r):
        o = r.options
        return {"dtype": o.dtype, "sdpa": not r.math_attention, "compile": o.compile, "tail": r.backend,
                "graphs": o.cuda_graphs, "channels_last": o.channels_last, "mode": o.compile_mode}

    for before, after in zip(rows, rows[1:]):
        a, b = switches(before), switches(after)
        assert sum(a[k] != b[k] for k in a) == 1, (before.name, after.name)
    assert rows[0].options.dtype == torch.float32 and rows[1].options.dtype == torch.float16
    variants = {r.name: switches(r) for r in benchmarks.GPU_PLAN.variants}
    last = switches(rows[-1])
    assert {k for k in last if variants["+ CUDA graphs, channels_last"][k] != last[k]} == {"channels_last"}
    assert {k for k in last if variants["+ CUDA graphs, max-autotune (--fast)"][k] != last[k]} == {"mode"}
    assert benchmarks.GPU_PLAN.config.model_channels == 256 and benchmarks.GPU_PLAN.steps == 100


def test_gpu_plan_runs_end_to_end_on_cpu_with_a_tiny_model(monkeypatch):
    """The GPU plan's logic (reference, chain, variants, other sizes and batches, speed-ups) on a tiny model:
    compile rows trace with dynamo only and CUDA graphs are skipped off CUDA (said once), so this is the code
    path of ``bench --suite gpu`` minus the GPU."""
    import dataclasses

    from ddfm_fast import benchmarks
    from ddfm_fast.unet import UNetConfig

    def cpu_row(r):
        return dataclasses.replace(r, options=dataclasses.replace(r.options, compile_backend="eager"))

    plan = dataclasses.replace(
        benchmarks.GPU_PLAN, config=UNetConfig.from_create_model_args(benchmarks.TINY_ADM_ARGS), steps=2,
        waterfall_size=(16, 16), fast_sizes=(), batches=(1, 2), slow_timed_steps=1, budget_s=600.0,
        rows=tuple(cpu_row(r) for r in benchmarks.GPU_PLAN.rows),
        variants=tuple(cpu_row(r) for r in benchmarks.GPU_PLAN.variants))
    lines, seen = [], []
    results = benchmarks.run_plan(plan, torch.device("cpu"), log=lines.append,
                                  on_result=lambda so_far: seen.append(len(so_far)))
    assert seen == list(range(1, len(results) + 1))  # called after every row, with all rows so far
    names = [(r.row, r.size, r.batch) for r in results]
    assert names == [("fp32 eager (reference)", "16x16", 1)] + [(r.name, "16x16", 1) for r in plan.rows] + [
        ("+ CUDA graphs", "16x16", 2)] + [(r.name, "16x16", 1) for r in plan.variants]
    assert len(lines) == len(results)
    for r in results:
        assert r.error is None, (r.row, r.error)
        assert r.per_image_s > 0 and r.speedup_vs_upstream is None
    by = {(r.row, r.size, r.batch): r for r in results}
    first = by[("fp32 eager, materialised attention", "16x16", 1)]
    assert first.extrapolated and first.psnr_vs_fp32_db is None  # timed on 1 of 2 steps
    # Every fully timed fp16 row is compared with the fp32 reference on the 8-bit output.
    assert all(r.psnr_vs_fp32_db > 40 for r in results[3:len(plan.rows) + 1] + results[-len(plan.variants):])


def test_budget_zero_skips_every_row_after_the_reference(tmp_path):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", "--suite", "quick", "--budget-s", "0", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["row"] == "fp32 eager (reference)" and rows[0]["error"] is None
    assert len(rows) == 5 and all(r["error"] == "skipped: the suite's time budget is spent" for r in rows[1:])


def test_a_run_stopped_midway_leaves_the_rows_it_measured(tmp_path, monkeypatch):
    """The report is rewritten after every row: a run killed by a time limit keeps its measurements."""
    from ddfm_fast import benchmarks

    real_run_row, calls = benchmarks.run_row, []

    def run_row_then_stop(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a time limit's signal looks like to the process
        return real_run_row(*args, **kwargs)

    monkeypatch.setattr(benchmarks, "run_row", run_row_then_stop)
    out = tmp_path / "partial.json"
    res = CliRunner().invoke(main, ["bench", "--suite", "quick", "-o", str(out)])
    assert res.exit_code != 0
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert [r["row"] for r in report["rows"]] == ["fp32 eager (reference)", "fp32 eager"]
    assert all(r["per_image_s"] > 0 for r in report["rows"])


def test_gpu_tests_that_overrun_are_stopped_and_reported():
    from ddfm_fast.cli_bench import _run_gpu_tests

    lines = []
    report = _run_gpu_tests(lines.append, timeout_s=0.05)  # far less than pytest needs to start
    assert report["ran"] and report["exit_code"] == 124
    assert lines[-1] == "ddfm-fast bench: the GPU tests ran past 0.05 s and were stopped"
