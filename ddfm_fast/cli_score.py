"""``ddfm-fast score``: fuse a dataset folder and score it next to the paper's reported numbers.

A thin click command over :func:`ddfm_fast.scoring.score_dataset`: the flags map onto the ``fuse`` command's
:class:`~ddfm_fast.batch.RunSettings` and model loading (:mod:`ddfm_fast.cli_fuse`), the table and the result
files onto ``eval``'s (:mod:`ddfm_fast.cli_eval`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from ddfm_fast import batch
from ddfm_fast.cli_eval import _report_skipped, _table
from ddfm_fast.cli_fuse import (
    EXIT_PAIRS_FAILED,
    PAPER_LAMB,
    PAPER_RHO,
    PAPER_SEED,
    _device,
    _explicit,
    _backend_and_model,
    _parse_steps,
    _tqdm_factory,
)
from ddfm_fast.metrics import METRIC_NAMES
from ddfm_fast.scoring import (
    FUSED_DIR,
    PAPER_LABELS,
    PAPER_METRICS,
    PAPER_NUMBERS,
    DatasetError,
    DatasetNameError,
    ScoreResult,
    dataset_layout,
    limit_pairing,
    score_dataset,
    write_scores,
)

_SCORE_HELP = """Fuse a dataset folder and score it next to the paper's numbers.

\b
  ddfm-fast score shared/data/ivf/MSRS -o runs/msrs --paper
  ddfm-fast score shared/data/mif/MRI_PET -o runs/pet --checkpoint ddfm-small

\b
DATASET_DIR holds ir/ + vi/ (infrared-visible fusion) or MRI/ + one of
CT/, PET/, SPECT/ (medical fusion, the Harvard set), paired by file stem.
The dataset is named after the folder (ivf/MSRS -> MSRS; any mif folder ->
Harvard) or by --dataset (MSRS, M3FD, RoadScene, TNO, Harvard,
RoadScene-EM-only); it picks the paper's row (METRICS.md).

\b
The pairs are fused into OUTDIR/fused/ as `ddfm-fast fuse` does (resumable:
existing outputs are kept unless --overwrite; OUTDIR/fused/ddfm_summary.json),
then every fused image is scored as `ddfm-fast eval` does (the CDDFuse
evaluator; with --size-policy crop the sources are cropped to the fused size).
Prints the mean of EN, SD, MI, VIF, Qabf, SSIM (per image with -v), the
paper's row and the difference, and writes OUTDIR/scores.csv and
OUTDIR/scores.json (all twelve metrics, atomically).

\b
--paper is the official protocol: top-left crop to /32, seed 3407, lamb 0.5,
rho 0.001, and the paper's prior (preset adm256-uncond, 100 steps) unless
--checkpoint / --steps say otherwise.

\b
Exit codes: 0 success, 1 error or nothing scored, 2 usage error, 3 scored,
but some pairs failed (listed on stderr and in scores.json).
"""


def format_scores(result: ScoreResult, verbose: bool = False) -> str:
    """The text table: per image (``verbose``), the mean, the paper's row and the delta, over the six metrics."""
    rows: list[tuple[str, dict[str, float]]] = list(result.rows.items()) if verbose else []
    rows.append((f"mean ({result.count})", result.mean))
    if result.paper is not None and result.delta is not None:
        rows.append((f"paper {result.layout.paper_key}", result.paper))
        rows.append(("delta", result.delta))
    lines = [_table(rows, PAPER_METRICS)]
    others = [k for k in METRIC_NAMES if k not in PAPER_METRICS]
    lines.append("mean of the metrics the paper does not report: "
                 + ", ".join(f"{k} {result.mean[k]:.4f}" for k in others))
    return "\n".join(lines)


@click.command("score", help=_SCORE_HELP, context_settings={"max_content_width": 100})
@click.argument("dataset_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output folder: fused/ (the fused images), scores.csv, scores.json.")
@click.option("--checkpoint", metavar="PATH|PRESET",
              help="UNet weights (.pt/.pth/.safetensors) or a preset name (see `ddfm-fast info`).")
@click.option("--model-config", type=click.Path(path_type=Path),
              help="JSON/YAML create_model arguments, when the checkpoint does not carry them.")
@click.option("--steps", metavar="N", help="DDIM steps (respacing); default: the model's own (100 for the paper's).")
@click.option("--size-policy", type=click.Choice(["pad", "crop"]), default="pad", show_default=True,
              help="pad: reflect-pad to /32 and crop back; crop: official top-left crop to /32.")
@click.option("--paper", is_flag=True, help="The official protocol (see above).")
@click.option("--dataset", "dataset", metavar="NAME",
              help="Which paper row to compare with: " + ", ".join(PAPER_NUMBERS) + " (default: from the folder).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Fuse and score only the first N pairs.")
@click.option("--device", help="torch device, e.g. cuda, cuda:1, cpu; default CUDA when available.")
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True,
              help="Step-tail backend (DDFM_FAST_BACKEND overrides).")
@click.option("--prior", type=click.Choice(["diffusion", "none"]), default="diffusion", show_default=True,
              help="'none': EM only (the paper's ablation I); compare with --dataset RoadScene-EM-only.")
@click.option("--overwrite", is_flag=True, help="Re-fuse pairs whose output exists (default: keep them, resume).")
@click.option("-v", "--verbose", is_flag=True, help="Print every image's scores, not only the mean.")
@click.option("--progress-bar/--no-progress-bar", "progress_bar", default=None,
              help="Show progress bars on stderr (default: only on a terminal).")
@click.pass_context
def score_command(ctx: click.Context, dataset_dir: Path, out: Path, checkpoint: Optional[str],
                  model_config: Optional[Path], steps: Optional[str], size_policy: str, paper: bool,
                  dataset: Optional[str], limit: Optional[int], device: Optional[str], backend: str,
                  prior: str, overwrite: bool, verbose: bool, progress_bar: Optional[bool]) -> None:
    try:
        layout = dataset_layout(dataset_dir, dataset)
    except DatasetError as exc:
        hint = "--dataset" if isinstance(exc, DatasetNameError) else "DATASET_DIR"
        raise click.BadParameter(str(exc), param_hint=hint) from exc
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} is a file; give an output folder", param_hint="-o/--output")
    for src in (layout.a_dir, layout.b_dir):
        try:
            if (out / FUSED_DIR).resolve() == src.resolve():
                raise click.BadParameter(f"{out / FUSED_DIR} is a source folder; outputs would replace inputs",
                                         param_hint="-o/--output")
        except OSError:
            pass
    if paper:
        if size_policy != "crop" and _explicit(ctx, "size_policy"):
            raise click.UsageError("--paper sets the official protocol and cannot be combined with: "
                                   f"--size-policy {size_policy} (the paper crops to multiples of 32)")
        from ddfm_fast.checkpoint import DEFAULT_PRESET

        size_policy = "crop"
        checkpoint = checkpoint or DEFAULT_PRESET
    settings = batch.RunSettings(mode=layout.mode, steps=_parse_steps(steps), seed=PAPER_SEED,
                                 size_policy=size_policy, lamb=PAPER_LAMB, rho=PAPER_RHO, backend=backend,
                                 output="gray", prior=prior)
    if prior == "none" and checkpoint is not None:
        raise click.UsageError("--prior none uses no model; drop --checkpoint" + (" (and --paper)" if paper else ""))
    # Check the sources before loading a model (the ADM prior is 2.2 GB).
    try:
        pairing = limit_pairing(batch.pair_folders(layout.a_dir, layout.b_dir, layout.mode), limit)
    except batch.InputError as exc:
        raise click.ClickException(str(exc)) from exc
    if not pairing.pairs and not pairing.ambiguous:
        raise click.ClickException(
            f"no pairs: no file stem appears in both {layout.a_dir} and {layout.b_dir} "
            f"({len(pairing.unpaired)} unpaired images); files are paired by their name without extension"
        )

    dev = _device(device)
    backend_choice, model = _backend_and_model(settings, checkpoint, model_config, dev)
    summary_settings: dict[str, Any] = {
        **settings.to_dict(),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "model_config": str(model_config) if model_config is not None else None,
        "num_steps": settings.num_steps(model),
        "device": str(dev),
        "backend_used": backend_choice.describe(),
        "paper": bool(paper),
        "overwrite": bool(overwrite),
    }
    bar = _tqdm_factory(progress_bar)
    click.echo(f"dataset {layout.name} ({layout.mode}{', ' + layout.subset if layout.subset else ''}): "
               f"{len(pairing.pairs)} pair(s) from {layout.root}", err=True)
    try:
        result = score_dataset(dataset_dir, out, model=model, settings=settings, device=dev, overwrite=overwrite,
                               summary_settings=summary_settings, bar=bar, step_bar=bar, layout=layout,
                               pairing=pairing)
    except (batch.InputError, DatasetError) as exc:
        raise click.ClickException(str(exc)) from exc

    s = result.summary
    rate = s.images_per_s
    click.echo(f"{len(s.done)} fused, {len(s.skipped)} kept (output exists), {len(s.failed)} failed"
               + (f"; {rate:.3g} images/s" if rate else "") + f"; fused images in {result.fused_dir}", err=True)
    if result.rows:
        click.echo(format_scores(result, verbose))
    if result.paper is None:
        click.echo(f"the paper reports no numbers for {layout.name}; --dataset NAME compares with one of: "
                   + ", ".join(PAPER_NUMBERS), err=True)
    else:
        click.echo(f"paper row: {PAPER_LABELS[layout.paper_key]} (DDFM, ICCV 2023, as METRICS.md lists it)", err=True)
    _report_skipped(result.skipped)
    csv_path, json_path = write_scores(result, out)
    click.echo(f"scored {result.count} image(s), skipped {len(result.skipped)}; wrote {csv_path} and {json_path}",
               err=True)
    if not result.rows:
        ctx.exit(1)
    if s.failed:
        ctx.exit(EXIT_PAIRS_FAILED)
