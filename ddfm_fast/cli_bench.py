"""``ddfm-fast bench``: the speed waterfall (and, on a GPU, the GPU correctness tests) in one command."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import click


def _tests_dir() -> Optional[Path]:
    """The checkout's tests/ (present for ``pip install -e .`` from a clone; absent in a wheel install)."""
    import ddfm_fast

    candidate = Path(ddfm_fast.__file__).resolve().parents[1] / "tests"
    return candidate if (candidate / "test_gpu.py").is_file() else None


def _run_gpu_tests(log, timeout_s: float) -> dict:
    tests = _tests_dir()
    if tests is None:
        return {"ran": False, "reason": "tests/ not found: run from a checkout installed with pip install -e ."}
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # compile the kernels for the GPU
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_gpu.py"),
           str(tests / "test_kernels.py"), "-k", "not interpreter"]
    t0 = time.perf_counter()
    # Its own session, so that a timeout stops pytest and whatever it started (inductor's compile workers).
    proc = subprocess.Popen(cmd, cwd=tests.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:  # the benchmarks still run; the command exits non-zero at the end
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        code = 124
        text = (text or "") + f"\nddfm-fast bench: the GPU tests ran past {timeout_s:g} s and were stopped"
    tail = text.strip().splitlines()[-25:]
    for line in tail:
        log(line)
    return {"ran": True, "exit_code": code, "seconds": round(time.perf_counter() - t0, 1),
            "command": " ".join(cmd), "tail": tail}


def _whole_command_seconds(log, repeats: int = 3) -> dict:
    """``ddfm-fast fuse IR VIS -o OUT`` with the default prior on a 640x480 pair, as a user runs it (median of 3).

    Uses MSRS 00004N from ``../shared/data`` beside the checkout when present, else a synthetic 640x480 pair.
    """
    import statistics
    import tempfile

    import numpy as np
    from PIL import Image

    tests = _tests_dir()
    shared = Path(os.environ.get("DDFM_SHARED", tests.parent.parent / "shared" if tests else "shared"))
    ir, vis = shared / "data/ivf/MSRS/ir/00004N.png", shared / "data/ivf/MSRS/vi/00004N.png"
    with tempfile.TemporaryDirectory() as tmp:
        if not (ir.is_file() and vis.is_file()):
            rng = np.random.default_rng(0)
            yy, xx = np.mgrid[0:480, 0:640]
            base = (127 + 100 * np.sin(xx / 40.0) * np.cos(yy / 30.0)).astype(np.float64)
            ir, vis = Path(tmp) / "ir.png", Path(tmp) / "vis.png"
            Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)).save(ir)
            Image.fromarray(np.clip(255 - base, 0, 255).astype(np.uint8)).save(vis)
        cmd = [sys.executable, "-m", "ddfm_fast", "fuse", str(ir), str(vis), "-o", str(Path(tmp) / "out.png")]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                return {"error": proc.stderr.strip()[-500:], "command": " ".join(cmd)}
    result = {"pair": f"{ir.name} / {vis.name}", "size": "640x480", "runs_s": [round(t, 2) for t in times],
              "median_s": round(statistics.median(times), 2), "command": "ddfm-fast fuse IR VIS -o OUT"}
    log(f"whole command (default prior, 640x480): median {result['median_s']} s of {result['runs_s']}")
    return result


@click.command("bench")
@click.option("--suite", type=click.Choice(["gpu", "cpu", "quick"]), default="gpu", show_default=True,
              help="gpu: GPU correctness tests + the waterfall with the paper-size model (needs CUDA, < 8 min); "
                   "cpu: the waterfall with the shipped prior's config on this CPU, and the whole "
                   "`ddfm-fast fuse` command on a 640x480 pair (median of 3); quick: a seconds-long check.")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="JSON report (default: bench/results/<suite>-<date>.json in a checkout, else ./).")
@click.option("--no-tests", is_flag=True, help="gpu suite: skip the correctness tests, only benchmark.")
@click.option("--device", default=None, help="Device (default: cuda for gpu, cpu otherwise).")
@click.option("--upstream", type=click.Path(path_type=Path), metavar="PATH",
              help="A clone of the official MMIF-DDFM: its sampler runs on the same inputs and weights at the "
                   "waterfall size (batch 1), and every row gets its speed-up over it. The cpu/quick suites "
                   "then use a tiny ADM model the official code can build.")
@click.option("--budget-s", type=click.FloatRange(min=0), default=None,
              help="Seconds after the command's start (tests included) within which a benchmark row may start "
                   "(default: the suite's; gpu 420). Rows not started in time are reported as skipped.")
@click.option("--tests-timeout-s", type=click.FloatRange(min=1), default=240.0, show_default=True,
              help="gpu suite: stop the correctness tests after this long (reported as failed, exit code 124).")
def bench_command(suite: str, out: Optional[Path], no_tests: bool, device: Optional[str],
                  upstream: Optional[Path], budget_s: Optional[float], tests_timeout_s: float) -> None:
    """Benchmark the fast path row by row (fp32 eager -> fp16 -> + SDPA -> + compile -> + Triton tail ->
    + CUDA graphs): time per image, images/s, peak memory and PSNR of the 8-bit output against fp32.

    Run it on a GPU machine after `pip install --no-deps --no-build-isolation -e .` from a checkout:
    `ddfm-fast bench --suite gpu`. The report (JSON) names the device, versions, sizes and date.
    """
    import torch

    from ddfm_fast import benchmarks
    from ddfm_fast.upstream import UpstreamError, check_clone

    if upstream is not None:
        try:
            upstream = check_clone(upstream)
        except UpstreamError as exc:
            raise click.BadParameter(str(exc), param_hint="--upstream") from exc
    dev = torch.device(device or ("cuda" if suite == "gpu" else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("the gpu suite needs a CUDA device; torch sees none (use --suite cpu here)")
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    env = benchmarks.environment()
    log(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, python {env['python']}")
    started = time.perf_counter()
    run_tests = suite == "gpu" and not no_tests
    tests: dict = {"ran": False, "reason": ("running" if run_tests else
                                            "not the gpu suite" if suite != "gpu" else "--no-tests")}
    plan = benchmarks.plan_for(suite, upstream=upstream is not None)
    if budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=budget_s)
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        root = _tests_dir().parent / "bench" / "results" if _tests_dir() is not None else Path(".")
        out = root / f"{suite}-{stamp}.json"

    def save(results: list, complete: bool, **extra: object) -> dict:
        # Rewritten (atomically) after the tests and after every row: a run stopped by a time limit keeps its
        # measurements, marked "complete": false.
        payload = benchmarks.results_payload(results, suite=suite, steps=plan.steps, tests=tests, complete=complete,
                                             total_seconds=round(time.perf_counter() - started, 1),
                                             model=plan.config.to_dict(),
                                             upstream=None if upstream is None else str(upstream), **extra)
        benchmarks.write_report(out, payload)
        return payload

    save([], False)  # a report exists from the start, whatever stops the run
    if run_tests:
        tests = _run_gpu_tests(log, tests_timeout_s)
        save([], False)
    # The budget counts from the command's start, tests included: the whole gpu suite aims at 8 minutes.
    results = benchmarks.run_plan(plan, dev, log=log, upstream=upstream, start=started,
                                  on_result=lambda so_far: save(so_far, False))
    extra = {"whole_command": _whole_command_seconds(log)} if suite == "cpu" else {}
    payload = save(results, True, **extra)
    click.echo(f"report: {out} ({payload['total_seconds']} s)", err=True)
    failed = [r for r in results if r.error and not r.error.startswith("skipped")]
    for r in failed:
        log(f"failed row: {r.row} {r.size} b{r.batch}: {r.error}")
    if tests.get("exit_code") not in (None, 0) or failed:
        raise SystemExit(1)
