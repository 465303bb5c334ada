"""Choose the shrinkage prior's contrast k and step count on training-pool pairs (never the dev pairs).

    python bench/shrinkage_fit.py --out bench/results/shrinkage_fit.json

Fuses up to ``--pairs`` infrared/visible pairs of each set in ``shared/data/train`` (spread evenly over the sorted
names; longer side <= ``--max-side``) with ``ddfm_fast.shrinkage.ShrinkagePrior`` at every contrast of
``--contrasts`` and ``--steps`` steps, and with EM only (the baseline the issue sets). Scores the six paper
metrics (``ddfm_fast.metrics.evaluate``), averages them over each set, then over the sets, and picks the contrast
that beats EM only on the most metrics (ties: the best mean rank over the six metrics among the tied contrasts, so no
one metric's scale decides). The step count is then swept at
that contrast (``--step-grid``). Writes the JSON and a markdown table beside it. The chosen values are what
``ddfm_fast/shrinkage.py`` ships; ``bench/quality_report.py`` then scores them on the dev pairs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import quality_report as qr  # noqa: E402
from ddfm_fast.shrinkage import ShrinkagePrior  # noqa: E402

KEYS = qr.PAPER_KEYS
SETS = ("RoadScene", "TNO", "MSRS")


def training_pairs(per_set: int, max_side: int, root: Path = qr.DATA / "train"
                   ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    out = {}
    for name in SETS:
        folder = root / name
        stems = sorted(p.name for p in (folder / "ir").iterdir() if (folder / "vi" / p.name).is_file())
        picks = [stems[i] for i in np.linspace(0, len(stems) - 1, min(per_set, len(stems))).round().astype(int)]
        out[name] = [qr.load_pair(folder, "ir", "vi", n, max_side) for n in dict.fromkeys(picks)]
    return out


def _set_means(rows: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    per_set = [qr._mean(r) for r in rows.values()]
    return {k: float(np.mean([m[k] for m in per_set])) for k in KEYS}


def _compare(m: dict[str, float], base: dict[str, float]) -> tuple[int, float]:
    wins = sum(m[k] > base[k] for k in KEYS)
    return wins, float(np.mean([(m[k] - base[k]) / abs(base[k]) for k in KEYS]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--pairs", type=int, default=8, help="pairs per training set")
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--contrasts", default="0,0.1,0.2,0.3,0.5,0.7,1")
    p.add_argument("--step-grid", default="5,10,20,50")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = training_pairs(args.pairs, args.max_side)

    def run(contrast: float | None, steps: int) -> dict[str, float]:
        rows: dict[str, list[dict[str, float]]] = {}
        for name, pairs in data.items():
            if contrast is None:
                rows[name] = [qr._score(qr._fuse_em(a, b, steps)[0], a, b) for a, b in pairs]
            else:
                net = ShrinkagePrior(contrast, default_steps=steps)
                rows[name] = [qr._score(qr._fuse_prior(net, a, b, steps)[0], a, b) for a, b in pairs]
        return _set_means(rows)

    t0 = time.perf_counter()
    base = run(None, args.steps)
    sweep = []
    for c in (float(x) for x in args.contrasts.split(",")):
        m = run(c, args.steps)
        wins, gain = _compare(m, base)
        sweep.append({"contrast": c, "steps": args.steps, **m, "wins": wins, "mean_rel_gain": gain})
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in sweep[-1].items()}), flush=True)
    top = [r for r in sweep if r["wins"] == max(x["wins"] for x in sweep)]
    for r in top:
        # Rank 1 is the best value of a metric among the tied contrasts (every metric here is higher-is-better).
        r["mean_rank"] = float(np.mean([1 + sum(o[k] > r[k] for o in top) for k in KEYS]))
    best = min(top, key=lambda r: r["mean_rank"])["contrast"]
    step_rows = []
    for steps in (int(x) for x in args.step_grid.split(",")):
        b = run(None, steps)
        m = run(best, steps)
        wins, gain = _compare(m, b)
        step_rows.append({"contrast": best, "steps": steps, **m, "wins": wins, "mean_rel_gain": gain,
                          "em_only": b})
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in step_rows[-1].items()
                          if k != "em_only"}), flush=True)
    report = {
        **run_record("shrinkage_fit.py", argv),
        "pairs": {name: len(v) for name, v in data.items()}, "max_side": args.max_side,
        "em_only": base, "sweep": sweep, "best_contrast": best, "steps": step_rows,
        "seconds": time.perf_counter() - t0,
    }
    write_report(Path(args.out), report, _markdown(report))
    return 0


def run_record(script: str, argv: list[str] | None) -> dict[str, str]:
    """When, how and where a bench script ran: the head of its JSON report (1 thread, as these scripts set)."""
    return {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()}, CPU, 1 thread, torch {torch.__version__}"}


def write_report(out: Path, report: dict, markdown: str) -> None:
    """The JSON report at ``out`` and its markdown beside it (same name, ``.md``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _markdown(r: dict) -> str:
    head = "| contrast k | steps | " + " | ".join(KEYS) + " | wins vs EM only | mean relative gain | mean rank |"
    sep = "| --- " * (len(KEYS) + 5) + "|"
    row = lambda x: (f"| {x['contrast']:g} | {x['steps']} | " + " | ".join(f"{x[k]:.3f}" for k in KEYS)  # noqa: E731
                     + f" | {x['wins']} | {100 * x['mean_rel_gain']:+.1f}% | "
                     + (f"{x['mean_rank']:.2f} |" if "mean_rank" in x else " |"))
    pairs = ", ".join(f"{n} {c}" for n, c in r["pairs"].items())
    lines = [
        "# Choosing the shrinkage prior's contrast and steps (training-pool pairs only)", "",
        f"Generated {r['generated']} by `{r['command']}` ({r['machine']}). Pairs from `shared/data/train`: {pairs} "
        f"(spread evenly over the sorted names), longer side <= {r['max_side']} px. Metrics are means over each "
        "set, then over the three sets; a win is a metric above EM-only fusion on the same pairs and steps.", "",
        "## Contrast", "",
        "| EM only | " + str(r["sweep"][0]["steps"]) + " | " + " | ".join(f"{r['em_only'][k]:.3f}" for k in KEYS)
        + " |  |  |  |",
    ]
    lines[-1:] = [head, sep, lines[-1]] + [row(x) for x in r["sweep"]]
    lines += ["", f"Chosen contrast: **{r['best_contrast']:g}** (most wins, then the best mean rank among the tied).",
              "", "## Steps at that contrast", "", head, sep]
    for x in r["steps"]:
        lines.append(f"| EM only | {x['steps']} | " + " | ".join(f"{x['em_only'][k]:.3f}" for k in KEYS) + " |  |  |  |")
        lines.append(row(x))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
