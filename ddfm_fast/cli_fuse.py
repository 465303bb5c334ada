"""``ddfm-fast fuse`` and ``ddfm-fast info``: thin click commands over :mod:`ddfm_fast.runner`.

``fuse`` maps its flags onto a :class:`~ddfm_fast.runner.RunConfig` (:func:`ddfm_fast.cli_options.build_run`,
shared with ``score``), checks the inputs and the output path before a model is loaded, resolves the execution
plan once (printed on stderr, recorded in the summary), and hands the work to
:func:`~ddfm_fast.runner.run_single`, :func:`~ddfm_fast.runner.run_folder` or, under torchrun,
:func:`ddfm_fast.distributed.fuse_folder`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import click

from ddfm_fast import cli_options as opts
from ddfm_fast.outputs import same_path
from ddfm_fast.pairing import InputError, Pair, Pairing, Roles, pair_sources, roles
from ddfm_fast.runner import PairError, RunConfig, run_folder, run_single
from ddfm_fast.samples import EXAMPLES
from ddfm_fast.summary import SUMMARY_NAME, versions

# Exit codes of `fuse`: 0 all pairs fused (or skipped), 1 an error stopped the run (click's default),
# 2 a usage error (click's default), 3 the run finished but some pairs failed (see the summary),
# 130 interrupted (128 + the signal). All of them live in cli_options.EXIT_CODES.
EXIT_PAIRS_FAILED = opts.EXIT_PAIRS_FAILED

_FUSE_HELP = """Fuse image pairs with DDFM.

\b
Try it:     ddfm-fast fuse --example -o fused.png   (a shipped MSRS pair;
            --example mif: a shipped Harvard PET + MRI pair)
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
failed with reasons, unpaired files, images/s, settings, the execution plan,
versions, and per output what made it). Runs resume: an existing output is
kept (unless --overwrite) only when its record shows it is, byte for byte, the
file ddfm-fast wrote from these inputs (SHA-256) with the same output-affecting
settings (sampler options, model, size policy, output kind and format, UNet
dtype); outputs of other settings stop the run, naming the settings that
differ; a file that is not a verified output fails its pair, naming it (or is
replaced when it does not even open). One run at a time writes a folder (a
lock). A bad pair is reported and the run goes on. A single pair always
replaces OUT.

\b
Inputs: PNG, JPEG, BMP, TIFF, WebP, PPM/PGM/PNM, GIF; 8- or 16-bit; gray, RGB,
RGBA or palette; EXIF orientation applied; colour is reduced to the official
gray (OpenCV BGR2GRAY); 16-bit data is scaled by 1/65535 at full precision.
Sizes need not be multiples of 32 (--size-policy). The two images of a pair
must have the same size unless --resize-to-ir or --resize-to-vis resizes the
other one (Pillow LANCZOS).

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
--save-progress writes, per step, what the official p_sample_loop(record=True)
writes: x_<idx>.png, the luminance of the step's output x_{t-1}, min-max
scaled and truncated to 8 bits; beside it x0_<idx>.png, the step's EM-rectified
estimate x0' (same conversion). idx counts down as in the official code: step
j of N writes idx N-j, so x_0000.png is the last step. For people: diffusion.gif
(the x_{t-1} frames) and progress_strip.png (up to 8 steps, x_{t-1} above x0'),
each frame labelled with its step and the UNet's timestep t. Into
OUT-stem_progress/ beside OUT, or --progress-dir. Folder runs allow it only when
the folders hold exactly one pair (default folder: OUTDIR_progress/).

\b
--montage writes, per pair, the two sources and the fusion side by side,
labelled with their roles and the method (prior, steps): OUT-stem_montage.png
beside OUT, or OUTDIR_montage/<stem>.png for folder runs.

\b
The execution plan (how the step runs: tail backend, dtype, compile, CUDA
graphs, and why a faster path is not taken) is printed once on stderr; --fast
asks for the fastest the plan knows for the device (`ddfm-fast info` shows it).

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
itself exits 1), 130 Ctrl-C (SIGTERM 143): the outputs so far are kept and
the summary counts them; rerun the same command to resume. Errors are one
line; `ddfm-fast --debug fuse ...` shows the traceback.

\b
Output formats: one pair by the extension of -o: .png, .tif/.tiff (both
16-bit with --raw), .jpg/.jpeg (lossy, quality 95), .bmp, .npy (the raw
float luminance); folder runs by --format. --quiet prints only errors;
--log-json prints one JSON object per pair and a final one on stdout.
"""

_PATH = click.Path(path_type=Path)


# --------------------------------------------------------------------------------------------------- what to fuse


@dataclass
class Job:
    """What the positional arguments and folder options ask for: one pair (``pair``) or two folders."""

    roles: Roles
    out: Path
    pair: Optional[Pair] = None
    ir_dir: Optional[Path] = None
    vis_dir: Optional[Path] = None

    @property
    def inputs(self) -> dict[str, str]:
        return {self.roles.ir: str(self.ir_dir), self.roles.vis: str(self.vis_dir)}


def _job(mode: Optional[str], ir: Optional[Path], vis: Optional[Path], dirs: dict[str, Optional[Path]],
         out: Path) -> Job:
    """The mode (``--mri-dir`` / ``--func-dir`` imply mif) and the inputs, checked for a usable combination."""
    mode, ir_dir, vis_dir = opts.mode_and_folders(mode, dirs)
    r = roles(mode)
    if (ir_dir or vis_dir) and (ir or vis):
        raise click.UsageError("give either two image files or two folders, not both")
    if not (ir_dir or vis_dir or ir or vis):
        raise click.UsageError(f"nothing to fuse: give two images ({r.ir.upper()} {r.vis.upper()}) or the folders "
                               f"(--{r.ir}-dir and --{r.vis}-dir)")
    if ir or vis:
        if not (ir and vis):
            raise click.UsageError(f"one pair needs two images: {r.ir.upper()} (the {r.ir_long}) and "
                                   f"{r.vis.upper()} (the {r.vis_long})")
        return Job(r, out, pair=Pair.of(ir, vis))
    opts.require_both(mode, ir_dir, vis_dir)
    return Job(r, out, ir_dir=ir_dir, vis_dir=vis_dir)


def _output_kind(ctx: click.Context, o: dict[str, Any]) -> tuple[str, Optional[str], Optional[str]]:
    """(output kind, the flag that chose it, resize side) from the output options."""
    raw = o["raw"] or opts.explicit(ctx, "raw_format")
    if o["color"] and raw:
        raise click.UsageError("--color and --raw are different outputs; choose one")
    if o["resize_to_ir"] and o["resize_to_vis"]:
        raise click.UsageError("--resize-to-ir and --resize-to-vis cannot be combined; choose the size to keep")
    if o["progress_dir"] is not None and not o["save_progress"]:
        raise click.UsageError("--progress-dir needs --save-progress")
    output, chosen_by = ("color", "--color") if o["color"] else ((o["raw_format"], "--raw") if raw else ("gray", None))
    return output, chosen_by, "ir" if o["resize_to_ir"] else ("vis" if o["resize_to_vis"] else None)


def _check_single(job: Job, run: RunConfig) -> None:
    """Both inputs exist, and OUT is a file of the right suffix that is not an input (before a model is loaded)."""
    assert job.pair is not None
    for path, role in ((job.pair.ir, job.roles.ir_long), (job.pair.vis, job.roles.vis_long)):
        if not path.exists():
            raise click.ClickException(f"{role} {path}: no such file")
        if not path.is_file():
            raise click.ClickException(f"{role} {path}: not a file")
    if job.out.is_dir():
        raise click.BadParameter(f"{job.out} is a folder; give the output file for one pair", param_hint="-o/--output")
    if same_path(job.out, job.pair.ir) or same_path(job.out, job.pair.vis):
        raise click.BadParameter(f"{job.out} is one of the inputs; it would be overwritten", param_hint="-o/--output")
    if same_path(job.pair.ir, job.pair.vis):
        opts.reporter().warn(f"{job.roles.ir_long} and {job.roles.vis_long} are one file ({job.pair.ir}): the image "
                             "is fused with itself")
    opts.check_writable(job.out)  # before the model loads, not after the compute


def _pair_folders(job: Job) -> Pairing:
    """The folders' pairs, after checking that OUT can be the output folder (before a model is loaded)."""
    out = job.out
    assert job.ir_dir is not None and job.vis_dir is not None
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} is a file; folder runs need an output folder", param_hint="-o/--output")
    if same_path(out, job.ir_dir) or same_path(out, job.vis_dir):
        raise click.BadParameter(f"{out} is an input folder; outputs would replace inputs", param_hint="-o/--output")
    if same_path(job.ir_dir, job.vis_dir):
        opts.reporter().warn(f"the {job.roles.ir_name} and {job.roles.vis_name} folders are one folder "
                             f"({job.ir_dir}): every image is fused with itself")
    pairing = pair_sources(job.ir_dir, job.vis_dir, job.roles.mode)
    if not pairing.pairs and not pairing.ambiguous:
        raise click.ClickException(
            f"no pairs: no file stem appears in both {job.ir_dir} and {job.vis_dir} "
            f"({len(pairing.unpaired)} unpaired images); files are paired by their name without extension"
        )
    opts.check_writable(out, folder=True)  # before the model loads, not after the compute
    return pairing


def _progress_dir(job: Job, pairing: Optional[Pairing], o: dict[str, Any], run: RunConfig) -> Optional[Path]:
    """Where --save-progress writes (None without it)."""
    if not o["save_progress"]:
        return None
    if run.sampler.prior == "none":
        raise click.UsageError("--save-progress writes the diffusion steps; --prior none (EM only) has none")
    if pairing is None:
        return o["progress_dir"] or job.out.parent / f"{job.out.stem}_progress"
    if len(pairing.pairs) != 1:
        raise click.UsageError(f"--save-progress writes the images of one pair, but the folders hold "
                               f"{len(pairing.pairs)} pairs; run that pair alone (ddfm-fast fuse IR VIS -o OUT "
                               "--save-progress)")
    progress_dir = o["progress_dir"] or job.out.parent / f"{job.out.name}_progress"
    if same_path(progress_dir, job.out) or job.out.resolve() in progress_dir.resolve().parents:
        raise click.BadParameter(f"{progress_dir} is inside the output folder {job.out}; name another folder",
                                 param_hint="--progress-dir")
    return progress_dir


OUTPUT_OPTIONS: list[opts.Spec] = [
    (("--resize-to-ir", "--resize-to-func", "resize_to_ir"), dict(is_flag=True,
     help="Resize the vis/MRI image to the ir/functional image's size when they differ (LANCZOS).")),
    (("--resize-to-vis", "--resize-to-mri", "resize_to_vis"), dict(is_flag=True,
     help="Resize the ir/functional image to the vis/MRI image's size when they differ (LANCZOS).")),
    (("--color", "--colour", "color"), dict(is_flag=True,
     help="RGB output: fused luminance + chroma of the visible (ivf) or functional (mif) image.")),
    (("--raw",), dict(is_flag=True, help="Unstretched luminance: 16-bit PNG or .npy (see above).")),
    (("--raw-format",), dict(type=click.Choice(["png16", "npy"]), default="png16", show_default=True,
     help="Format of --raw output (implies --raw).")),
    (("--save-progress",), dict(is_flag=True,
     help="Per-step images: the official x_<idx>.png (x_{t-1}), x0_<idx>.png (x0') and a GIF (one pair only).")),
    (("--progress-dir",), dict(type=_PATH, help="Folder for --save-progress images.")),
    opts.FORMAT_OPTION,
    (("--montage",), dict(is_flag=True,
     help="Also write a labelled picture per pair: the two sources and the fusion side by side (see above).")),
]


# --------------------------------------------------------------------------------------------------- fuse


@click.command("fuse", help=_FUSE_HELP, context_settings={"max_content_width": 100})
@click.argument("ir", required=False, metavar="[IR|FUNC]", type=_PATH)
@click.argument("vis", required=False, metavar="[VIS|MRI]", type=_PATH)
@click.option("-o", "--output", "out", required=True, type=_PATH, help="Output file (one pair) or folder (folders).")
@click.option("--mode", type=click.Choice(["ivf", "mif"]), default=None,
              help="ivf: infrared + visible (default); mif: functional (CT/PET/SPECT) + MRI.")
@click.option("--ir-dir", type=_PATH, help="Folder of infrared images (ivf).")
@click.option("--vis-dir", type=_PATH, help="Folder of visible images (ivf).")
@click.option("--func-dir", type=_PATH, help="Folder of CT, PET or SPECT images (mif).")
@click.option("--mri-dir", type=_PATH, help="Folder of MRI images (mif).")
@click.option("--example", type=click.Choice(sorted(EXAMPLES)), is_flag=False, flag_value="ivf", default=None,
              help="Fuse a sample pair shipped in the package: ivf (default: MSRS 00004N, infrared + visible) or "
                   "mif (Harvard slice 11, PET + MRI); no image arguments.")
@opts.model_options
@opts.sampler_options
@opts.option_group("outputs", OUTPUT_OPTIONS)
@opts.run_options
@opts.accel_options
@opts.log_options
@click.pass_context
@opts.friendly_errors
def fuse_command(ctx: click.Context, ir: Optional[Path], vis: Optional[Path], out: Path, mode: Optional[str],
                 ir_dir: Optional[Path], vis_dir: Optional[Path], func_dir: Optional[Path], mri_dir: Optional[Path],
                 example: Optional[str], model: dict[str, Any], sampler: dict[str, Any], outputs: dict[str, Any],
                 run: dict[str, Any], accel: dict[str, Any]) -> None:
    dirs = dict(ir_dir=ir_dir, vis_dir=vis_dir, func_dir=func_dir, mri_dir=mri_dir)
    if example is not None:
        mode, ir, vis = _example(example, mode, ir, vis, dirs)
    job = _job(mode, ir, vis, dirs, out)
    output, output_flag, resize = _output_kind(ctx, outputs)
    if job.pair is not None and job.out.is_dir():
        raise click.BadParameter(f"{job.out} is a folder; give the output file for one pair", param_hint="-o/--output")
    output, file_format = opts.output_choice(job.out if job.pair is not None else None, output,
                                             outputs["out_format"], raw_format_given=opts.explicit(ctx, "raw_format"))
    cfg = opts.build_run(ctx, sampler=sampler, accel=accel, model=model, run=run, mode=job.roles.mode,
                         output=output, output_flag=output_flag, resize=resize, file_format=file_format)
    try:
        if job.pair is not None:
            _check_single(job, cfg)
            progress_dir = _progress_dir(job, None, outputs, cfg)
            _check_side_outputs(job, None, progress_dir, outputs["montage"], _progress_flag(outputs))
            _fuse_one(job, cfg, run, progress_dir, montage=outputs["montage"])
        else:
            pairing = _pair_folders(job)
            progress_dir = _progress_dir(job, pairing, outputs, cfg)
            _check_side_outputs(job, pairing, progress_dir, outputs["montage"], _progress_flag(outputs))
            extra = {"paper": bool(model["paper"]), "overwrite": bool(run["overwrite"])}
            ctx.exit(_fuse_folders(job, pairing, cfg, run, progress_dir, extra, montage=outputs["montage"]))
    except InputError as exc:
        raise click.ClickException(str(exc)) from exc


def _example(kind: str, mode: Optional[str], ir: Optional[Path], vis: Optional[Path],
             dirs: dict[str, Optional[Path]]) -> tuple[str, Path, Path]:
    """``--example KIND``: the mode and the two files of a sample pair shipped in the package."""
    from ddfm_fast.samples import example_pair

    if ir is not None or vis is not None or any(d is not None for d in dirs.values()):
        raise click.UsageError("--example fuses a shipped sample pair; give no images or folders with it")
    if mode is not None and mode != kind:
        raise click.UsageError(f"--example {kind} is a {kind} pair, but --mode is {mode}")
    try:
        ir_path, vis_path = example_pair(kind)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    return kind, ir_path, vis_path


def _montage_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_montage.png")


def _progress_flag(o: dict[str, Any]) -> str:
    return "--progress-dir" if o.get("progress_dir") else "--save-progress"


def _montage_folder(out: Path) -> Path:
    return out.parent / f"{out.name}_montage"


def _check_side_outputs(job: Job, pairing: Optional[Pairing], progress_dir: Optional[Path], montage: bool,
                        progress_flag: str) -> None:
    """--montage and --save-progress write beside OUT: neither may replace an input (before a model is loaded)."""
    from ddfm_fast.progress import is_progress_file

    pairs = [job.pair] if job.pair is not None else list(pairing.pairs if pairing is not None else [])
    inputs = [path for p in pairs for path in (p.ir, p.vis)]
    if montage:
        dests = ([_montage_path(job.out)] if job.pair is not None
                 else [_montage_folder(job.out) / f"{p.stem}.png" for p in pairs])
        opts.check_not_input(dests, inputs, "--montage")
    if progress_dir is not None:
        # The recorder writes (and clears from an earlier run) only its own frame names in that folder.
        opts.check_not_input([progress_dir / p.name for p in inputs if is_progress_file(p.name)], inputs,
                             progress_flag)


def _write_montages(records: list[dict[str, Any]], roles_: Roles, method: str, folder: Optional[Path],
                    single: Optional[Path] = None) -> None:
    """``--montage``: a labelled sources | fusion picture per record of the run (its ir, vis and output)."""
    from ddfm_fast.io import ImageReadError
    from ddfm_fast.montage import pair_montage, save_image

    written = []
    for rec in records:
        ir, vis, fused = Path(rec[roles_.ir]), Path(rec[roles_.vis]), Path(rec["output"])
        dest = single if single is not None else folder / f"{rec['stem']}.png"  # type: ignore[operator]
        try:
            img = pair_montage(ir, vis, fused, ir_label=f"{roles_.ir_name}: {ir.name}",
                               vis_label=f"{roles_.vis_name}: {vis.name}", method=method)
        except (ImageReadError, ValueError) as exc:
            click.echo(f"montage of {rec['stem']} not written: {exc}", err=True)
            continue
        written.append(save_image(img, dest))
    if written:
        click.echo(f"montage: {written[0]}" if single is not None else
                   f"montages: {len(written)} in {folder}", err=True)


def _method(cfg: RunConfig, steps: Optional[int]) -> str:
    from ddfm_fast.montage import method_label

    return method_label(cfg.sampler.prior, cfg.checkpoint, steps)


def _fuse_one(job: Job, cfg: RunConfig, run: dict[str, Any], progress_dir: Optional[Path],
              montage: bool = False) -> None:
    if _dist_env() is not None:
        raise click.UsageError("torchrun shards folder runs (--ir-dir/--vis-dir); fuse a single pair without "
                               "torchrun")
    device = opts.resolve_device(run["device"])
    opts.resolve_plan(cfg, device)
    model = opts.load_model(cfg, device)
    assert job.pair is not None
    say = opts.reporter()
    try:
        done = run_single(model, job.pair, job.out, cfg, device=device, progress_dir=progress_dir,
                          step_bar=opts.bar_factory(run["progress_bar"]))
    except PairError as exc:
        say.event({"event": "pair", "status": "failed", "stem": job.pair.stem, "reason": str(exc)})
        raise click.ClickException(str(exc)) from exc
    opts.report_fallbacks(done.plan)
    w, h = done.record["size"]
    say.info(f"wrote {job.out} ({w}x{h}, {done.record['seconds']:.2f} s)")
    if "note" in done.record:
        say.info(f"note: {done.record['note']}")
    if "progress" in done.record:
        say.info(f"progress images: {done.record['progress']}")
    say.event({"event": "pair", "status": "done", **done.record})
    if montage:
        steps = cfg.sampler.for_model(getattr(model, "default_steps", None)).num_steps()
        _write_montages([done.record], job.roles, _method(cfg, steps), None, single=_montage_path(job.out))


def _fuse_folders(job: Job, pairing: Pairing, cfg: RunConfig, run: dict[str, Any], progress_dir: Optional[Path],
                  extra: dict[str, Any], montage: bool = False) -> int:
    """A folder run, in one process or as one torchrun rank; returns the exit code."""
    from ddfm_fast import distributed

    from ddfm_fast.resume import FolderLock

    env = _dist_env()
    device = opts.resolve_device(run["device"]) if env is None else _dist_device(env, run["device"])
    plan = opts.resolve_plan(cfg, device)
    bar = opts.bar_factory(run["progress_bar"])
    say = opts.reporter()
    args = dict(plan=plan, overwrite=run["overwrite"], extra_settings={**extra, "device": str(device)},
                inputs=job.inputs, progress_dir=progress_dir, on_event=say.event, warn=say.warn)
    if env is not None:  # rank 0 locks the folder before any rank loads the model
        code, doc = distributed.fuse_folder(env, device, lambda: opts.load_model(cfg, device), pairing, job.out,
                                            cfg, failed_code=EXIT_PAIRS_FAILED, bar=bar, **args)
        if doc is not None:
            _report_distributed(doc, job.out, env.world_size)
            if montage:
                _folder_montages(doc, pairing, job, cfg)
            _report_end(doc, job.out, code)
        return code
    with FolderLock(job.out) as lock:  # a second run into this folder stops here, before loading a model
        model = opts.load_model(cfg, device)
        summary = run_folder(model, pairing, job.out, cfg, device=device, bar=bar, step_bar=bar, lock=lock, **args)
    doc = summary.to_dict()
    doc["write_error"] = summary.write_error
    _report(doc, job.out)
    if montage:
        _folder_montages(doc, pairing, job, cfg)
    code = (opts.EXIT_ERROR if summary.stopped or summary.write_error
            else EXIT_PAIRS_FAILED if summary.failed else opts.EXIT_OK)
    _report_end(doc, job.out, code)
    return code


def _report_end(doc: dict[str, Any], out: Path, code: int) -> None:
    """A folder run that stopped early or could not write its summary ends with that error, on one line; and
    ``--log-json``'s final line."""
    say = opts.reporter()
    if doc.get("stopped"):
        say.error(f"Error: the run stopped: {doc['stopped']}; {doc['counts']['outputs']} output(s) in {out} are "
                  "kept; free space (or fix the folder) and rerun the same command to resume")
    if doc.get("write_error"):
        say.error(f"Error: {doc['write_error']}; the outputs are kept and their records stay in the folder's "
                  "journal, so rerunning the same command resumes")
    say.event({"event": "end", "exit_code": code, "counts": doc["counts"], "summary": str(out / SUMMARY_NAME),
               **({"stopped": doc["stopped"]} if doc.get("stopped") else {}),
               **({"error": doc["write_error"]} if doc.get("write_error") else {})})


def _folder_montages(doc: dict[str, Any], pairing: Pairing, job: Job, cfg: RunConfig) -> None:
    """``--montage`` of a folder run: every pair with an output (fused now or kept), in OUTDIR_montage/."""
    by_stem = {p.stem: p for p in pairing.pairs}
    r = job.roles
    records = [{"stem": rec["stem"], r.ir: str(by_stem[rec["stem"]].ir), r.vis: str(by_stem[rec["stem"]].vis),
                "output": rec["output"]} for rec in [*doc["done"], *doc["skipped"]] if rec["stem"] in by_stem]
    records.sort(key=lambda rec: rec["stem"])
    _write_montages(records, r, _method(cfg, doc["settings"].get("num_steps")), _montage_folder(job.out))


def totals_line(doc: dict[str, Any], out: Path, ranks: Optional[int] = None) -> str:
    """The one line a folder run ends with (single process, or rank 0 of a torchrun run), from its summary."""
    c, rate = doc["counts"], doc["timing"]["images_per_s"]
    return (f"{c['done']} fused, {c['skipped']} skipped (output exists), {c['failed']} failed, "
            f"{c['unpaired']} unpaired file(s)" + (f", {c['pending']} not reached" if c.get("pending") else "")
            + (f" on {ranks} ranks" if ranks is not None else "")
            + (f"; {rate:.3g} images/s" if rate else "") + f"; summary: {out / SUMMARY_NAME}")


def _report(doc: dict[str, Any], out: Path, ranks: Optional[int] = None) -> None:
    """The end of a folder run on stderr: totals, fallbacks, unpaired files, failures (these even with --quiet)."""
    say = opts.reporter()
    say.info(totals_line(doc, out, ranks))
    for fallback in (doc["plan"] or {}).get("fallbacks", []):
        say.info(f"fell back: {fallback}")
    for item in doc["unpaired"]:
        say.info(f"unpaired: {item['file']}: {item['reason']}")
    for item in doc["failed"]:
        where = f" (rank {item['rank']})" if "rank" in item else ""
        say.error(f"failed{where}: {item['stem']}: {item['reason']}")


def _report_distributed(doc: dict[str, Any], out: Path, world_size: int) -> None:
    for rank in doc["distributed"]["ranks"]:
        r_rate = rank["images_per_s"]
        opts.reporter().info(f"rank {rank['rank']} ({rank['host']}, {rank['device']}): {rank['done']} fused, "
                             f"{rank['failed']} failed" + (f", {r_rate:.3g} images/s" if r_rate else ""))
    _report(doc, out, ranks=world_size)


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


# --------------------------------------------------------------------------------------------------- info


def info_report() -> dict[str, Any]:
    """Versions, devices with the plan the default run and ``--fast`` get on each (and why not faster), presets."""
    import torch

    from ddfm_fast.checkpoint import DEFAULT_PRESET, PRESETS, CheckpointError, _preset_search_dirs, resolve_preset
    from ddfm_fast.config import DEFAULT_PRIOR, AccelConfig
    from ddfm_fast.plan import ENV_BACKEND, BackendError, plan

    devices: list[dict[str, Any]] = [{"device": "cpu", "name": "CPU", "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for k in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(k)
            devices.append({"device": f"cuda:{k}", "name": props.name,
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "capability": f"{props.major}.{props.minor}"})
    for d in devices:
        d["plan"] = {}
        for name, accel in (("default", AccelConfig()), ("fast", AccelConfig.fast())):
            try:
                d["plan"][name] = plan(d["device"], accel).to_dict()
            except BackendError as exc:
                d["plan"][name] = {"error": str(exc)}
    presets = []
    for name, preset in sorted(PRESETS.items()):
        try:
            found: Optional[str] = "built in" if preset.analytic else str(resolve_preset(name))
        except CheckpointError:  # not downloaded
            found = None
        presets.append({"name": name, "default": name == DEFAULT_PRESET, "description": preset.description,
                        "file": preset.filename or None, "found": found, "url": preset.url,
                        "default_steps": preset.default_steps})
    return {
        "versions": versions(),
        "devices": devices,
        "cuda_available": torch.cuda.is_available(),
        "presets": presets,
        "preset_search_dirs": [str(d) for d in _preset_search_dirs()],
        "environment": {k: os.environ.get(k) for k in (ENV_BACKEND, "DDFM_FAST_HOME", "TRITON_INTERPRET")},
        "default_checkpoint": DEFAULT_PRIOR,
    }


def _describe_plan(p: dict[str, Any]) -> str:
    from ddfm_fast.plan import ExecutionPlan

    return f"error: {p['error']}" if "error" in p else ExecutionPlan(**p).describe()


def _format_info(rep: dict[str, Any]) -> str:
    lines = ["versions:"]
    lines += [f"  {k}: {val if val is not None else ('not installed' if k == 'triton' else 'none')}"
              for k, val in rep["versions"].items()]
    lines.append("devices, with the execution plan of a default run and of --fast (and why a faster path is not "
                 "taken):")
    for d in rep["devices"]:
        extra = f", {d['memory_gib']} GiB, sm {d['capability']}" if "memory_gib" in d else ""
        lines.append(f"  {d['device']}: {d['name']}{extra}")
        lines.append(f"    default: {_describe_plan(d['plan']['default'])}")
        lines.append(f"    --fast:  {_describe_plan(d['plan']['fast'])}")
    if not rep["cuda_available"]:
        lines.append("  (no CUDA device visible to torch)")
    lines.append("presets (--checkpoint NAME), searched in: " + ", ".join(rep["preset_search_dirs"]))
    for pr in rep["presets"]:
        where = f"found at {pr['found']}" if pr["found"] else f"not found; download from {pr['url']}"
        lines.append(f"  {pr['name']}: {pr['description']}")
        if pr["file"] is None:
            lines.append(f"    built in, no file ({pr['default_steps']} steps by default)")
        else:
            lines.append(f"    file {pr['file']} ({pr['default_steps']} steps by default): {where}")
    lines.append(f"default checkpoint: the shipped prior '{rep['default_checkpoint']}' (--checkpoint adm256-uncond "
                 "for the paper's; --paper uses adm256-uncond)")
    env = ", ".join(f"{k}={val}" for k, val in rep["environment"].items() if val is not None) or "none set"
    lines.append(f"environment: {env}")
    return "\n".join(lines)


@click.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info_command(as_json: bool) -> None:
    """Versions, devices with the execution plan a default run and --fast get on each (and why), and presets."""
    rep = info_report()
    click.echo(json.dumps(rep, indent=2) if as_json else _format_info(rep))
