"""``ddfm-fast bench``: the quick suite end to end on a CPU, the gpu suite's plan, gate and dry run."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from click.testing import CliRunner

from ddfm_fast import benchmarks
from ddfm_fast.benchmarks import FAST, HEADLINE, REFERENCE, Result, Row
from ddfm_fast.cli import main
from ddfm_fast.config import COMPILE_MODES, AccelConfig, SamplerConfig
from ddfm_fast.unet import UNetConfig, UNetModel

TINY = UNetConfig.from_create_model_args(benchmarks.TINY_ADM_ARGS)


def test_quick_suite_writes_a_report(tmp_path):
    out = tmp_path / "quick.json"
    res = CliRunner().invoke(main, ["bench", "--suite", "quick", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["not_run"] == []
    env = report["environment"]
    assert env["device"].startswith("cpu") and env["torch"] and "date" in env
    assert "TORCHINDUCTOR_CACHE_DIR" in env["compile_caches"]
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"fp32 eager (reference)", "fp32 eager", "bf16", "fp32 + compile (dynamo only)",
                         "fp32 eager, channels_last"}
    for r in rows.values():
        assert r["status"] == "ok" and r["error"] is None and r["per_image_s"] > 0 and r["size"] == "32x32"
        assert r["tflops"] > 0 and r["precision"]["tf32"] is False and r["plan"]["fallbacks"] == []
    # Same arithmetic as the reference row: identical 8-bit output; bf16 close but not identical.
    assert rows["fp32 eager"]["psnr_vs_fp32_db"] == float("inf")
    assert rows["fp32 + compile (dynamo only)"]["psnr_vs_fp32_db"] == float("inf")
    assert rows["fp32 + compile (dynamo only)"]["compile_s"] > 0
    assert 30 < rows["bf16"]["psnr_vs_fp32_db"] < float("inf")
    # channels_last reorders the convolutions' accumulation at most: 8-bit output equal or nearly so.
    assert rows["fp32 eager, channels_last"]["psnr_vs_fp32_db"] > 60
    assert all(r["speedup_vs_upstream"] is None for r in rows.values()) and report["upstream"] is None
    assert "whole_command" not in report  # the cpu suite's section: CI does not spend a minute on it


def test_gpu_suite_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(main, ["bench", "--suite", "gpu", "-o", str(tmp_path / "g.json")])
    assert res.exit_code == 1 and "CUDA" in res.output and "--dry-run" in res.output


def _switches(r: Row) -> dict:
    a = r.accel
    return {"dtype": a.dtype, "compile": a.compile, "mode": a.compile_mode, "graphs": a.cuda_graphs,
            "tail": a.backend, "channels_last": a.channels_last, "tf32": r.tf32, "size": r.size, "batch": r.batch}


def test_gpu_waterfall_adds_one_acceleration_per_row():
    """The gpu rows in priority order; each row with a parent differs from it by exactly one switch (dtype, compile,
    mode, graphs, tail, channels_last, TF32, size or batch); max-autotune and channels_last only on request."""
    jobs = benchmarks.GPU_PLAN.jobs()
    assert [(r.name, r.size, r.batch) for r in jobs] == [
        (REFERENCE, (480, 640), 1), (HEADLINE, (480, 640), 1), ("fast without CUDA graphs", (480, 640), 1),
        ("fp16 eager (Triton tail)", (480, 640), 1), ("step tail, Triton", (480, 640), 1),
        ("step tail, torch", (480, 640), 1), ("fp32 eager, TF32", (480, 640), 1), (HEADLINE, (256, 256), 1),
        (HEADLINE, (1024, 1280), 1), (HEADLINE, (480, 640), 8)]
    assert benchmarks.GPU_PLAN.config.model_channels == 256 and benchmarks.GPU_PLAN.steps == 100
    by_name = {}
    for r in jobs:
        by_name.setdefault(r.name, r)
    assert [r.name for r in jobs if r.parent is None] == [REFERENCE, HEADLINE, "step tail, Triton"]
    for r in jobs[1:]:
        if r.parent is None:
            continue
        parent = by_name[r.parent]
        a, b = _switches(parent), _switches(r)
        assert sum(a[k] != b[k] for k in a) == 1, (r.name, r.size, r.batch, r.parent)
    ref = jobs[0]
    assert (ref.accel.dtype, ref.accel.compile, ref.accel.cuda_graphs, ref.tf32) == ("fp32", False, False, False)
    # max-autotune and channels_last only on request, last.
    assert all(r.accel.compile_mode == "default" and not r.accel.channels_last for r in jobs)
    extra = benchmarks.gpu_plan(max_autotune=True, channels_last=True).jobs()
    assert [r.name for r in extra[-2:]] == ["fast, max-autotune", "fast, channels_last"]
    assert _switches(extra[-2]) == {**_switches(jobs[1]), "mode": "max-autotune"}


def test_the_headline_is_what_accel_fast_resolves_to_on_cuda(monkeypatch):
    from ddfm_fast import plan as plan_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(plan_mod, "triton_not_supported_reasons", lambda device, env=None: [])
    p = plan_mod.plan("cuda", AccelConfig.fast(), env={})
    assert (p.dtype, p.compile, p.compile_mode, p.cuda_graphs, p.backend, p.channels_last) == (
        FAST.dtype, FAST.compile, FAST.compile_mode, FAST.cuda_graphs, FAST.backend, FAST.channels_last)
    assert AccelConfig.fast().compile_mode == "default"


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_inductor_never_captures_graphs_of_its_own(monkeypatch, mode):
    """The sampler captures the step itself; inductor's own CUDA graphs (max-autotune's default) must be off."""
    from ddfm_fast.sampler import DDFMSampler

    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = benchmarks.random_model(TINY, device=torch.device("cpu"))
    x, I, V = benchmarks._inputs(1, 16, 16, torch.device("cpu"))  # noqa: E741
    DDFMSampler(SamplerConfig(steps=1), AccelConfig(compile=True, compile_mode=mode)).sample(model, x, I, V)
    [kwargs] = seen
    assert kwargs["mode"] == {"default": None, "max-autotune": "max-autotune-no-cudagraphs",
                              "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}[mode]
    assert kwargs["fullgraph"] is True


def test_paper_model_flops():
    """DESIGN.md: one forward of the paper's UNet at 480x640 is about 10.7 TFLOP; cost is linear in the batch."""
    from ddfm_fast.unet import ADM256_UNCOND_CONFIG

    one = benchmarks.unet_flops(ADM256_UNCOND_CONFIG, 1, 480, 640)
    assert 10.6e12 < one < 10.8e12
    assert benchmarks.unet_flops(ADM256_UNCOND_CONFIG, 8, 480, 640) == 8 * one


def test_tail_bytes_follow_the_kernels_traffic_model():
    """kernels/em_tail.py: about 36 float32 planes per step, 44 MB at 480x640."""
    plane, half = 480 * 640 * 4, 480 * 321 * 8
    assert benchmarks.tail_bytes(1, 480, 640) == 32 * plane + 4 * half
    assert 43e6 < benchmarks.tail_bytes(1, 480, 640) < 45e6


def test_step_tail_is_timed_over_many_calls():
    tail = benchmarks.make_tail("torch", (32, 48), 1, torch.device("cpu"))
    seconds, how = benchmarks.time_tail(tail, torch.device("cpu"), calls=4)
    assert seconds > 0 and how == "4 calls timed with perf_counter"


class _GraphBreakingUNet(UNetModel):
    def forward(self, x, t):
        torch._dynamo.graph_break()
        return super().forward(x, t)


def test_a_row_whose_plan_changed_at_run_time_fails_and_says_why():
    """A compile given up (here: a graph break under fullgraph=True) falls back to eager; the row must not report
    the eager time under the compiled row's name."""
    model = _GraphBreakingUNet(TINY).eval()
    row = Row("compiled", AccelConfig(compile=True, compile_backend="eager"), (16, 16))
    with pytest.warns(RuntimeWarning, match="compile given up"):
        res, _ = benchmarks.run_row(row, model, 1, torch.device("cpu"), reference=None)
    assert res.status == "failed" and res.error.startswith("the plan changed at run time: compile given up")
    line = benchmarks.format_row(res)
    assert "FAILED: the plan changed at run time" in line and "fell back: compile given up" in line


def _fake_runs(monkeypatch, seconds_per_row: float, clock: list[float], rate: float = 1e9):
    """run_row / run_tail_row that take ``seconds_per_row`` of a fake clock and run at ``rate`` FLOP/s."""
    calls = []

    def run_row(row, model, steps, device, *, reference):
        calls.append(row.name)
        clock[0] += seconds_per_row
        step = benchmarks.unet_flops(TINY, row.batch, *row.size) / rate
        r = Result(row.name, f"{row.size[0]}x{row.size[1]}", row.batch, steps, steps * step, 1 / (steps * step),
                   step, 3.0 if row.compiles else 0.0, None, None, False, seconds=seconds_per_row)
        return r, None

    def run_tail_row(row, device, calls_):
        calls.append(row.name)
        clock[0] += seconds_per_row
        return Result(row.name, "x", 1, 1, None, None, 1e-4, None, None, None, False, kind="tail", effective_gbps=1.0,
                      seconds=seconds_per_row)

    monkeypatch.setattr(benchmarks, "run_row", run_row)
    monkeypatch.setattr(benchmarks, "run_tail_row", run_tail_row)
    return calls


def test_the_gate_predicts_from_measured_rates_and_skips_what_would_end_past_the_budget(monkeypatch):
    """Every row takes 5 s of a fake clock and runs at 1 GFLOP/s; the numbers below follow from the dry-run plan's
    CPU priors (compile 10 s, overhead 1 s, fp16 at 1/10 of fp32, compiled 1.2x) and the tiny UNet's FLOPs."""
    sizes = {(480, 640): (24, 32), (256, 256): (16, 16), (1024, 1280): (48, 64)}
    dry = benchmarks.dry_run_plan(benchmarks.GPU_PLAN)
    plan = dataclasses.replace(dry, budget_s=60.0, waterfall_size=(24, 32), schedule=tuple(
        dataclasses.replace(r, size=sizes[r.size]) for r in benchmarks.GPU_PLAN.schedule))
    clock = [0.0]
    calls = _fake_runs(monkeypatch, 5.0, clock)
    pendings = []
    results = benchmarks.run_plan(plan, torch.device("cpu"), log=lambda _: None, start=0.0,
                                  clock=lambda: clock[0], on_result=lambda so_far, p: pendings.append(len(p)))
    assert len(results) == len(plan.jobs()) and pendings == list(range(len(results) - 1, -1, -1))
    assert [r.status for r in results] == ["ok"] * 9 + ["skipped"]
    assert calls == [r.row for r in results[:9]]
    # The second row is predicted from the first one's measured rate, scaled by the priors' fp16 / fp32 ratio.
    head = results[1]
    assert head.row == HEADLINE
    flops = benchmarks.unet_flops(TINY, 1, *plan.jobs()[1].size)
    expected = plan.priors.compile_s + 3 * flops / (1e9 * plan.priors.tflops["fp16"] / plan.priors.tflops["fp32"]
                                                    * plan.priors.compile_gain) + plan.priors.overhead_s
    assert head.predicted_s == pytest.approx(expected, abs=0.1)
    # The last row (batch 8) would end at ~63.5 s: its compile is the one measured (3 s), its rate the headline's.
    last = results[-1]
    assert last.batch == 8 and "past the 60 s budget" in last.skipped and last.skipped.startswith("predicted 19 s")
    assert "compile ~3 s (measured)" in last.skipped and f"measured by {HEADLINE!r}" in last.skipped


def test_budget_zero_skips_every_row_and_says_why(tmp_path):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", "--suite", "quick", "--budget-s", "0", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert len(rows) == 5 and all(r["status"] == "skipped" and "past the 0 s budget" in r["skipped"] for r in rows)
    assert [n["row"] for n in report["not_run"]] == [r["row"] for r in rows]
    assert "SKIPPED: predicted" in res.output


def test_a_run_stopped_midway_leaves_the_rows_it_measured_and_names_the_rest(tmp_path, monkeypatch):
    """The report is rewritten after every row: a run killed by a time limit keeps its measurements."""
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
    assert [n["row"] for n in report["not_run"]] == ["bf16", "fp32 + compile (dynamo only)",
                                                     "fp32 eager, channels_last"]
    assert all(n["why"] == "not reached: the command stopped before this row" for n in report["not_run"])


def test_dry_run_options_are_checked(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--suite", "quick", "--dry-run"])
    assert res.exit_code == 2 and "--dry-run previews the gpu suite" in res.output
    res = CliRunner().invoke(main, ["bench", "--suite", "gpu", "--dry-run", "--reference", str(tmp_path / "no")])
    assert res.exit_code == 2 and "no such folder" in res.output


@pytest.mark.slow
def test_dry_run_of_the_gpu_suite_on_cpu(tmp_path, reference_dir):
    """The whole gpu plan on this CPU with the tiny model: same rows, same order, the tests collected with the
    goldens found, the forecast printed; what a GPU machine runs, minus the GPU."""
    out = tmp_path / "dry.json"
    res = CliRunner().invoke(main, ["bench", "--suite", "gpu", "--dry-run", "--reference", str(reference_dir),
                                    "--budget-s", "100000", "--hard-limit-s", "100000", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["complete"] is True and report["not_run"] == []
    tests = report["tests"]
    assert tests["ok"] and tests["collect_only"] and tests["missing_goldens"] == []
    names = {t["test"].split("::")[0] for t in tests["tests"]}
    assert names == {"tests/test_gpu.py", "tests/test_kernels.py"}
    assert all(t["outcome"] == "collected" for t in tests["tests"])
    gpu_jobs = benchmarks.GPU_PLAN.jobs()
    assert [(r["row"], r["batch"]) for r in report["rows"]] == [(j.name, j.batch) for j in gpu_jobs]
    assert [f["row"] for f in report["forecast"]] == [j.name for j in gpu_jobs]
    assert "forecast for the gpu suite on an H100/H200" in res.output
    rows = report["rows"]
    assert all(r["status"] == "ok" for r in rows), [(r["row"], r["error"]) for r in rows if r["status"] != "ok"]
    assert all(r["predicted_s"] is not None for r in rows)
    head = rows[1]
    assert head["plan"]["compile"] and head["plan"]["backend"] == "triton" and head["plan"]["dtype"] == "fp16"
    assert rows[0]["precision"]["tf32"] is False
    tf32 = next(r for r in rows if r["row"] == "fp32 eager, TF32")
    assert tf32["precision"]["tf32"] is True and tf32["psnr_vs_fp32_db"] is not None
    tails = [r for r in rows if r["kind"] == "tail"]
    assert len(tails) == 2 and all(t["step_s"] > 0 and t["effective_gbps"] > 0 for t in tails)
    # The batch-8 row's first image has the reference's inputs: it is compared with the reference too.
    assert rows[-1]["batch"] == 8 and rows[-1]["psnr_vs_fp32_db"] is not None


def test_the_hard_limit_writes_the_report_and_stops_the_command(tmp_path):
    """A watchdog ends the command at --hard-limit-s whatever runs, after writing the report (in a subprocess:
    it ends the process)."""
    import subprocess
    import sys

    out = tmp_path / "h.json"
    proc = subprocess.run([sys.executable, "-m", "ddfm_fast", "bench", "--suite", "quick", "--hard-limit-s", "1",
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 124, proc.stderr
    assert "the hard limit of 1 s is reached; writing the report and stopping" in proc.stderr
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["stopped_at_hard_limit_s"] == 1
    assert len(report["rows"]) + len(report["not_run"]) >= len(benchmarks.plan_for("quick").jobs())


# ------------------------------------------------------------------------------------ the whole-command section


def test_time_command_reads_the_childs_usage_and_a_failures_last_stderr_line():
    """Times come from outside the child; a failure keeps its last stderr line (after 200 kB of stderr: written to
    a file, so a child that writes more than a pipe's buffer is not blocked)."""
    import sys

    ok = benchmarks.time_command([sys.executable, "-c", "sum(range(10**6))"])
    assert ok.returncode == 0 and ok.error is None and ok.wall_s > 0
    assert ok.user_s is not None and ok.sys_s is not None and ok.maxrss_mb > 1  # Linux: os.wait4 is there
    script = "import sys; sys.stderr.write('x' * 200_000 + '\\nTraceback\\nImageReadError: a.png: not an image\\n'); " \
             "sys.exit(3)"
    bad = benchmarks.time_command([sys.executable, "-c", script])
    assert bad.returncode == 3 and bad.error == "exit status 3: ImageReadError: a.png: not an image"


def _fake_commands(walls: dict[str, list[float]], fail: dict[str, int] | None = None,
                   clock: list[float] | None = None):
    """A stand-in for time_command: each prior's runs take the next of its ``walls`` (of a fake clock, if given);
    ``fail[key] = n``: that prior's n-th run exits 1."""
    calls: list[list[str]] = []
    counts = {"default": 0, "previous": 0}

    def runner(argv):
        key = "previous" if "--checkpoint" in argv else "default"
        calls.append(list(argv))
        counts[key] += 1
        n = counts[key]
        if (fail or {}).get(key) == n:
            return benchmarks.CommandTiming(1.0, 0.5, 0.1, 100.0, 1, "exit status 1: CheckpointError: bad file")
        wall = walls[key][n - 1]
        if clock is not None:
            clock[0] += wall
        return benchmarks.CommandTiming(wall, wall * 1.5, wall / 10, 300.0, 0)

    return runner, calls


def test_whole_command_interleaves_the_two_priors_and_reports_medians_ratio_and_target(tmp_path):
    import sys

    runner, calls = _fake_commands({"default": [4.0, 2.0, 3.0], "previous": [12.0, 30.0, 10.0]})
    section = benchmarks.run_whole_command(3, tmp_path, log=lambda _: None, runner=runner)
    assert section.status == "ok" and section.rounds_run == 3 and section.skipped is None
    # Round by round, the default prior first; the README's command as this interpreter runs it.
    assert ["--checkpoint" in c for c in calls] == [False, True] * 3
    readme = [sys.executable, "-m", "ddfm_fast", "fuse", "--example", "-o"]
    assert all(c[:6] == readme and c[6].endswith(".png") and c[6].startswith(str(tmp_path)) for c in calls)
    assert calls[1][7:] == ["--checkpoint", "ddfm-small"] and len(calls[0]) == 7
    assert len({c[6] for c in calls}) == 6  # a fresh output file per run
    default, previous = section.variants
    assert default.name == "default prior (ddfm-shrink)" and previous.name == "previous prior (ddfm-small)"
    assert default.command.endswith("-m ddfm_fast fuse --example -o OUT.png")
    assert default.median == {"wall_s": 3.0, "user_s": 4.5, "sys_s": 0.3}
    assert previous.median["wall_s"] == 12.0 and section.ratio["wall_s"] == 4.0
    assert [r["wall_s"] for r in default.runs] == [4.0, 2.0, 3.0]
    assert section.target == {"target": "README command, default prior, 640x480, median wall (s)", "value": 3.0,
                              "bound": "<= 15", "met": True}
    assert set(section.machine) >= {"cpu_model", "platform", "threads", "torch"}
    assert section.machine["torch"] == torch.__version__ and section.machine["cpu_model"]
    assert benchmarks.targets([], section)[-1] == section.target
    json.dumps(dataclasses.asdict(section))  # what the report holds
    text = benchmarks.format_whole_command(section)
    assert "3 of 3 interleaved rounds" in text and default.command in text and previous.command in text
    assert "median wall 3.00 s" in text and "previous / default (medians): wall x4.00" in text
    assert "(<= 15) met" in text


def test_a_failed_run_is_reported_with_its_error_and_no_time(tmp_path):
    runner, calls = _fake_commands({"default": [20.0] * 3, "previous": [33.0] * 3}, fail={"previous": 2})
    section = benchmarks.run_whole_command(3, tmp_path, log=lambda _: None, runner=runner)
    default, previous = section.variants
    assert section.status == "failed" and section.ratio is None
    assert previous.status == "failed" and previous.error == "exit status 1: CheckpointError: bad file"
    assert previous.runs == [] and previous.median is None  # its first, successful run is not reported either
    assert ["--checkpoint" in c for c in calls] == [False, True, False, True, False]  # not run again once failed
    assert default.median["wall_s"] == 20.0 and section.target["met"] is False
    text = benchmarks.format_whole_command(section)
    [line] = [line for line in text.splitlines() if line.strip().startswith("previous prior (ddfm-small)")]
    assert line.endswith(" FAILED: exit status 1: CheckpointError: bad file")
    assert "33.00" not in text and "49.50" not in text and "(<= 15) MISSED" in text


def test_whole_command_rounds_are_gated_by_the_budget(tmp_path):
    """Round 1 is predicted from COMMAND_PRIOR_S (5 + 25 s), round 2 from round 1's walls (6 + 40 s)."""
    clock = [0.0]
    runner, calls = _fake_commands({"default": [6.0] * 3, "previous": [40.0] * 3}, clock=clock)
    section = benchmarks.run_whole_command(3, tmp_path, budget_s=80.0, start=0.0, clock=lambda: clock[0],
                                           log=lambda _: None, runner=runner)
    assert section.status == "ok" and section.rounds_run == 1 and len(calls) == 2
    assert section.skipped == "rounds 2-3 not run: round 2 predicted 46 s (measured medians) would end at 92 s, " \
                              "past the 80 s budget"
    none = benchmarks.run_whole_command(3, tmp_path, budget_s=29.0, log=lambda _: None, runner=runner)
    assert none.status == "skipped" and none.rounds_run == 0 and none.target["value"] is None
    assert none.skipped.startswith("rounds 1-3 not run: round 1 predicted 30 s (prior)") and len(calls) == 2
    assert "(<= 15) not measured" in benchmarks.format_whole_command(none)


def test_only_the_cpu_suite_runs_the_whole_command():
    assert benchmarks.plan_for("cpu").whole_command_rounds == 3
    assert benchmarks.plan_for("quick").whole_command_rounds == 0 and benchmarks.GPU_PLAN.whole_command_rounds == 0


@pytest.mark.parametrize("fails", [False, True])
def test_the_bench_command_reports_the_whole_command_section(tmp_path, monkeypatch, fails):
    """The section in the report and the printed summary, its target among the targets, a failure in the exit
    code: the quick plan with two rounds of the section, rows and commands replaced by stand-ins."""
    import functools

    runner, _ = _fake_commands({"default": [3.0, 5.0], "previous": [20.0, 22.0]}, fail={"previous": 1} if fails else {})
    monkeypatch.setattr(benchmarks, "run_whole_command",
                        functools.partial(benchmarks.run_whole_command, runner=runner))
    quick = benchmarks.plan_for("quick")
    monkeypatch.setattr(benchmarks, "plan_for", lambda *a, **k: dataclasses.replace(quick, whole_command_rounds=2))
    _fake_runs(monkeypatch, 0.0, [0.0])
    out = tmp_path / "w.json"
    res = CliRunner().invoke(main, ["bench", "--suite", "quick", "-o", str(out)])
    report = json.loads(out.read_text())
    section = report["whole_command"]
    assert report["complete"] is True and section["rounds_run"] == 2
    assert report["targets"][-1] == section["target"]
    assert "whole command, 2 of 2 interleaved rounds" in res.output
    if fails:
        assert res.exit_code == 1 and section["status"] == "failed"
        assert section["variants"][1]["error"] == "exit status 1: CheckpointError: bad file"
        assert "whole command FAILED" in res.output
    else:
        assert res.exit_code == 0, res.output
        assert section["status"] == "ok" and section["target"]["value"] == 4.0 and section["ratio"]["wall_s"] == 5.25
        assert "whole command ok" in res.output


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_gate_predicts_emulated_bf16_at_the_emulated_rate(monkeypatch, native):
    """Without AVX512-BF16 / AMX the bf16 rows run emulated, slower than fp16: predicting them at the native rate
    let a 525 s row into a 330 s budget."""
    import ddfm_fast.plan

    monkeypatch.setattr(ddfm_fast.plan, "cpu_has_native_bf16", lambda: native)
    rates = benchmarks.plan_for("cpu").priors.tflops
    assert rates["bf16"] == (benchmarks.CPU_PRIORS.tflops["bf16"] if native else benchmarks.EMULATED_BF16_TFLOPS)
    assert native or rates["bf16"] < rates["fp16"] < rates["fp32"]
    assert rates["fp32"] == benchmarks.CPU_PRIORS.tflops["fp32"]
    assert benchmarks.plan_for("quick").priors.tflops["bf16"] == rates["bf16"]


def test_the_hard_limit_kills_a_command_being_timed():
    """os._exit would leave a timed README command running after the report says the bench command stopped."""
    import sys
    import threading

    got = []
    worker = threading.Thread(target=lambda: got.append(benchmarks.time_command(
        [sys.executable, "-c", "import time; time.sleep(120)"])))
    worker.start()
    deadline = time.monotonic() + 30
    while not benchmarks._RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert benchmarks._RUNNING, "the command never started"
    benchmarks.kill_commands()
    worker.join(30)
    assert not worker.is_alive() and not benchmarks._RUNNING
    assert got[0].returncode == -9 and got[0].error.startswith("killed by signal 9"), got[0]
