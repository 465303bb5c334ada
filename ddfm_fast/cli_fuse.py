"""``ddfm-fast fuse`` and ``ddfm-fast info``: thin click commands over ``ddfm_fast.batch`` and ``ddfm_fast.api``.

The commands only map flags onto :class:`~ddfm_fast.batch.RunSettings`, check that the flags agree, load the
model once, and hand the work to :func:`~ddfm_fast.batch.run_single` / :func:`~ddfm_fast.batch.run_folder`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import click
from click.core import ParameterSource

from ddfm_fast import batch

# Exit codes of `fuse`: 0 all pairs fused (or skipped), 1 an error stopped the run (click's default),
# 2 a usage error (click's default), 3 the run finished but some pairs failed (see the summary).
EXIT_PAIRS_FAILED = 3

PAPER_SEED = 3407
PAPER_LAMB = 0.5
PAPER_RHO = 0.001

_FUSE_HELP = """Fuse image pairs with DDFM.

\b
One pair:   ddfm-fast fuse IR VIS -o OUT.png
Folders:    ddfm-fast fuse --ir-dir A --vis-dir B -o OUTDIR
Medical:    ddfm-fast fuse --mode mif --func-dir CT --mri-dir MRI -o OUTDIR
            ddfm-fast fuse --mode mif FUNC MRI -o OUT.png

\b
Modes and roles (--mode, default ivf; --mri-dir/--func-dir imply mif):
  ivf  infrared + visible. The visible image anchors the fusion (the official
       driver's I), the infrared image is its partner (V).
  mif  MRI + functional (CT, PET or SPECT). MRI plays the visible image, the
       functional image the infrared one (the CDDFuse/DDFM medical protocol).
       For a single pair give the functional image first, then the MRI.

\b
Folders are paired by file stem (a.png pairs with a.jpg); one output
OUTDIR/<stem>.png per pair, plus OUTDIR/ddfm_summary.json (pairs done, skipped,
failed with reasons, unpaired files, images/s, settings, versions). Runs resume:
existing outputs are skipped unless --overwrite. A bad pair is reported and the
run goes on. A single pair always replaces OUT.

\b
Inputs: PNG, JPEG, BMP, TIFF; 8- or 16-bit; gray, RGB, RGBA or palette; EXIF
orientation applied; colour is reduced to the official gray (OpenCV BGR2GRAY);
16-bit data is scaled by 1/65535 at full precision. Sizes need not be multiples
of 32 (--size-policy). The two images of a pair must have the same size unless
--resize-to-ir or --resize-to-vis resizes the other one (Pillow LANCZOS).

\b
Outputs (all written atomically: temporary file + rename):
  default  the official 8-bit gray PNG (luminance min-max stretched to 0..255).
  --color  the fused luminance with the chroma of the visible image (ivf) or of
           the functional image (mif): full-range BT.601 YCbCr as OpenCV and
           Pillow use it, Y replaced, back to RGB, 8-bit RGB PNG. CT and MRI are
           gray, so for MRI-CT (and gray visible images) it is gray (R=G=B).
  --raw    the unstretched luminance: 16-bit PNG, v = round(clip((Y+1)/2,0,1)*65535)
           (Y in the model's [-1,1]; v/65535 is the sources' 0..1 gray scale), or
           with --raw-format npy a float32 .npy of (Y+1)/2, not clipped.

\b
--save-progress writes the official per-step images x_<idx>.png (the x0
luminance, min-max, truncated) and diffusion.gif into OUT-stem_progress/
beside OUT, or into --progress-dir. Folder runs allow it only when the folders
hold exactly one pair (default folder: OUTDIR_progress/ beside OUTDIR).

\b
--paper sets the official protocol: top-left crop to /32, seed 3407 per image,
lamb 0.5, rho 0.001, the official gray output, batch size 1, and the paper's
prior (preset adm256-uncond) with its 100 steps unless --checkpoint / --steps
say otherwise. Flags that contradict it are rejected.

\b
Many GPUs / nodes (folder runs): torchrun --nproc-per-node N -m ddfm_fast fuse
--ir-dir A --vis-dir B -o OUT. Each rank fuses a share of the pending pairs
(balanced by image size) on its own GPU (LOCAL_RANK; CPU when there is none),
rank 0 writes the one summary (with per-rank counts and images/s). Outputs are
identical to a single-process run at --batch-size 1 (the default) and the same
thread count; resume works with any number of ranks.

\b
Exit codes: 0 success, 1 error, 2 usage error, 3 some pairs failed (under
torchrun every rank exits 3 when a pair failed on any rank, and torchrun
itself exits 1).
"""


def _tqdm_factory(enabled: Optional[bool]) -> Any:
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal.
    return functools.partial(tqdm, file=sys.stderr, dynamic_ncols=True,
                             disable=None if enabled is None else not enabled)


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)


def _parse_steps(text: Optional[str]) -> Any:
    """``--steps``: an int, or any respacing string the schedule accepts (``ddim100``, ``10,10,5``)."""
    if text is None:
        return None
    from ddfm_fast.schedule import NUM_TRAIN_TIMESTEPS, space_timesteps

    value: Any = int(text) if re.fullmatch(r"\s*\d+\s*", text) else text.strip()
    try:
        space_timesteps(NUM_TRAIN_TIMESTEPS, value)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--steps") from exc
    return value


def _resolve_mode(mode: Optional[str], dirs: dict[str, Optional[Path]]) -> str:
    ivf_dirs = [f"--{k.replace('_', '-')}" for k in ("ir_dir", "vis_dir") if dirs[k] is not None]
    mif_dirs = [f"--{k.replace('_', '-')}" for k in ("func_dir", "mri_dir") if dirs[k] is not None]
    if ivf_dirs and mif_dirs:
        raise click.UsageError(f"{', '.join(ivf_dirs)} (ivf) and {', '.join(mif_dirs)} (mif) cannot be combined")
    if mode is None:
        return "mif" if mif_dirs else "ivf"
    if mode == "ivf" and mif_dirs:
        raise click.UsageError(f"{', '.join(mif_dirs)} belong to --mode mif; in ivf mode use --ir-dir and --vis-dir")
    if mode == "mif" and ivf_dirs:
        raise click.UsageError(f"{', '.join(ivf_dirs)} belong to --mode ivf; in mif mode use --func-dir and --mri-dir")
    return mode


def _paper_conflicts(ctx: click.Context, p: dict[str, Any]) -> list[str]:
    """Flags that contradict --paper (explicit values equal to the protocol's are fine)."""
    conflicts = []
    if p["size_policy"] != "crop" and _explicit(ctx, "size_policy"):
        conflicts.append(f"--size-policy {p['size_policy']} (the paper crops to multiples of 32)")
    if p["seed"] != PAPER_SEED:
        conflicts.append(f"--seed {p['seed']} (the paper uses {PAPER_SEED})")
    if p["lamb"] != PAPER_LAMB:
        conflicts.append(f"--lamb {p['lamb']} (the paper uses {PAPER_LAMB})")
    if p["rho"] != PAPER_RHO:
        conflicts.append(f"--rho {p['rho']} (the paper uses {PAPER_RHO})")
    if p["color"]:
        conflicts.append("--color (the paper writes the gray output)")
    if p["raw"] or _explicit(ctx, "raw_format"):
        conflicts.append("--raw (the paper writes the min-max stretched 8-bit output)")
    if p["resize_to_ir"] or p["resize_to_vis"]:
        conflicts.append("--resize-to-* (the paper fuses registered pairs of equal size)")
    if p["batch_size"] != 1:
        conflicts.append(f"--batch-size {p['batch_size']} (the official driver fuses one image at a time)")
    if p["prior"] != "diffusion":
        conflicts.append("--prior none (the paper's protocol samples the diffusion prior)")
    if p["tv_prox"] != "shrink":
        conflicts.append("--tv-prox soft (the official code shrinks linearly)")
    return conflicts


def _device(text: Optional[str]) -> Any:
    import torch

    from ddfm_fast.api import default_device

    if text is None:
        return default_device()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(f"{text!r} is not a torch device ({exc})", param_hint="--device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(
            f"{text!r}: CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda})",
            param_hint="--device",
        )
    return dev


def _check_output_suffix(out: Path, output: str) -> None:
    want = ".npy" if output == "npy" else ".png"
    if out.suffix.lower() != want:
        what = "raw npy output" if output == "npy" else "PNG output"
        raise click.BadParameter(f"{out}: the {what} file must end with {want}", param_hint="-o/--output")


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _load_model(checkpoint: Optional[str], model_config: Optional[Path], device: Any) -> Any:
    from ddfm_fast.api import DefaultPriorNotice, NoDefaultModelError, resolve_model
    from ddfm_fast.checkpoint import CheckpointError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DefaultPriorNotice)
            model = resolve_model(checkpoint, model_config=model_config, device=device)
    except (NoDefaultModelError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from exc
    for w in caught:  # the one-line notice about the shipped prior, without the warnings module's decoration
        if issubclass(w.category, DefaultPriorNotice):
            click.echo(str(w.message), err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def _backend_and_model(settings: batch.RunSettings, checkpoint: Optional[str], model_config: Optional[Path],
                       device: Any) -> tuple[Any, Any]:
    """The step backend that will run (an impossible explicit one is an error) and the model (None for EM only)."""
    from ddfm_fast.plan import BackendError, plan

    try:
        choice = plan(device, settings.fast_options())
    except BackendError as exc:
        raise click.ClickException(str(exc)) from exc
    model = None if settings.prior == "none" else _load_model(checkpoint, model_config, device)
    return choice, model


def _die_on_input_error(func: Any) -> Any:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except batch.InputError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.command("fuse", help=_FUSE_HELP, context_settings={"max_content_width": 100})
@click.argument("ir", required=False, metavar="[IR|FUNC]", type=click.Path(path_type=Path))
@click.argument("vis", required=False, metavar="[VIS|MRI]", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output file (one pair) or folder (folder runs).")
@click.option("--mode", type=click.Choice(["ivf", "mif"]), default=None,
              help="ivf: infrared + visible (default); mif: functional (CT/PET/SPECT) + MRI.")
@click.option("--ir-dir", type=click.Path(path_type=Path), help="Folder of infrared images (ivf).")
@click.option("--vis-dir", type=click.Path(path_type=Path), help="Folder of visible images (ivf).")
@click.option("--func-dir", type=click.Path(path_type=Path), help="Folder of CT, PET or SPECT images (mif).")
@click.option("--mri-dir", type=click.Path(path_type=Path), help="Folder of MRI images (mif).")
@click.option("--checkpoint", metavar="PATH|PRESET",
              help="UNet weights (.pt/.pth/.safetensors) or a preset name (see `ddfm-fast info`).")
@click.option("--model-config", type=click.Path(path_type=Path),
              help="JSON/YAML create_model arguments, when the checkpoint does not carry them.")
@click.option("--steps", metavar="N", help="DDIM steps (respacing); default: the model's own (100 for the paper's).")
@click.option("--seed", type=int, default=PAPER_SEED, show_default=True, help="Seed of each image's initial noise.")
@click.option("--size-policy", type=click.Choice(["pad", "crop"]), default="pad", show_default=True,
              help="pad: reflect-pad to /32 and crop back (no pixel lost); crop: official top-left crop to /32.")
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True,
              help="Step-tail backend (DDFM_FAST_BACKEND overrides).")
@click.option("--device", help="torch device, e.g. cuda, cuda:1, cpu; default CUDA when available.")
@click.option("--lamb", type=float, default=PAPER_LAMB, show_default=True, help="EM step TV weight lambda.")
@click.option("--rho", type=float, default=PAPER_RHO, show_default=True, help="EM step ADMM penalty rho.")
@click.option("--paper", is_flag=True, help="The official protocol (see above); rejects contradicting flags.")
@click.option("--resize-to-ir", "--resize-to-func", "resize_to_ir", is_flag=True,
              help="Resize the vis/MRI image to the ir/functional image's size when they differ (LANCZOS).")
@click.option("--resize-to-vis", "--resize-to-mri", "resize_to_vis", is_flag=True,
              help="Resize the ir/functional image to the vis/MRI image's size when they differ (LANCZOS).")
@click.option("--color", "--colour", "color", is_flag=True,
              help="RGB output: fused luminance + chroma of the visible (ivf) or functional (mif) image.")
@click.option("--raw", is_flag=True, help="Unstretched luminance: 16-bit PNG or .npy (see above).")
@click.option("--raw-format", type=click.Choice(["png16", "npy"]), default="png16", show_default=True,
              help="Format of --raw output (implies --raw).")
@click.option("--save-progress", is_flag=True, help="Per-step images and an animated GIF (one pair only).")
@click.option("--progress-dir", type=click.Path(path_type=Path), help="Folder for --save-progress images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fuse up to N same-size pairs at once (one EM tau per image; equal to single runs "
                   "up to float tolerance).")
@click.option("--overwrite", is_flag=True, help="Redo pairs whose output exists (default: skip them, resume).")
@click.option("--prior", type=click.Choice(["diffusion", "none"]), default="diffusion", show_default=True,
              help="'none': the paper's ablation I, EM iterations only from (I+V)/2 (--steps iterations, "
                   "default 100); no model, so no --checkpoint.")
@click.option("--tv-prox", type=click.Choice(["shrink", "soft"]), default="shrink", show_default=True,
              help="EM step's F update: 'shrink' (the official code) or 'soft' (the paper's Eqs. 26-27 soft "
                   "threshold; needs --tv-threshold, since the paper's lamb/rho = 500 zeroes every gradient).")
@click.option("--tv-threshold", type=click.FloatRange(min=0), default=None,
              help="Soft threshold kappa for --tv-prox soft (e.g. 0.01).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="UNet body precision (GroupNorm and softmax stay fp32, the EM step is always fp32).")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="torch.compile the whole step (fullgraph).")
@click.option("--compile-mode", type=click.Choice(["default", "max-autotune", "max-autotune-no-cudagraphs"]),
              default="default", show_default=True, help="torch.compile mode.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=False, show_default=True,
              help="Capture one step as a CUDA graph and replay it for every step (CUDA only).")
@click.option("--channels-last/--no-channels-last", default=False, show_default=True,
              help="NHWC memory format for the UNet's convolutions.")
@click.option("--fast", "fast_preset", is_flag=True,
              help="The GPU fast path: --dtype fp16 --compile --compile-mode max-autotune-no-cudagraphs --cuda-graphs.")
@click.option("--progress-bar/--no-progress-bar", "progress_bar", default=None,
              help="Show progress bars on stderr (default: only on a terminal).")
@click.pass_context
@_die_on_input_error
def fuse_command(ctx: click.Context, **p: Any) -> None:
    dirs = {k: p[k] for k in ("ir_dir", "vis_dir", "func_dir", "mri_dir")}
    mode = _resolve_mode(p["mode"], dirs)
    r = batch.roles(mode)
    folder_ir = dirs["ir_dir"] if mode == "ivf" else dirs["func_dir"]
    folder_vis = dirs["vis_dir"] if mode == "ivf" else dirs["mri_dir"]
    any_dir = folder_ir is not None or folder_vis is not None
    any_file = p["ir"] is not None or p["vis"] is not None
    if any_dir and any_file:
        raise click.UsageError("give either two image files or two folders, not both")
    if not any_dir and not any_file:
        raise click.UsageError(
            f"nothing to fuse: give two images ({r.ir.upper()} {r.vis.upper()}) or the folders "
            f"(--{r.ir}-dir and --{r.vis}-dir)"
        )
    if any_file and (p["ir"] is None or p["vis"] is None):
        raise click.UsageError(f"one pair needs two images: {r.ir.upper()} (the {r.ir_long}) and "
                               f"{r.vis.upper()} (the {r.vis_long})")
    if any_dir and (folder_ir is None or folder_vis is None):
        missing = f"--{r.ir}-dir" if folder_ir is None else f"--{r.vis}-dir"
        raise click.UsageError(f"a folder run needs both --{r.ir}-dir and --{r.vis}-dir; {missing} is missing")

    raw = p["raw"] or _explicit(ctx, "raw_format")
    if p["color"] and raw:
        raise click.UsageError("--color and --raw are different outputs; choose one")
    output = "color" if p["color"] else (p["raw_format"] if raw else "gray")
    if p["resize_to_ir"] and p["resize_to_vis"]:
        raise click.UsageError("--resize-to-ir and --resize-to-vis cannot be combined; choose the size to keep")
    resize = "ir" if p["resize_to_ir"] else ("vis" if p["resize_to_vis"] else None)
    if p["progress_dir"] is not None and not p["save_progress"]:
        raise click.UsageError("--progress-dir needs --save-progress")

    checkpoint = p["checkpoint"]
    size_policy = p["size_policy"]
    if p["paper"]:
        conflicts = _paper_conflicts(ctx, p)
        if conflicts:
            raise click.UsageError("--paper sets the official protocol and cannot be combined with: "
                                   + "; ".join(conflicts))
        from ddfm_fast.checkpoint import DEFAULT_PRESET

        size_policy = "crop"
        checkpoint = checkpoint or DEFAULT_PRESET
    steps = _parse_steps(p["steps"])
    if p["prior"] == "none" and checkpoint is not None:
        raise click.UsageError("--prior none is EM only (the paper's ablation I) and uses no model; "
                               "drop --checkpoint" + (" (or --paper)" if p["paper"] else ""))
    if p["tv_prox"] == "soft" and p["tv_threshold"] is None:
        raise click.UsageError("--tv-prox soft needs --tv-threshold (e.g. 0.01): the paper's lamb/rho = 500 "
                               "would zero every gradient and switch the TV term off")
    if p["tv_threshold"] is not None and p["tv_prox"] != "soft":
        raise click.UsageError("--tv-threshold only applies to --tv-prox soft")
    fast = dict(dtype=p["dtype"], compile=p["compile_"], compile_mode=p["compile_mode"],
                cuda_graphs=p["cuda_graphs"], channels_last=p["channels_last"])
    if p["fast_preset"]:
        fast.update(dtype="fp16", compile=True, compile_mode="default", cuda_graphs=True)
    try:
        settings = batch.RunSettings(mode=mode, steps=steps, seed=p["seed"], size_policy=size_policy,
                                     lamb=p["lamb"], rho=p["rho"], backend=p["backend"], output=output,
                                     resize=resize, batch_size=p["batch_size"], prior=p["prior"],
                                     tv_prox=p["tv_prox"], tv_threshold=p["tv_threshold"], **fast)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    out: Path = p["out"]

    # Check every input before loading a model (the ADM prior is 2.2 GB).
    if any_file:
        for path, role in ((p["ir"], r.ir_long), (p["vis"], r.vis_long)):
            if not path.exists():
                raise click.ClickException(f"{role} {path}: no such file")
            if not path.is_file():
                raise click.ClickException(f"{role} {path}: not a file")
        if out.is_dir():
            raise click.BadParameter(f"{out} is a folder; give the output file for one pair", param_hint="-o/--output")
        _check_output_suffix(out, output)
        if _same_path(out, p["ir"]) or _same_path(out, p["vis"]):
            raise click.BadParameter(f"{out} is one of the inputs; it would be overwritten", param_hint="-o/--output")
        progress_dir = None
        if p["save_progress"]:
            progress_dir = p["progress_dir"] or out.parent / f"{out.stem}_progress"
        pairing = None
    else:
        if out.exists() and not out.is_dir():
            raise click.BadParameter(f"{out} is a file; folder runs need an output folder", param_hint="-o/--output")
        if _same_path(out, folder_ir) or _same_path(out, folder_vis):
            raise click.BadParameter(f"{out} is an input folder; outputs would replace inputs",
                                     param_hint="-o/--output")
        pairing = batch.pair_folders(folder_ir, folder_vis, mode)
        if not pairing.pairs and not pairing.ambiguous:
            raise click.ClickException(
                f"no pairs: no file stem appears in both {folder_ir} and {folder_vis} "
                f"({len(pairing.unpaired)} unpaired images); files are paired by their name without extension"
            )
        progress_dir = None
        if p["save_progress"]:
            if len(pairing.pairs) != 1:
                raise click.UsageError(
                    f"--save-progress writes the images of one pair, but the folders hold {len(pairing.pairs)} "
                    "pairs; run that pair alone (ddfm-fast fuse IR VIS -o OUT --save-progress)"
                )
            progress_dir = p["progress_dir"] or out.parent / f"{out.name}_progress"
            if _same_path(progress_dir, out) or out.resolve() in progress_dir.resolve().parents:
                raise click.BadParameter(f"{progress_dir} is inside the output folder {out}; name another folder",
                                         param_hint="--progress-dir")

    # --- distributed hook (ddfm_fast.distributed): under torchrun (WORLD_SIZE > 1) folder runs are sharded.
    dist_env = _dist_env()
    if dist_env is not None and pairing is None:
        raise click.UsageError("torchrun shards folder runs (--ir-dir/--vis-dir); fuse a single pair without "
                               "torchrun")
    device = _device(p["device"]) if dist_env is None else _dist_device(dist_env, p["device"])
    backend_choice, model = _backend_and_model(settings, checkpoint, p["model_config"], device)
    bar = _tqdm_factory(p["progress_bar"])

    if pairing is None:
        pair = batch.Pair(p["ir"].stem, p["ir"], p["vis"])
        try:
            record = batch.run_single(model, pair, out, settings, device=device, progress_dir=progress_dir,
                                      step_bar=bar)
        except batch.PairError as exc:
            raise click.ClickException(str(exc)) from exc
        w, h = record["size"]
        click.echo(f"wrote {out} ({w}x{h}, {record['seconds']:.2f} s)", err=True)
        if "note" in record:
            click.echo(f"note: {record['note']}", err=True)
        if "progress" in record:
            click.echo(f"progress images: {progress_dir}", err=True)
        return

    summary_settings = {
        **settings.to_dict(),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "model_config": str(p["model_config"]) if p["model_config"] is not None else None,
        "num_steps": settings.num_steps(model),
        "device": str(device),
        "backend_used": backend_choice.describe(),
        "paper": bool(p["paper"]),
        "overwrite": bool(p["overwrite"]),
    }
    inputs = {r.ir: str(folder_ir), r.vis: str(folder_vis)}
    if dist_env is not None:  # distributed hook: shard, fuse, gather to rank 0, exit together
        code = _fuse_distributed(dist_env, model, pairing, out, settings, device=device, overwrite=p["overwrite"],
                                 summary_settings=summary_settings, inputs=inputs, bar=bar,
                                 progress_dir=progress_dir)
        ctx.exit(code)
    summary = batch.run_folder(
        model, pairing, out, settings, device=device, overwrite=p["overwrite"],
        summary_settings=summary_settings, inputs=inputs,
        bar=bar, step_bar=bar, progress_dir=progress_dir,
    )
    click.echo(_totals_line(len(summary.done), len(summary.skipped), len(summary.failed), len(summary.unpaired),
                            summary.images_per_s, out), err=True)
    for item in summary.unpaired:
        click.echo(f"unpaired: {item['file']}: {item['reason']}", err=True)
    if summary.failed:
        for item in summary.failed:
            click.echo(f"failed: {item['stem']}: {item['reason']}", err=True)
        ctx.exit(EXIT_PAIRS_FAILED)


def _totals_line(done: int, skipped: int, failed: int, unpaired: int, rate: Optional[float], out: Path,
                 ranks: Optional[int] = None) -> str:
    """The one line a folder run ends with (single process, or rank 0 of a torchrun run)."""
    return (f"{done} fused, {skipped} skipped (output exists), {failed} failed, {unpaired} unpaired file(s)"
            + (f" on {ranks} ranks" if ranks is not None else "")
            + (f"; {rate:.3g} images/s" if rate else "")
            + f"; summary: {out / batch.SUMMARY_NAME}")


# --------------------------------------------------------------------------------------------------- torchrun


def _dist_env() -> Any:
    from ddfm_fast import distributed

    try:
        return distributed.env_from_environ()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _dist_device(env: Any, text: Optional[str]) -> Any:
    from ddfm_fast import distributed

    try:
        return distributed.choose_device(env, text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc


def _fuse_distributed(env: Any, model: Any, pairing: batch.Pairing, out: Path, settings: batch.RunSettings, *,
                      device: Any, overwrite: bool, summary_settings: dict[str, Any], inputs: dict[str, str],
                      bar: Any, progress_dir: Optional[Path]) -> int:
    """One rank of a torchrun folder run (see ``ddfm_fast.distributed``); returns the exit code all ranks share.

    Rank 0 shows the progress bars and prints the totals; every rank prints its own failures as they happen.
    """
    from ddfm_fast import distributed

    with distributed.session(env, device) as dctx:
        policy = settings.size_policy
        side = "vis" if settings.resize == "vis" else "ir"  # the side whose size the model sees

        def shard(pending: list[batch.Pair]) -> list[batch.Pair]:
            return distributed.plan_shards(dctx, pending, keys=lambda pr: pr.stem,
                                           cost=lambda pr: distributed.image_pixels(getattr(pr, side), policy))

        summary = batch.run_folder(
            model, distributed.replace_pairing_for_rank(pairing, env.rank), out, settings, device=device,
            overwrite=overwrite, summary_settings=summary_settings, inputs=inputs,
            bar=bar if env.is_main else None, step_bar=bar if env.is_main else None, progress_dir=progress_dir,
            shard=shard, write_summary=False,
        )
        code, doc = distributed.finish_fuse(dctx, summary, out, EXIT_PAIRS_FAILED)
    if doc is not None:
        counts = doc["counts"]
        click.echo(_totals_line(counts["done"], counts["skipped"], counts["failed"], counts["unpaired"],
                                doc["timing"]["images_per_s"], out, ranks=env.world_size), err=True)
        for rank in doc["distributed"]["ranks"]:
            r_rate = rank["images_per_s"]
            click.echo(f"rank {rank['rank']} ({rank['host']}, {rank['device']}): {rank['done']} fused, "
                       f"{rank['failed']} failed" + (f", {r_rate:.3g} images/s" if r_rate else ""), err=True)
        for item in doc["unpaired"]:
            click.echo(f"unpaired: {item['file']}: {item['reason']}", err=True)
        for item in doc["failed"]:
            click.echo(f"failed (rank {item['rank']}): {item['stem']}: {item['reason']}", err=True)
    return code


# --------------------------------------------------------------------------------------------------- info


def info_report() -> dict[str, Any]:
    """Versions, devices, the backend ``auto`` picks on each device (and why not a faster one), presets."""
    import torch

    from ddfm_fast.checkpoint import DEFAULT_PRESET, PRESETS, CheckpointError, _preset_search_dirs, resolve_preset
    from ddfm_fast.plan import ENV_BACKEND, BackendError, plan

    devices = [{"device": "cpu", "name": "CPU", "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for k in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(k)
            devices.append({"device": f"cuda:{k}", "name": props.name,
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "capability": f"{props.major}.{props.minor}"})
    for d in devices:
        try:
            d["backend_auto"] = plan(d["device"]).describe()
        except BackendError as exc:
            d["backend_auto"] = f"error: {exc}"
    presets = []
    for name, preset in sorted(PRESETS.items()):
        try:
            found: Optional[str] = str(resolve_preset(name))
        except CheckpointError:  # not downloaded
            found = None
        presets.append({"name": name, "default": name == DEFAULT_PRESET, "description": preset.description,
                        "file": preset.filename, "found": found, "url": preset.url,
                        "default_steps": preset.default_steps})
    return {
        "versions": batch.versions(),
        "devices": devices,
        "cuda_available": torch.cuda.is_available(),
        "presets": presets,
        "preset_search_dirs": [str(d) for d in _preset_search_dirs()],
        "environment": {k: os.environ.get(k) for k in (ENV_BACKEND, "DDFM_FAST_HOME", "TRITON_INTERPRET")},
        "default_checkpoint": "ddfm-small",
    }


def _format_info(rep: dict[str, Any]) -> str:
    v = rep["versions"]
    lines = ["versions:"]
    lines += [f"  {k}: {val if val is not None else ('not installed' if k == 'triton' else 'none')}"
              for k, val in v.items()]
    lines.append("devices (backend that --backend auto picks, and why a faster path is not taken):")
    for d in rep["devices"]:
        extra = f", {d['memory_gib']} GiB, sm {d['capability']}" if "memory_gib" in d else ""
        lines.append(f"  {d['device']}: {d['name']}{extra}")
        lines.append(f"    {d['backend_auto']}")
    if not rep["cuda_available"]:
        lines.append("  (no CUDA device visible to torch)")
    lines.append("presets (--checkpoint NAME), searched in: " + ", ".join(rep["preset_search_dirs"]))
    for pr in rep["presets"]:
        where = f"found at {pr['found']}" if pr["found"] else f"not found; download from {pr['url']}"
        lines.append(f"  {pr['name']}: {pr['description']}")
        lines.append(f"    file {pr['file']} ({pr['default_steps']} steps by default): {where}")
    lines.append("default checkpoint: the shipped prior 'ddfm-small' (--checkpoint adm256-uncond for the paper's; "
                 "--paper uses adm256-uncond)")
    env = ", ".join(f"{k}={val}" for k, val in rep["environment"].items() if val is not None) or "none set"
    lines.append(f"environment: {env}")
    return "\n".join(lines)


@click.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info_command(as_json: bool) -> None:
    """Versions, devices, the backend `auto` chooses on each (and why), and the known presets."""
    rep = info_report()
    click.echo(json.dumps(rep, indent=2) if as_json else _format_info(rep))

