"""Quality and time per DDIM step count with the shipped prior: the numbers behind README's "Choosing steps".

    OMP_NUM_THREADS=1 nice -n 10 python bench/steps_study.py --out bench/results/steps.json

Fuses a few small dev pairs of ``../shared/data`` (two MSRS, one TNO, one RoadScene; longer side downscaled to
``--max-side`` px with Pillow's box filter, rounded to integer grey levels, for fusing AND scoring, so sources
and fused image are compared at one size) with the shipped prior at each of ``--steps`` (3, 5, 10, 20, 50), and
with EM only (ablation I) at 20 iterations as the no-prior reference. Scores are ``ddfm_fast.metrics.evaluate``
(the CDDFuse evaluator's definitions; SSIM is the sum of two SSIMs). Time is the wall time of
``ddfm_fast.fuse`` per pair after one warm-up call (model already loaded), on the CPU with ``--threads``
threads, and the process's CPU time beside it: with one thread the CPU time is what the run costs on an idle
core, while the wall time also counts the waits for other jobs on a shared machine. Writes the JSON and a
markdown table beside it (``steps.md``), naming the prior file by its sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import ddfm_fast  # noqa: E402
import quality_report as qr  # noqa: E402 (bench/quality_report.py: the same pair loading)
from ddfm_fast.benchmarks import cpu_model  # noqa: E402
from ddfm_fast.checkpoint import PRESETS, resolve_preset  # noqa: E402
from ddfm_fast.metrics import evaluate  # noqa: E402

DATA = REPO.parent / "shared" / "data"
# (folder, file): A = infrared (ir/), B = visible (vi/)
PAIRS = [("ivf/MSRS", "00004N.png"), ("ivf/MSRS", "00055D.png"), ("ivf/TNO", "01.png"),
         ("ivf/RoadScene", "FLIR_00211.jpg")]
SHOWN = ("EN", "SD", "MI", "VIF", "Qabf", "SSIM")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(net, pairs, **options) -> dict:
    rows, seconds, cpu = [], [], []
    for a, b in pairs:
        t0, c0 = time.perf_counter(), time.process_time()
        res = ddfm_fast.fuse(a.astype(np.uint8), b.astype(np.uint8), model=net, device="cpu", **options)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        rows.append({k: float(v) for k, v in evaluate(res.fused.astype(np.float32), a, b).items()})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {"mean": mean, "images": rows, "seconds": seconds, "seconds_per_pair": float(np.mean(seconds)),
            "cpu_seconds": cpu, "cpu_seconds_per_pair": float(np.mean(cpu))}


def _markdown(rep: dict) -> str:
    s = rep["settings"]
    lines = [
        "# Quality and time per step count (shipped prior)",
        "",
        f"Generated {rep['generated']} by `bench/steps_study.py` on {rep['cpu']} with {s['threads']} thread(s) "
        f"(torch {rep['torch']}). Prior `{s['model']}` (`{s['model_file']}`, sha256 {rep['model_sha256'][:12]}). "
        f"{len(rep['pairs'])} dev pairs ({', '.join(rep['pairs'])}), longer side downscaled to {s['max_side']} px "
        f"(sizes {', '.join(rep['sizes'])}); means over the pairs; seconds per pair after a warm-up: the "
        f"process's CPU time (one thread: the cost on an idle core) and the wall time, with a 1-minute load "
        f"average of {rep['load_average'][0]} before and {rep['load_average'][1]} after on {rep['cpu_count']} "
        "cores (other jobs were running, so wall times are longer than on an idle machine).",
        "",
        "| steps | " + " | ".join(SHOWN) + " | CPU s/pair | wall s/pair |",
        "| --- | " + " | ".join("---" for _ in SHOWN) + " | --- | --- |",
    ]
    for key, r in rep["runs"].items():
        lines.append(f"| {key} | " + " | ".join(f"{r['mean'][k]:.2f}" for k in SHOWN)
                     + f" | {r['cpu_seconds_per_pair']:.2f} | {r['seconds_per_pair']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "steps.json"))
    p.add_argument("--model", default="ddfm-small", help="preset name or weights file")
    p.add_argument("--steps", default="3,5,10,20,50")
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_file = resolve_preset(args.model) if args.model in PRESETS else Path(args.model)
    net = ddfm_fast.load_model(args.model)
    pairs = [qr.load_pair(DATA / folder, "ir", "vi", name, args.max_side) for folder, name in PAIRS]
    ddfm_fast.fuse(pairs[0][0].astype(np.uint8), pairs[0][1].astype(np.uint8), model=net, device="cpu", steps=3)
    load_before = os.getloadavg()
    runs: dict = {}
    for steps in (int(x) for x in args.steps.split(",")):
        runs[str(steps)] = _run(net, pairs, steps=steps)
        print(f"{steps:>3} steps: " + " ".join(f"{k} {runs[str(steps)]['mean'][k]:.3f}" for k in SHOWN)
              + f"  {runs[str(steps)]['cpu_seconds_per_pair']:.2f} CPU s/pair"
              + f" ({runs[str(steps)]['seconds_per_pair']:.2f} s wall)", flush=True)
    runs["EM only, 20 iterations"] = _run(None, pairs, prior="none", steps=20)
    load_after = os.getloadavg()
    cpu = cpu_model()
    rep = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        # 1-minute load average before and after: other jobs on the machine slow the timings down.
        "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
        "settings": {"model": args.model, "model_file": model_file.name, "threads": args.threads,
                     "max_side": args.max_side, "steps": args.steps},
        "model_sha256": _sha256(model_file),
        "pairs": [f"{folder.split('/')[-1]} {name}" for folder, name in PAIRS],
        "sizes": [f"{a.shape[1]}x{a.shape[0]}" for a, _ in pairs],
        "runs": runs,
    }
    out.write_text(json.dumps(rep, indent=1) + "\n")
    out.with_name("steps.md").write_text(_markdown(rep))
    print(f"wrote {out} and {out.with_name('steps.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
