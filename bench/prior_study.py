"""What limits the small prior: its x0 denoising against simple baselines, and fused metrics against steps.

    OMP_NUM_THREADS=1 python bench/prior_study.py --out bench/results/prior_study.json [--models ddfm-small,FILE]

Two measurements, both written to the JSON and to a markdown table beside it (``prior_study.md``):

1. ``denoise``: on held-out training-pool images (``--holdout-every``: every k-th pair of
   ``shared/data/train``, sorted by stem; the priors trained with ``train-prior --holdout-every k`` never saw
   them), at every timestep the sampler visits with ``--denoise-steps`` (the union of the 5/10/20/50-step
   schedules by default), the PSNR of the luminance of x0 = clamp(c1 x_t - c2 eps, -1, 1) against the clean image,
   with x_t made exactly as in training (a gray crop replicated to 3 channels, independent noise per channel).
   Baselines on the same x_t: the noisy input itself (x_t / sqrt(alpha_bar), i.e. eps = 0), and a Gaussian blur of
   it whose width is the best of a grid for that noise level (fitted on these very images, so it is an upper
   bound for a blur).
2. ``fusion``: the fused metrics of the IVF and MIF dev pairs (``bench/quality_report.py``'s loading, fusing and
   scoring) for EM only and each prior at ``--steps`` (5, 10, 20, 50), plus the blur "prior" (the fitted blur as
   x0 predictor) as a model-free reference.

Everything runs on the CPU; sizes are kept small (``--crop``, ``--max-side``) so that a run fits the 2-core
development machine.
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
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import ddfm_fast  # noqa: E402
import quality_report as qr  # noqa: E402
from ddfm_fast.schedule import NUM_TRAIN_TIMESTEPS, base_alphas_cumprod, space_timesteps  # noqa: E402
from ddfm_fast.train import holdout_pairs, read_training_image  # noqa: E402

TRAIN = qr.DATA / "train"
# Blur widths in pixels; inf is the image's own mean (the limit of an ever wider blur).
BLUR_SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, float("inf"))
FUSION_KEYS = qr.PAPER_KEYS
LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # BT.601 weights (the sampler's Y, without offset)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 sigma, replicate padding); sigma 0 is the identity, inf the mean."""
    if sigma <= 0:
        return x
    if sigma == float("inf"):
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    r = max(1, int(np.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class BlurPrior(nn.Module):
    """A model-free "prior": x0 = blur_sigma(t)(x_t / sqrt(alpha_bar_t)), returned as the epsilon it implies.

    ``sigmas`` maps timesteps to blur widths (the best per noise level from the denoise study); a timestep not in
    the table takes the nearest one.
    """

    def __init__(self, sigmas: dict[int, float], default_steps: int) -> None:
        super().__init__()
        self.table_t = np.array(sorted(sigmas))
        self.table_s = np.array([sigmas[t] for t in self.table_t])
        self.ac = base_alphas_cumprod()
        self.default_steps = default_steps

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t = int(timesteps.reshape(-1)[0])
        s = float(self.table_s[np.abs(self.table_t - t).argmin()])
        a = float(np.sqrt(self.ac[t]))
        x0 = gaussian_blur(x / a, s).clamp(-1, 1)
        return (x - a * x0) / float(np.sqrt(1 - self.ac[t]))


def _psnr(pred: torch.Tensor, clean: torch.Tensor) -> float:
    """PSNR in dB of luminances in [-1, 1] (peak-to-peak 2), averaged over images."""
    mse = (pred - clean).square().mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (x * LUMA).sum(1, keepdim=True)


def heldout_crops(every: int, crop: int, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Centre crops (gray, replicated to 3 channels, [-1, 1]) of the held-out training-pool images."""
    files = holdout_pairs(sorted(p for p in TRAIN.rglob("*") if p.is_file()), every)[1][:limit]
    crops, names = [], []
    for p in files:
        im = read_training_image(p, gray=True).float() / 127.5 - 1
        _, h, w = im.shape
        c = min(crop, h, w) // 32 * 32
        y, x = (h - c) // 2, (w - c) // 2
        if c == crop:
            crops.append(im[:, y:y + c, x:x + c])
            names.append(str(p.relative_to(TRAIN)))
    return torch.stack(crops), names


@torch.no_grad()
def denoise_study(models: dict[str, nn.Module], timesteps: list[int], x0: torch.Tensor, seed: int) -> dict:
    ac = base_alphas_cumprod()
    clean = _luma(x0)
    rows = []
    for t in timesteps:
        gen = torch.Generator().manual_seed(seed + t)
        noise = torch.randn(x0.shape, generator=gen)
        a, s = float(np.sqrt(ac[t])), float(np.sqrt(1 - ac[t]))
        xt = a * x0 + s * noise
        row = {"t": t, "noise_sigma_x0": s / a}
        raw = xt / a
        row["noisy_input"] = _psnr(_luma(raw).clamp(-1, 1), clean)
        blur = {sg: _psnr(_luma(gaussian_blur(raw, sg)).clamp(-1, 1), clean) for sg in BLUR_SIGMAS}
        best = max(blur, key=blur.get)
        # JSON has no infinity: the infinitely wide blur (the image mean) is written as "mean".
        row["blur_best_sigma"], row["blur"] = ("mean" if best == float("inf") else best), blur[best]
        for name, net in models.items():
            tt = torch.full((x0.shape[0],), t, dtype=torch.long)
            pred = (xt / a - s / a * net(xt, tt)[:, :3]).clamp(-1, 1)
            row[name] = _psnr(_luma(pred), clean)
        rows.append(row)
        print("denoise", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)
    return {"rows": rows}


def fusion_study(models: dict[str, nn.Module], steps_list: list[int], sets: list[str], pairs: int,
                 max_side: int, reuse: dict | None = None) -> dict:
    """Mean fused metrics per set for EM only and every model at every step count. ``reuse``: an earlier run's
    ``fusion`` dict with the same pairs and size; entries found there are taken over instead of recomputed."""
    out: dict = {}
    reuse = reuse or {}
    for name, rel, a_dir, b_dir, _ in qr.SETS:
        if name not in sets:
            continue
        folder = qr.DATA / rel
        stems = sorted(p.name for p in (folder / a_dir).iterdir())[:pairs]
        loaded = [qr.load_pair(folder, a_dir, b_dir, n, max_side) for n in stems]
        res: dict = {"pairs": stems}
        old = reuse.get(name, {}) if reuse.get(name, {}).get("pairs") == stems else {}
        for steps in steps_list:
            rows = [qr._score(qr._fuse_em(a, b, steps)[0], a, b) for a, b in loaded]
            res[f"em_only@{steps}"] = qr._mean(rows)
            for mname, net in models.items():
                if f"{mname}@{steps}" in old:
                    res[f"{mname}@{steps}"] = {**old[f"{mname}@{steps}"], "reused": True}
                    continue
                t0 = time.perf_counter()
                rows = [qr._score(qr._fuse_prior(net, a, b, steps)[0], a, b) for a, b in loaded]
                res[f"{mname}@{steps}"] = {**qr._mean(rows), "seconds_per_pair": (time.perf_counter() - t0) / len(rows)}
            print(name, steps, json.dumps({k: {m: round(v[m], 3) for m in FUSION_KEYS} for k, v in res.items()
                                           if k.endswith(f"@{steps}")}), flush=True)
        out[name] = res
    return out


def _ivf_means(fusion: dict) -> dict:
    """Means over the IVF sets of every method@steps, with the wins against EM only at the same steps."""
    keys = {k for s in qr.IVF if s in fusion for k in fusion[s] if "@" in k}
    means = {}
    for k in sorted(keys, key=lambda k: (k.split("@")[0] != "em_only", k.split("@")[0], int(k.split("@")[1]))):
        means[k] = {m: float(np.mean([fusion[s][k][m] for s in qr.IVF if s in fusion])) for m in FUSION_KEYS}
    for k, v in means.items():
        em = means.get(f"em_only@{k.split('@')[1]}")
        if em and not k.startswith("em_only"):
            v["wins"] = [m for m in FUSION_KEYS if v[m] > em[m]]
    return means


def _markdown(report: dict) -> str:
    lines = ["# What limits the small prior", "", f"Generated {report['generated']} by `bench/prior_study.py` "
             f"({report['machine']}, CPU, {report['threads']} thread(s), torch {report['torch']}). "
             f"Command: `{report['command']}`.", ""] + ([report["note"], ""] if report.get("note") else [])
    if "denoise" in report:
        d = report["denoise"]
        models = report["models"]
        lines += [f"## x0 denoising, held-out training-pool crops ({d['images']} images, {d['crop']} px, "
                  "PSNR of the luminance in dB)", "",
                  "| t | noise sigma (x0 scale) | noisy input | best blur (sigma px) | " + " | ".join(models) + " |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in models) + " |"]
        for r in d["rows"]:
            lines.append(f"| {r['t']} | {r['noise_sigma_x0']:.3f} | {r['noisy_input']:.2f} | {r['blur']:.2f} "
                         f"({r['blur_best_sigma']}) | " + " | ".join(f"{r[m]:.2f}" for m in models) + " |")
        lines.append("")
    if "fusion" in report:
        f = report["fusion"]
        lines += ["## Fused metrics against steps", "", f"First {report['fusion_settings']['pairs']} pairs per set, "
                  f"longer side <= {report['fusion_settings']['max_side']} px."
                  + (f" Rows of models already measured by `{report['fusion_reused_from']['command']}` "
                     f"({report['fusion_reused_from']['generated']}) are taken from that run."
                     if "fusion_reused_from" in report else ""), ""]
        lines += ["### IVF sets together", "", "| method@steps | " + " | ".join(FUSION_KEYS) + " | wins vs EM only |",
                  "| --- | " + " | ".join("---" for _ in FUSION_KEYS) + " | --- |"]
        for k, v in report["ivf_means"].items():
            lines.append(f"| {k} | " + " | ".join(qr._fmt(v[m]) for m in FUSION_KEYS) + " | "
                         + (f"{len(v['wins'])} ({', '.join(v['wins'])})" if "wins" in v else "") + " |")
        for s, res in f.items():
            lines += ["", f"### {s}", "", "| method@steps | " + " | ".join(FUSION_KEYS) + " |",
                      "| --- | " + " | ".join("---" for _ in FUSION_KEYS) + " |"]
            for k, v in sorted(res.items(), key=lambda kv: (kv[0].split("@")[0] != "em_only", kv[0].split("@")[0],
                                                             int(kv[0].split("@")[1]) if "@" in kv[0] else 0)):
                if "@" in k:
                    lines.append(f"| {k} | " + " | ".join(qr._fmt(v[m]) for m in FUSION_KEYS) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "results" / "prior_study.json"))
    p.add_argument("--models", default="ddfm-small",
                   help="comma list of preset names or weights files, each optionally NAME=FILE")
    p.add_argument("--what", default="denoise,fusion")
    p.add_argument("--holdout-every", type=int, default=10)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--denoise-steps", default="5,10,20,50", help="timesteps visited by these step counts")
    p.add_argument("--steps", default="5,10,20,50")
    p.add_argument("--sets", default="RoadScene,TNO,MSRS,MRI_CT,MRI_PET,MRI_SPECT")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--blur-prior", action="store_true", help="also fuse with the fitted blur as the prior")
    p.add_argument("--blur-from", default=None, help="take the blur widths from an earlier run's JSON")
    p.add_argument("--blur-floors", default="", help="also fuse with the blur kept at least this wide (px list)")
    p.add_argument("--reuse", default=None, help="an earlier run's JSON: take over its fusion rows (same pairs)")
    p.add_argument("--note", default="", help="a line of context for the markdown report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models = {}
    for spec in filter(None, args.models.split(",")):
        name, _, src = spec.rpartition("=")
        models[name or (Path(src).stem if Path(src).suffix else src)] = ddfm_fast.load_model(src)
    report: dict = {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                    "torch": torch.__version__, "threads": args.threads,
                    "command": " ".join(["python", "bench/prior_study.py", *(argv if argv is not None else sys.argv[1:])]),
                    "models": list(models), "note": args.note}
    what = args.what.split(",")
    sigmas: dict[int, float] = {}
    if args.blur_from:
        prev_denoise = json.loads(Path(args.blur_from).read_text())["denoise"]
        rows = prev_denoise["rows"]
        if "denoise" not in what:  # keep the measurement the widths come from in this report
            report["denoise"] = {**prev_denoise, "from": args.blur_from}
        sigmas = {r["t"]: float("inf") if r["blur_best_sigma"] == "mean" else r["blur_best_sigma"] for r in rows}
        report["blur_from"] = args.blur_from
    if "denoise" in what or ((args.blur_prior or args.blur_floors) and not sigmas):
        ts = sorted({t for n in args.denoise_steps.split(",") for t in space_timesteps(NUM_TRAIN_TIMESTEPS, int(n))})
        x0, files = heldout_crops(args.holdout_every, args.crop, args.images)
        d = denoise_study(models if "denoise" in what else {}, ts, x0, args.seed)
        report["denoise"] = {**d, "images": len(files), "crop": args.crop, "files": files,
                             "holdout_every": args.holdout_every}
        sigmas = {r["t"]: float("inf") if r["blur_best_sigma"] == "mean" else r["blur_best_sigma"] for r in d["rows"]}
    if "fusion" in what:
        fmodels = dict(models)
        if args.blur_prior:
            fmodels["blur"] = BlurPrior(sigmas, default_steps=20)
        for floor in filter(None, args.blur_floors.split(",")):
            # The same blur, never narrower than `floor` px: an x0 that stays smooth down to t = 0.
            fmodels[f"blur-min{floor}px"] = BlurPrior({t: max(sg, float(floor)) for t, sg in sigmas.items()}, 20)
        report["fusion_settings"] = {"pairs": args.pairs, "max_side": args.max_side, "steps": args.steps}
        reuse = None
        if args.reuse:
            prev = json.loads(Path(args.reuse).read_text())
            if prev.get("fusion_settings", {}).get("max_side") == args.max_side:
                reuse = prev.get("fusion")
                report["fusion_reused_from"] = {"file": args.reuse, "command": prev.get("command"),
                                                "generated": prev.get("generated")}
        report["fusion"] = fusion_study(fmodels, [int(s) for s in args.steps.split(",")], args.sets.split(","),
                                        args.pairs, args.max_side, reuse)
        report["ivf_means"] = _ivf_means(report["fusion"])
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(_markdown(report))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
