"""The README's own command, whole, with two priors and with glibc's malloc tuned or not, side by side.

    python bench/prior_speed.py --other build/prior/v2/ddfm-small.safetensors --reps 3

Runs ``ddfm-fast fuse IR VIS -o OUT`` on the 640x480 MSRS pair of the README (default steps of each model) as
a subprocess, interleaving the variants round by round so that a change in the machine's load hits all of them
alike: the shipped prior (the default, no ``--checkpoint``) and ``--other`` (another prior's file: the previous
one or a candidate, via ``--checkpoint``), each with the allocator tuning of the command line (``ddfm_fast._alloc``) and without it
(``DDFM_FAST_MALLOC=default``). Wall, user and system seconds of each run come from ``os.wait4``
(``ddfm_fast.benchmarks.time_command``, shared with ``ddfm-fast bench --suite cpu``, whose whole-command section
measures the README's ``--example`` command with the default prior against ``ddfm-small``); the report
gives their medians and checks that tuned and untuned runs of one prior write identical files. Writes
``bench/results/prior_speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from ddfm_fast.benchmarks import time_command

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
IR = DATA / "ivf/MSRS/ir/00004N.png"
VIS = DATA / "ivf/MSRS/vi/00004N.png"


def _run(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """One timed run (``ddfm_fast.benchmarks.time_command``: the timing ``ddfm-fast bench --suite cpu`` uses)."""
    r = time_command(cmd, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.error}")
    return {"wall_s": r.wall_s, "user_s": r.user_s, "sys_s": r.sys_s, "maxrss_mb": r.maxrss_mb}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", required=True, help="weights file of the prior to compare with the shipped one")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "prior_speed.json"))
    p.add_argument("--workdir", default=str(REPO / "build" / "prior_speed"))
    args = p.parse_args(argv)
    exe = str(Path(sys.executable).with_name("ddfm-fast"))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base_env = {k: v for k, v in os.environ.items() if k != "DDFM_FAST_MALLOC"}
    variants = {
        "shipped prior, malloc tuned": ([], {}),
        "shipped prior, malloc default": ([], {"DDFM_FAST_MALLOC": "default"}),
        "other prior, malloc tuned": (["--checkpoint", args.other], {}),
        "other prior, malloc default": (["--checkpoint", args.other], {"DDFM_FAST_MALLOC": "default"}),
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    loads = []
    for rep in range(args.reps):
        for name, (extra, env) in variants.items():
            out = work / (name.replace(" ", "_").replace(",", "") + ".png")
            cmd = [exe, "fuse", str(IR), str(VIS), "-o", str(out), "--overwrite", *extra]
            r = _run(cmd, {**base_env, **env})
            runs[name].append(r)
            loads.append(os.getloadavg()[0])
            print(f"rep {rep + 1} {name}: wall {r['wall_s']:.2f} s, user {r['user_s']:.2f}, sys {r['sys_s']:.2f}, "
                  f"load {loads[-1]:.1f}", flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    same = {prior: filecmp.cmp(work / f"{prior}_prior_malloc_tuned.png", work / f"{prior}_prior_malloc_default.png",
                               shallow=False) for prior in ("shipped", "other")}
    report = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "torch": torch.__version__, "threads": "torch default (all cores)",
        "command": f"ddfm-fast fuse {IR} {VIS} -o OUT.png --overwrite [--checkpoint OLD]",
        "pair": str(IR.name), "other": args.other, "reps": args.reps, "load_average_1min": loads,
        "runs": runs, "median": med, "identical_output_tuned_vs_default": same,
    }
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1))
    lines = ["# The README command, whole: shipped vs other prior, malloc tuned vs not", "",
             f"Generated {report['generated']} by `bench/prior_speed.py` on {report['machine']}, torch "
             f"{report['torch']}, {args.reps} interleaved rounds, 1-minute load average during the runs "
             f"{min(loads):.1f}-{max(loads):.1f} (other jobs shared the machine). `ddfm-fast fuse` of the 640x480 MSRS "
             "pair 00004N with each model's default steps; other prior: `--checkpoint " + args.other + "`.", "",
             "| variant | wall s (median) | user s | system s | max RSS MB |", "| --- | --- | --- | --- | --- |"]
    for k, v in med.items():
        lines.append(f"| {k} | {v['wall_s']:.2f} | {v['user_s']:.2f} | {v['sys_s']:.2f} | {v['maxrss_mb']:.0f} |")
    lines += ["", "Tuned and untuned runs write identical files: "
              + ", ".join(f"{k} prior {'yes' if v else 'NO'}" for k, v in same.items()) + ".", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
