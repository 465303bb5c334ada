"""Quality of the shipped prior against EM-only fusion, another prior and the DDFM paper's published numbers.

    python bench/quality_report.py --out bench/results/quality.json --max-side 480

For every dev set in shared/data (IVF: RoadScene, TNO, MSRS; MIF: MRI_CT, MRI_PET, MRI_SPECT) it fuses the first
``--pairs`` pairs (sorted by name) with
  (a) ``--model`` (default: the shipped prior, ``ddfm_fast.api.DEFAULT_PRIOR``) at its default step count,
  (b) EM only (ablation I, ``ddfm_fast.em_only``) with the same number of EM steps,
  (c) ``--reference`` (default: the trained ``ddfm-small``) at its default step count, for comparison,
and on the first pair of each IVF set also
  (d) the model at ``--long-steps`` (100) steps, next to (a) on the same pairs.
Wins count the paper's six metrics (EN, SD, MI, VIF, Qabf, SSIM) where a prior's mean is above EM only's: over the
IVF pairs together, and per MIF set. Scores: ``ddfm_fast.metrics.evaluate`` (the CDDFuse evaluator's definitions; A = infrared / functional,
B = visible / MRI), sources read with ``metrics.read_gray_eval``. Images whose longer side exceeds ``--max-side`` are
downscaled (Pillow box filter, rounded to integer grey levels) before fusing AND scoring, so the sources and the
fused image are always compared at one size. Writes the JSON, a markdown table (``quality.md``) and a montage
(``montage.png``: IR | visible | EM only | reference | model) beside ``--out``.
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
from ddfm_fast.api import DEFAULT_PRIOR  # noqa: E402
from ddfm_fast.checkpoint import PRESETS, resolve_preset  # noqa: E402
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
MIF = ("MRI_CT", "MRI_PET", "MRI_SPECT")
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
    names = {m: info["name"] for m, info in report["models"].items()}
    described = "; ".join(f"`{info['name']}`: {_model_text(info)}" for info in report["models"].values())
    methods = ["em_only", *report["models"]]
    lines = [
        f"# {names['prior']} vs EM only vs {names.get('reference', 'the DDFM paper')}",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']} (CPU, "
        f"{cfg['threads']} threads, torch {report['torch']}). Priors: {described}. First {cfg['pairs']} pairs of each dev set (sorted by name), longer side "
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
        for method in methods:
            m = res[method]
            label = (f"ours EM only ({cfg['steps']} it)" if method == "em_only"
                     else f"ours {names[method]} ({report['models'][method]['steps']} st)")
            lines.append(f"| {name} | {label} | " + " | ".join(_fmt(m['mean'][k]) for k in SHOWN)
                         + f" | {m['seconds_per_pair']:.1f} |")
    for title, key in (("IVF dev sets together (RoadScene + TNO + MSRS)", "ivf_summary"),):
        if key not in report:
            continue
        summ = report[key]
        lines += ["", f"## {title}", "",
                  "| method | " + " | ".join(PAPER_KEYS) + " | wins vs EM only |",
                  "| --- | " + " | ".join("---" for _ in PAPER_KEYS) + " | --- |"]
        for method in methods:
            won = "" if method == "em_only" else f"{summ['wins'][method]} ({', '.join(summ['won'][method])})"
            lines.append(f"| {names.get(method, 'EM only')} | " + " | ".join(_fmt(summ['mean'][method][k])
                                                                         for k in PAPER_KEYS) + f" | {won} |")
    if "mif_summary" in report:
        lines += ["", "## MIF dev sets: metrics worse than EM only, per set", "",
                  "| set | " + " | ".join(names[m] for m in report["models"]) + " |",
                  "| --- | " + " | ".join("---" for _ in report["models"]) + " |"]
        for set_name, per in report["mif_summary"].items():
            lines.append(f"| {set_name} | " + " | ".join(f"{len(per[m])} ({', '.join(per[m]) or 'none'})"
                                                        for m in report["models"]) + " |")
    ivf = report.get("ivf_summary")
    if ivf:
        worst_mif = max((len(per["prior"]) for per in report.get("mif_summary", {}).values()), default=0)
        lines += ["", f"`{names['prior']}` beats EM only on {ivf['wins']['prior']} of {len(PAPER_KEYS)} IVF metrics "
                  f"(target: at least 4) and is worse than EM only on at most {worst_mif} of {len(PAPER_KEYS)} "
                  "metrics in any MIF set (target: at most 2).", ""]
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
    lines += ["", "Montage (`montage.png`): IR / functional | visible / MRI | EM only | "
              + " | ".join(names[m] for m in reversed(report["models"])) + ".", ""]
    return "\n".join(lines)


def _model_text(info: dict) -> str:
    if info["parameters"] == 0:
        return f"analytic, no parameters, {info['steps']} steps"
    trained = f", trained {info['steps_done']} steps" if info.get("steps_done") else ""
    return f"{info['parameters'] / 1e6:.2f} M parameters{trained}, {info['steps']} steps"


def _model_info(name: str, net) -> dict:
    preset = PRESETS.get(name)
    record = {} if preset is not None and preset.analytic else read_training_record(
        resolve_preset(name) if preset is not None else Path(name))
    config = getattr(net, "config", None)
    return {"name": name, "parameters": sum(p.numel() for p in net.parameters()), "steps": net.default_steps,
            "config": config.to_dict() if config is not None else repr(net),
            "steps_done": record.get("steps_done"), "train_seconds": record.get("train_seconds")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "quality.json"))
    p.add_argument("--model", default=DEFAULT_PRIOR, help="preset name or weights file (default: the shipped prior)")
    p.add_argument("--reference", default="ddfm-small", help="a second prior to compare ('' for none)")
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
    nets = {"prior": (net, steps)}
    if args.reference:
        ref = ddfm_fast.load_model(args.reference)
        nets["reference"] = (ref, ref.default_steps)
    methods = ["em_only", *nets]
    wanted = args.sets.split(",")
    report: dict = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.node()}",
        "torch": torch.__version__,
        "command": " ".join(["python", "bench/quality_report.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"model": args.model, "steps": steps, "pairs": args.pairs, "max_side": args.max_side,
                     "long_steps": args.long_steps, "long_max_side": args.long_max_side, "threads": args.threads,
                     "seed": 3407, "size_policy": "pad"},
        "models": {m: {**_model_info(name, n), "steps": st}
                   for (m, (n, st)), name in zip(nets.items(), [args.model, args.reference])},
        "paper": {k: dict(zip(PAPER_KEYS, v)) for k, v in PAPER.items()},
        "sets": {},
    }
    montage_rows = []
    for name, rel, a_dir, b_dir, paper_row in SETS:
        if name not in wanted:
            continue
        folder = DATA / rel
        names = sorted(p.name for p in (folder / a_dir).iterdir())[: args.pairs]
        res = {"paper_row": paper_row, "pairs": names, **{m: {"rows": []} for m in methods}}
        for n in names:
            a, b = load_pair(folder, a_dir, b_dir, n, args.max_side)
            fused = {"em_only": _fuse_em(a, b, steps)}
            fused.update({m: _fuse_prior(model, a, b, st) for m, (model, st) in nets.items()})
            for m, (f, t) in fused.items():
                res[m]["rows"].append({"pair": n, "size": list(a.shape), "seconds": t, **_score(f, a, b)})
            print(f"{name} {n} {a.shape[1]}x{a.shape[0]}: " + " | ".join(
                f"{m} {res[m]['rows'][-1]['seconds']:.1f}s Qabf {res[m]['rows'][-1]['Qabf']:.3f}" for m in methods),
                flush=True)
            if name in args.montage_pairs.split(",") and n == names[0]:
                montage_rows.append([a, b, *(fused[m][0] for m in ["em_only", *reversed(nets)])])
        for method in methods:
            rows = res[method]["rows"]
            res[method]["mean"] = _mean([{k: r[k] for k in r if k not in ("pair", "size", "seconds")} for r in rows])
            res[method]["seconds_per_pair"] = float(np.mean([r["seconds"] for r in rows]))
        report["sets"][name] = res

    ivf_rows = {m: [r for s in IVF if s in report["sets"] for r in report["sets"][s][m]["rows"]] for m in methods}
    if ivf_rows["prior"]:
        means = {m: _mean([{k: r[k] for k in PAPER_KEYS} for r in rows]) for m, rows in ivf_rows.items()}
        won = {m: [k for k in PAPER_KEYS if means[m][k] > means["em_only"][k]] for m in nets}
        report["ivf_summary"] = {"mean": means, "won": won, "wins": {m: len(w) for m, w in won.items()},
                                 "pairs": len(ivf_rows["prior"])}
    mif = {s: report["sets"][s] for s in MIF if s in report["sets"]}
    if mif:
        report["mif_summary"] = {s: {m: [k for k in PAPER_KEYS if res[m]["mean"][k] < res["em_only"]["mean"][k]]
                                     for m in nets} for s, res in mif.items()}

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
        labels = {"default": f"{args.model}, {steps} steps", "long": f"{args.model}, {args.long_steps} steps",
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
