"""``ddfm-fast bench``: the GPU correctness tests and the speed rows in one command, with a JSON report.

The gpu suite is built to run on a bare GPU machine that received only a copy of the checkout: the goldens come
from ``--reference`` (or ``$DDFM_REFERENCE``, ``../shared/reference``, ``.gpu-reference/``; see
``ddfm_fast.gpu_check``), every test is listed with its outcome, the rows run in priority order under a
predicted-time gate (``ddfm_fast.benchmarks``), and the report is rewritten after the tests and after every row.
The cpu suite first runs the README's command whole with the default and the previous prior (its
``whole_command`` section, ``benchmarks.run_whole_command``), then its rows.
``--dry-run`` runs the same plan on this machine's CPU with a tiny model (and only collects the tests), to check
the whole flow before a GPU is spent on it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import click


def _repo() -> Optional[Path]:
    from ddfm_fast.gpu_check import repo_root

    return repo_root()


def _run_gpu_tests(log, timeout_s: float, reference=None, collect_only: bool = False) -> dict:
    """The GPU tests (``tests/test_gpu.py``, ``tests/test_kernels.py``) in a subprocess; see gpu_check.run_tests."""
    from ddfm_fast import gpu_check

    lookup = reference if reference is not None else gpu_check.find_reference()
    return gpu_check.run_tests(log, timeout_s=timeout_s, reference=lookup, collect_only=collect_only)


def _run_whole_command(plan, started: float, progress: dict, save, log) -> None:
    """The cpu suite's whole-command section, in a temporary folder, under the suite's budget; the report is
    rewritten after every run of it."""
    import tempfile

    from ddfm_fast import benchmarks

    def on_update(section) -> None:
        progress["whole_command"] = section
        save([], list(plan.jobs()), False)

    log(f"whole command: {plan.whole_command_rounds} interleaved rounds of the README command, default prior and "
        f"--checkpoint {benchmarks.PREVIOUS_PRIOR}")
    progress["running"] = "the whole command"
    with tempfile.TemporaryDirectory(prefix="ddfm-bench-") as tmp:
        progress["whole_command"] = benchmarks.run_whole_command(
            plan.whole_command_rounds, Path(tmp), budget_s=plan.budget_s, start=started, log=log,
            on_update=on_update)
    progress["running"] = None


def _print_forecast(log, rows: list[dict], budget_s: float, tests_s: float) -> None:
    log(f"forecast for the gpu suite on an H100/H200 from nominal rates (not measured; tests assumed to take "
        f"{tests_s:.0f} s, budget {budget_s:.0f} s):")
    for f in rows:
        end = f"ends at {f['ends_at_s']:5.0f} s" if f["fits"] else "would be skipped"
        log(f"  {f['row']:<46} {f['size']:>9} b{f['batch']:<2} ~{f['predicted_s']:6.0f} s  {end}  [{f['how']}]")


def _arm_hard_limit(limit_s: float, started: float, progress: dict, save, log):
    """At ``limit_s`` after ``started``: write the report (the row running then listed as stopped), exit 124.

    A row cannot be interrupted safely from inside (a compile, a CUDA call), so a watchdog thread writes the
    report with what was measured and ends the process; its subprocesses (inductor's compile workers) end with it.
    """

    def stop() -> None:
        results, pending = progress["results"], progress["pending"]
        log(f"ddfm-fast bench: the hard limit of {limit_s:g} s is reached; writing the report and stopping"
            + (f" (running: {progress.get('running') or pending[0].name})" if pending else ""))
        running = progress.get("running") or (pending[0].name if pending else None)
        save(results, pending, False, last=True, stopped_at_hard_limit_s=limit_s, stopped_while=running,
             stopped=None if progress.get("running") else f"stopped: the hard limit of {limit_s:g} s came while "
                                                           "this row ran")
        from ddfm_fast import benchmarks

        benchmarks.kill_commands()  # a README command being timed must not outlive the bench command
        sys.stderr.flush()
        os._exit(124)

    timer = threading.Timer(max(0.0, limit_s - (time.perf_counter() - started)), stop)
    timer.daemon = True
    timer.start()
    return timer


@click.command("bench")
@click.option("--suite", type=click.Choice(["gpu", "cpu", "quick"]), default="gpu", show_default=True,
              help="gpu: the GPU correctness tests, then the rows with the paper-size model (needs CUDA; ends "
                   "within 9 minutes on an H100/H200); cpu: the README's command whole (`ddfm-fast fuse --example`, "
                   "default prior and --checkpoint ddfm-small, 3 interleaved rounds, medians), then rows with the "
                   "small prior's config on this CPU (about 5 minutes on 2 cores); quick: a seconds-long check.")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="JSON report (default: bench/results/<suite>-<date>.json in a checkout, else ./).")
@click.option("--reference", type=click.Path(path_type=Path), metavar="DIR",
              help="gpu suite: the golden folder (default: $DDFM_REFERENCE, then ../shared/reference, then "
                   ".gpu-reference/ in the checkout). A missing golden file fails the tests that need it.")
@click.option("--dry-run", is_flag=True,
              help="gpu suite: run the whole plan on this CPU with a tiny model (same rows, order and gates; the "
                   "tests are only collected) and print the GPU forecast, to check the flow before a GPU run.")
@click.option("--no-tests", is_flag=True, help="gpu suite: skip the correctness tests, only benchmark.")
@click.option("--device", default=None, help="Device (default: cuda for gpu, cpu otherwise).")
@click.option("--upstream", type=click.Path(path_type=Path), metavar="PATH",
              help="A clone of the official MMIF-DDFM: its sampler runs on the same inputs and weights at the "
                   "reference's size (batch 1), and every row of that size gets its speed-up over it. The cpu/quick "
                   "suites then use a tiny ADM model the official code can build.")
@click.option("--budget-s", type=click.FloatRange(min=0), default=None,
              help="Every row must be predicted to end within this many seconds of the command's start (tests "
                   "included), else it is skipped and the report says why (default: the suite's; gpu 480).")
@click.option("--tests-timeout-s", type=click.FloatRange(min=1), default=240.0, show_default=True,
              help="gpu suite: stop the correctness tests after this long (reported as failed, exit code 124).")
@click.option("--hard-limit-s", type=click.FloatRange(min=1), default=None,
              help="Stop the command this many seconds after its start whatever runs, writing the report first "
                   "(the row then running is listed as stopped; exit code 124). Default: gpu 540 (9 minutes), "
                   "none for the other suites.")
@click.option("--max-autotune", is_flag=True,
              help="gpu suite: add a last row with inductor's max-autotune (a compile of several minutes).")
@click.option("--channels-last", is_flag=True, help="gpu suite: add a last row with channels_last.")
def bench_command(suite: str, out: Optional[Path], reference: Optional[Path], dry_run: bool, no_tests: bool,
                  device: Optional[str], upstream: Optional[Path], budget_s: Optional[float],
                  tests_timeout_s: float, hard_limit_s: Optional[float], max_autotune: bool,
                  channels_last: bool) -> None:
    """Check and time the fast path: the GPU correctness tests, then rows in priority order (fp32 reference,
    fp16 + compile + Triton tail + CUDA graphs at 480x640, without graphs, fp16 eager, the step tail alone, TF32,
    256x256, 1280x1024, batch 8), each with its time, rate, compile time, peak memory and PSNR against true fp32.

    On a GPU machine with a copy of the checkout and the goldens in .gpu-reference/:
    `pip install --no-deps --no-build-isolation -e . && ddfm-fast bench --suite gpu --reference .gpu-reference
    -o REPORT.json`. The report (JSON) names the device, versions, float32 switches, sizes and date.
    """
    started = time.perf_counter()  # the budget and the hard limit count from here, imports included
    if dry_run and suite != "gpu":
        raise click.UsageError("--dry-run previews the gpu suite on this machine; use it with --suite gpu")
    if (max_autotune or channels_last) and suite != "gpu":
        raise click.UsageError("--max-autotune and --channels-last add rows to the gpu suite only")
    if dry_run and "triton" not in sys.modules:
        # The dry run's Triton tail runs in Triton's CPU interpreter, which must be chosen before triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from ddfm_fast import benchmarks, gpu_check
    from ddfm_fast.upstream import UpstreamError, check_clone

    log = lambda line: click.echo(line, err=True)  # noqa: E731
    if upstream is not None:
        try:
            upstream = check_clone(upstream)
        except UpstreamError as exc:
            raise click.BadParameter(str(exc), param_hint="--upstream") from exc
    lookup = None
    if suite == "gpu":
        try:
            lookup = gpu_check.find_reference(reference)
        except gpu_check.GoldenFolderError as exc:
            raise click.BadParameter(str(exc), param_hint="--reference") from exc
    elif reference is not None:
        raise click.UsageError("--reference names the goldens of the gpu suite's tests; use it with --suite gpu")
    if dry_run and device not in (None, "cpu"):
        raise click.UsageError("--dry-run runs on the CPU; drop --device")
    try:
        dev = torch.device("cpu" if dry_run else device or ("cuda" if suite == "gpu" else "cpu"))
    except RuntimeError as exc:
        raise click.BadParameter(f"{device!r} is not a device name ({' '.join(str(exc).split())})",
                                 param_hint="--device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(f"the {suite} suite on {dev} needs a CUDA device; torch sees none (use --dry-run "
                                   "to check the gpu plan on this CPU, or --suite cpu)")
    env = benchmarks.environment()
    log(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, python {env['python']}")
    plan = benchmarks.plan_for(suite, upstream=upstream is not None, max_autotune=max_autotune,
                               channels_last=channels_last)
    if budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=budget_s)
    forecast = None
    if dry_run:
        forecast = benchmarks.forecast(plan, tests_s=min(tests_timeout_s, 150.0))
        _print_forecast(log, forecast, plan.budget_s, min(tests_timeout_s, 150.0))
        plan = benchmarks.dry_run_plan(plan)
        log(f"dry run: the same {len(plan.jobs())} rows on the tiny ADM UNet, {plan.steps} steps, sizes / 40, on "
            f"the CPU (compile rows traced by Dynamo only; no CUDA graphs off CUDA)")
    if out is not None:  # before anything is measured; and never over a golden the tests read
        from ddfm_fast import cli_options as opts

        opts.check_writable(out, "-o/--out")
        if lookup is not None and lookup.path is not None:
            opts.check_not_input([out], [p for p in lookup.path.iterdir() if p.is_file()], "-o/--out")
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        repo = _repo()
        root = repo / "bench" / "results" if repo is not None else Path(".")
        out = root / f"{suite}{'-dry-run' if dry_run else ''}-{stamp}.json"
    run_tests = suite == "gpu" and not no_tests
    tests: dict = {"ran": False, "reason": ("running" if run_tests else
                                            "not the gpu suite" if suite != "gpu" else "--no-tests")}
    jobs = plan.jobs()
    progress: dict = {"results": [], "pending": list(jobs), "whole_command": None, "last": None}
    saving = threading.Lock()

    def save(results: list, pending: list, complete: bool, *, stopped: Optional[str] = None, last: bool = False,
             **extra: object) -> dict:
        # Rewritten (atomically) after the tests and after every row: a run stopped by a time limit keeps its
        # measurements, marked "complete": false, and lists the rows it had not reached. ``stopped`` says why the
        # first pending row (the one running) did not finish. The hard limit's report is the ``last``: the main
        # thread, still running a row, must not replace it in the moment before the process ends.
        with saving:
            if progress["last"] is not None:
                return progress["last"]
            payload = _payload(results, pending, complete, stopped, extra)
            benchmarks.write_report(out, payload)
            if last:
                progress["last"] = payload
            return payload

    def _payload(results: list, pending: list, complete: bool, stopped: Optional[str], extra: dict) -> dict:
        not_run = [{"row": r.row, "size": r.size, "batch": r.batch, "why": r.skipped}
                   for r in results if r.status == "skipped"]
        not_run += [{"row": r.name, "size": "x".join(map(str, r.size)), "batch": r.batch,
                     "why": stopped if i == 0 and stopped else "not reached: the command stopped before this row"}
                    for i, r in enumerate(pending)]
        section = progress["whole_command"]
        if plan.whole_command_rounds:  # null until it starts; "status": "running" in a report stopped during it
            extra.setdefault("whole_command", None if section is None else dataclasses.asdict(section))
        payload = benchmarks.results_payload(
            results, suite=suite, dry_run=dry_run, command=" ".join(["ddfm-fast", *sys.argv[1:]]), steps=plan.steps,
            budget_s=plan.budget_s, tests=tests, complete=complete,
            total_seconds=round(time.perf_counter() - started, 1), model=plan.config.to_dict(),
            upstream=None if upstream is None else str(upstream), not_run=not_run,
            targets=benchmarks.targets(results, section),
            precision_policy="TF32 off (true fp32) in every row and test except rows marked tf32",
            forecast=forecast, **extra)
        return payload

    def on_result(so_far: list, pending: list) -> None:
        progress.update(results=list(so_far), pending=list(pending))
        save(so_far, pending, False)

    limit = hard_limit_s if hard_limit_s is not None else (540.0 if suite == "gpu" else None)
    watchdog = None if limit is None else _arm_hard_limit(limit, started, progress, save, log)
    try:
        save([], list(jobs), False)  # a report exists from the start, whatever stops the run
        if run_tests:
            log(("collecting" if dry_run else "running") + f" the GPU tests ({lookup.describe()})")
            progress["running"] = "the GPU tests"
            tests = _run_gpu_tests(log, tests_timeout_s, lookup, collect_only=dry_run)
            progress["running"] = None
            save([], list(jobs), False)
        if plan.whole_command_rounds:
            _run_whole_command(plan, started, progress, save, log)
        # The budget counts from the command's start, tests included.
        results = benchmarks.run_plan(plan, dev, log=log, upstream=upstream, start=started, on_result=on_result)
        payload = save(results, [], True)
    finally:
        if watchdog is not None:  # the command is over (or failed): the watchdog must not fire later
            watchdog.cancel()
    failed = [r for r in results if r.status == "failed"]
    skipped = [r for r in results if r.status == "skipped"]
    for r in skipped:
        log(f"not run: {r.row} {r.size} b{r.batch}: {r.skipped}")
    for r in failed:
        log(f"failed row: {r.row} {r.size} b{r.batch}: {r.error}")
    if suite == "gpu" and not dry_run:
        for t in payload["targets"]:
            state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            log(f"target {t['target']}: {t['value']} ({t['bound']}) {state}")
    section = progress["whole_command"]
    if section is not None:
        log(benchmarks.format_whole_command(section))
    command_failed = section is not None and section.status == "failed"
    tests_failed = run_tests and not tests.get("ok", False)
    ok = len(results) - len(failed) - len(skipped)
    log(f"report: {out} ({payload['total_seconds']} s; {ok} rows ok, {len(failed)} failed, {len(skipped)} not run; "
        f"tests {'FAILED' if tests_failed else 'ok' if run_tests else 'not run'}"
        + ("" if section is None else f"; whole command {'FAILED' if command_failed else section.status}")
        + ")")
    if tests_failed or failed or command_failed:
        raise SystemExit(1)
