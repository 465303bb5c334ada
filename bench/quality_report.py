"""Quality of the shipped small prior (ddfm-small) against EM-only fusion and the DDFM paper's published numbers.

    python bench/quality_report.py --out bench/results/quality.json

For every dev set in shared/data (IVF: RoadScene, TNO, MSRS; MIF: MRI_CT, MRI_PET, MRI_SPECT) it fuses the first
``--pairs`` pairs (sorted by name) with
  (a) ddfm-small at its default step count,
  (b) EM only (ablation I, ``ddfm_fast.em_only``) with the same number of EM steps,
and on ``--long-pairs`` pairs (the first of each IVF set) also
  (c) ddfm-small at ``--long-steps`` (100) steps, next to (a) on the same pairs.
Scores: ``ddfm_fast.metrics.evaluate`` (the CDDFuse evaluator's definitions; A = infrared / functional,
B = visible / MRI), sources read with ``metrics.read_gray_eval``. Images whose longer side exceeds ``--max-side`` are
downscaled (Pillow box filter, rounded to integer grey levels) before fusing AND scoring, so the sources and the
fused image are always compared at one size. Writes the JSON, a markdown table (``quality.md``) and a montage
(``montage.png``: IR | visible | EM only | ddfm-small) beside ``--out``.
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
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ddfm_fast  # noqa: E402
from ddfm_fast import io  # noqa: E402
from ddfm_fast.config import SamplerConfig  # noqa: E402
from ddfm_fast.em_only import fuse_em_only, postprocess_em_only  # noqa: E402
from ddfm_fast.metrics import evaluate, read_gray_eval  # noqa: E402
from ddfm_fast.train import read_training_record  # noqa: E402

DATA = REPO.parent / "shared" / "data"
# (set name, folder, A = infrared / functional, B = visible / MRI, paper row)
SETS = [
    ("RoadScene", "ivf/RoadScene", "ir", "vi", "RoadScene"),
    ("TNO", "ivf/TNO", "ir", "vi", "TNO"),
    ("MSRS", "ivf/MSRS", "ir", "vi", "MSRS"),
    ("MRI_CT", "mif/MRI_CT", "CT", "MRI", "Harvard (MIF)"),
    ("MRI_PET", "mif/MRI_PET", "PET", "MRI", "Harvard (MIF)"),
    ("MRI_SPECT", "mif/MRI_SPECT", "SPECT", "MRI", "Harvard (MIF)"),
]
IVF = ("RoadScene", "TNO", "MSRS")
# DDFM, ICCV 2023 (shared/docs/METRICS.md): EN, SD, MI, VIF, Qabf, SSIM.
PAPER_KEYS = ("EN", "SD", "MI", "VIF", "Qabf", "SSIM")
PAPER = {
    "MSRS": (6.88, 40.75, 2.35, 0.81, 0.58, 0.94),
    "RoadScene": (7.41, 52.61, 2.35, 0.75, 0.65, 0.98),
    "TNO": (7.06, 51.42, 2.21, 0.81, 0.49, 0.95),
    "Harvard (MIF)": (4.64, 63.11, 1.99, 0.76, 0.60, 1.41),
    "RoadScene, EM only (ablation I)": (7.19, 41.82, 2.11, 0.60, 0.42, 0.92),
}
SHOWN = ("EN", "SD", "MI", "VIF", "Qabf", "SSIM", "SF", "AG", "SCD", "CC")


def load_pair(folder: Path, a_dir: str, b_dir: str, name: str, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    a = read_gray_eval(folder / a_dir / name)
    b = read_gray_eval(folder / b_dir / name)
    h, w = a.shape
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(65, round(w * scale)), max(65, round(h * scale)))
        a, b = (np.round(np.asarray(Image.fromarray(x).resize(size, Image.BOX), dtype=np.float32)) for x in (a, b))
    return a.astype(np.float32), b.astype(np.float32)


def _fuse_prior(net, a: np.ndarray, b: np.ndarray, steps: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    res = ddfm_fast.fuse(a.astype(np.uint8), b.astype(np.uint8), model=net, steps=steps, device="cpu")
    return res.fused, time.perf_counter() - t0


def _fuse_em(a: np.ndarray, b: np.ndarray, steps: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    I = io.to_model_range(b / np.float32(255))  # noqa: E741  anchor = visible / MRI (official roles)
    V = io.to_model_range(a / np.float32(255))  # partner = infrared / functional
    out = postprocess_em_only(fuse_em_only(I, V, SamplerConfig(prior="none", steps=steps)))
    return out, time.perf_counter() - t0


def _score(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in evaluate(fused.astype(np.float32), a, b).items()}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _tile(img: np.ndarray, height: int) -> Image.Image:
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return im.resize((max(1, round(im.width * height / im.height)), height), Image.BILINEAR)


def _montage(rows: list[list[np.ndarray]], path: Path, height: int = 150, gap: int = 4) -> None:
    tiles = [[_tile(x, height) for x in row] for row in rows]
    width = max(sum(t.width for t in row) + gap * (len(row) - 1) for row in tiles)
    canvas = Image.new("L", (width, len(tiles) * height + gap * (len(tiles) - 1)), 255)
    for r, row in enumerate(tiles):
        x = 0
        for t in row:
            canvas.paste(t, (x, r * (height + gap)))
            x += t.width + gap
    canvas.save(path, optimize=True)


def _fmt(v: float) -> str:
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"


def _markdown(report: dict) -> str:
    cfg = report["settings"]
    lines = [
        "# ddfm-small vs EM only vs the DDFM paper",
        "",
        f"Generated {report['generated']} by `bench/quality_report.py` on {report['machine']} (CPU, "
        f"{cfg['threads']} threads, torch {report['torch']}). Prior: `{cfg['model']}` "
        f"({report['model']['parameters'] / 1e6:.2f} M parameters, trained {report['model']['steps_done']} steps), "
        f"default steps {cfg['steps']}. First {cfg['pairs']} pairs of each dev set (sorted by name), longer side "
        f"downscaled to at most {cfg['max_side']} px (box filter) for fusing and scoring. Metrics: "
        "`ddfm_fast.metrics.evaluate` (CDDFuse evaluator definitions; SSIM is the sum of two). "
        "EM only (ablation I) starts from (I + V) / 2, a near-fixed point of the EM step, so it is the average "
        "fusion to within 1e-4 (see `ddfm_fast/em_only.py`). Paper rows are the published full-test-set numbers "
        "(the paper's prior is the 552.8 M-parameter ADM at 100 steps); they are not the same images.",
        "",
        "| set | method | " + " | ".join(SHOWN) + " | s/pair |",
        "| --- | --- | " + " | ".join("---" for _ in SHOWN) + " | --- |",
    ]
    for name, res in report["sets"].items():
        paper = report["paper"].get(res["paper_row"])
        if paper:
            vals = [_fmt(paper[k]) if k in paper else "" for k in SHOWN]
            lines.append(f"| {name} | paper DDFM ({res['paper_row']}) | " + " | ".join(vals) + " | |")
        if name == "RoadScene":
            abl = report["paper"]["RoadScene, EM only (ablation I)"]
            lines.append("| RoadScene | paper EM only (ablation I) | "
                         + " | ".join(_fmt(abl[k]) if k in abl else "" for k in SHOWN) + " | |")
        for method in ("em_only", "prior"):
            m = res[method]
            label = {"em_only": f"ours EM only ({cfg['steps']} it)", "prior": f"ours ddfm-small ({cfg['steps']} st)"}
            lines.append(f"| {name} | {label[method]} | " + " | ".join(_fmt(m['mean'][k]) for k in SHOWN)
                         + f" | {m['seconds_per_pair']:.1f} |")
    lines += ["", "## IVF dev sets together (RoadScene + TNO + MSRS)", ""]
    ivf = report["ivf_summary"]
    lines += ["| method | " + " | ".join(PAPER_KEYS) + " |", "| --- | " + " | ".join("---" for _ in PAPER_KEYS) + " |"]
    for method in ("em_only", "prior"):
        lines.append(f"| {method} | " + " | ".join(_fmt(ivf[method][k]) for k in PAPER_KEYS) + " |")
    lines.append("| prior - EM only | " + " | ".join(f"{ivf['prior'][k] - ivf['em_only'][k]:+.3f}"
                                                    for k in PAPER_KEYS) + " |")
    lines += ["", f"ddfm-small beats EM only on {ivf['wins']} of {len(PAPER_KEYS)} "
              f"({', '.join(ivf['won']) or 'none'}); target: at least 4.", ""]
    long = report.get("long")
    if long:
        lines += [f"## {cfg['long_steps']} steps vs {cfg['steps']} steps (same pairs: "
                  f"{', '.join(long['pairs'])})", "",
                  "| method | " + " | ".join(SHOWN) + " | s/pair |",
                  "| --- | " + " | ".join("---" for _ in SHOWN) + " | --- |"]
        for key in ("default", "long", "em_only"):
            m = long[key]
            lines.append(f"| {m['label']} | " + " | ".join(_fmt(m['mean'][k]) for k in SHOWN)
                         + f" | {m['seconds_per_pair']:.1f} |")
    lines += ["", "Montage (`montage.png`): IR / functional | visible / MRI | EM only | ddfm-small.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "quality.json"))
    p.add_argument("--model", default="ddfm-small", help="preset name or weights file")
    p.add_argument("--steps", type=int, default=None, help="default: the model's own default steps")
    p.add_argument("--pairs", type=int, default=5, help="pairs per dev set (first N by name)")
    p.add_argument("--max-side", type=int, default=640, help="downscale images whose longer side exceeds this")
    p.add_argument("--long-steps", type=int, default=100)
    p.add_argument("--long-max-side", type=int, default=320, help="downscale for the long-step runs")
    p.add_argument("--no-long", action="store_true", help="skip the long-step comparison")
    p.add_argument("--sets", default=",".join(s[0] for s in SETS))
    p.add_argument("--montage-pairs", default="RoadScene,TNO,MSRS,MRI_PET")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    net = ddfm_fast.load_model(args.model)
    steps = args.steps or net.default_steps
    path = ddfm_fast.checkpoint.resolve_preset(args.model) if args.model in ddfm_fast.checkpoint.PRESETS \
        else Path(args.model)
    record = read_training_record(path)
    wanted = args.sets.split(",")
    report: dict = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.node()}",
        "torch": torch.__version__,
        "command": " ".join(["python", "bench/quality_report.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"model": args.model, "steps": steps, "pairs": args.pairs, "max_side": args.max_side,
                     "long_steps": args.long_steps, "long_max_side": args.long_max_side, "threads": args.threads,
                     "seed": 3407, "size_policy": "pad"},
        "model": {"parameters": sum(p.numel() for p in net.parameters()), "config": net.config.to_dict(),
                  "default_steps": net.default_steps, "steps_done": record.get("steps_done"),
                  "train_seconds": record.get("train_seconds")},
        "paper": {k: dict(zip(PAPER_KEYS, v)) for k, v in PAPER.items()},
        "sets": {},
    }
    montage_rows = []
    for name, rel, a_dir, b_dir, paper_row in SETS:
        if name not in wanted:
            continue
        folder = DATA / rel
        names = sorted(p.name for p in (folder / a_dir).iterdir())[: args.pairs]
        res = {"paper_row": paper_row, "pairs": names, "em_only": {"rows": []}, "prior": {"rows": []}}
        for n in names:
            a, b = load_pair(folder, a_dir, b_dir, n, args.max_side)
            fp, tp = _fuse_prior(net, a, b, steps)
            fe, te = _fuse_em(a, b, steps)
            res["prior"]["rows"].append({"pair": n, "size": list(a.shape), "seconds": tp, **_score(fp, a, b)})
            res["em_only"]["rows"].append({"pair": n, "size": list(a.shape), "seconds": te, **_score(fe, a, b)})
            print(f"{name} {n} {a.shape[1]}x{a.shape[0]}: prior {tp:.1f}s  EN {res['prior']['rows'][-1]['EN']:.2f} "
                  f"Qabf {res['prior']['rows'][-1]['Qabf']:.3f} | EM EN {res['em_only']['rows'][-1]['EN']:.2f} "
                  f"Qabf {res['em_only']['rows'][-1]['Qabf']:.3f}", flush=True)
            if name in args.montage_pairs.split(",") and n == names[0]:
                montage_rows.append([a, b, fe, fp])
        for method in ("em_only", "prior"):
            rows = res[method]["rows"]
            res[method]["mean"] = _mean([{k: r[k] for k in r if k not in ("pair", "size", "seconds")} for r in rows])
            res[method]["seconds_per_pair"] = float(np.mean([r["seconds"] for r in rows]))
        report["sets"][name] = res

    ivf_rows = {m: [r for s in IVF if s in report["sets"] for r in report["sets"][s][m]["rows"]]
                for m in ("em_only", "prior")}
    if ivf_rows["prior"]:
        means = {m: _mean([{k: r[k] for k in PAPER_KEYS} for r in rows]) for m, rows in ivf_rows.items()}
        won = [k for k in PAPER_KEYS if means["prior"][k] > means["em_only"][k]]
        report["ivf_summary"] = {**means, "won": won, "wins": len(won), "pairs": len(ivf_rows["prior"])}

    if not args.no_long:
        pairs, rows = [], {"default": [], "long": [], "em_only": []}
        secs = {"default": [], "long": [], "em_only": []}
        for name, rel, a_dir, b_dir, _ in SETS:
            if name not in IVF or name not in wanted:
                continue
            folder = DATA / rel
            n = sorted(p.name for p in (folder / a_dir).iterdir())[0]
            a, b = load_pair(folder, a_dir, b_dir, n, args.long_max_side)
            pairs.append(f"{name}/{n} ({a.shape[1]}x{a.shape[0]})")
            for key, fn in (("default", lambda: _fuse_prior(net, a, b, steps)),
                            ("long", lambda: _fuse_prior(net, a, b, args.long_steps)),
                            ("em_only", lambda: _fuse_em(a, b, args.long_steps))):
                f, t = fn()
                rows[key].append(_score(f, a, b))
                secs[key].append(t)
            print(f"long: {pairs[-1]} default {rows['default'][-1]['Qabf']:.3f} long {rows['long'][-1]['Qabf']:.3f}",
                  flush=True)
        labels = {"default": f"ddfm-small, {steps} steps", "long": f"ddfm-small, {args.long_steps} steps",
                  "em_only": f"EM only, {args.long_steps} iterations"}
        report["long"] = {"pairs": pairs, **{k: {"label": labels[k], "mean": _mean(rows[k]), "rows": rows[k],
                                                 "seconds_per_pair": float(np.mean(secs[k]))} for k in rows}}

    out.write_text(json.dumps(report, indent=1))
    (out.parent / "quality.md").write_text(_markdown(report))
    if montage_rows:
        _montage(montage_rows, out.parent / "montage.png")
    print((out.parent / "quality.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
