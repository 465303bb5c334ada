"""The command line's shared option groups and the one settings builder of ``fuse`` and ``score``.

Each :class:`~ddfm_fast.config.SamplerConfig` field is one flag (:data:`SAMPLER_OPTIONS`) and each
:class:`~ddfm_fast.config.AccelConfig` field one flag (:data:`ACCEL_OPTIONS`); their defaults are the configs'
own, so no constant is typed twice. An option group is a decorator that adds its flags to a command and hands
their values to it as one dict (``sampler=``, ``accel=``, ``model=``, ``run=``). :func:`build_run` maps the dicts
onto a :class:`~ddfm_fast.runner.RunConfig`: ``--paper`` starts from ``SamplerConfig.paper()`` and rejects the
flags that contradict it, ``--fast`` is ``AccelConfig.fast()`` (the execution plan decides per device), and a
:class:`~ddfm_fast.config.ConfigError` becomes a usage error that names the flag. The helpers below it resolve
the device and the execution plan once per run, load the model, and make the progress bars.

What a command says, and how it fails: :class:`Reporter` (``--quiet``: nothing but errors on stderr;
``--log-json``: one JSON object a line on stdout, per pair and at the end) is set by :data:`log_options` and read
by every helper here; :func:`check_writable` checks an output path before a model is loaded, and
:func:`one_line_errors` turns the errors a command cannot foresee (a file system that fails mid-run) into one
line naming the file. The exit codes are :data:`EXIT_CODES`. Nothing here imports torch at import time, so
``--help`` stays fast.

Adding a sampler option: one field in ``SamplerConfig`` and one entry in :data:`SAMPLER_OPTIONS`
(``tests/test_cli_options.py`` fails until both exist).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import click
from click.core import ParameterSource

from ddfm_fast.config import (
    BACKENDS,
    COMPILE_BACKENDS,
    COMPILE_MODES,
    DTYPE_NAMES,
    MAX_SEED,
    PRIORS,
    SIZE_POLICIES,
    TAU_REDUCES,
    TV_PROXES,
    AccelConfig,
    ConfigError,
    SamplerConfig,
)
from ddfm_fast.progress import NoBar
from ddfm_fast.runner import RunConfig

Spec = tuple[tuple[str, ...], dict[str, Any]]  # click.option's (param_decls, attrs)
# The fields' declared defaults (building a SamplerConfig here would import torch through its validation).
_SAMPLER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}

# Exit codes of every command (README, "What happens when things go wrong"): click's own 1 and 2, and ours.
EXIT_OK = 0  # done (a folder run: every pair fused or verified and kept)
EXIT_ERROR = 1  # an error stopped the command (one line on stderr; the traceback with --debug)
EXIT_USAGE = 2  # a bad option or argument, before anything was computed
EXIT_PAIRS_FAILED = 3  # a folder run finished, but some pairs failed (listed on stderr and in the summary)
EXIT_INTERRUPTED = 130  # Ctrl-C; SIGTERM gives 143 and SIGHUP 129 (128 + the signal's number)
EXIT_CODES = {EXIT_OK: "success", EXIT_ERROR: "error", EXIT_USAGE: "usage error",
              EXIT_PAIRS_FAILED: "some pairs failed", EXIT_INTERRUPTED: "interrupted (128 + signal)"}


def _default(name: str) -> Any:
    return _SAMPLER_DEFAULTS[name]


SAMPLER_OPTIONS: dict[str, Spec] = {
    "prior": (("--prior",), dict(type=click.Choice(PRIORS), default=_default("prior"), show_default=True,
              help="'none': the paper's ablation I, EM iterations only from (I+V)/2 (--steps iterations, default "
                   "100); no model, so no --checkpoint.")),
    "steps": (("--steps",), dict(metavar="N", default=None,
              help="DDIM steps (respacing: N, 'N1,N2' or 'ddimN'); default: the model's own (100 for the "
                   "paper's). With --prior none: EM iterations.")),
    "seed": (("--seed",), dict(type=click.IntRange(0, MAX_SEED), default=_default("seed"), show_default=True,
             help="Seed of each image's initial noise (a CPU generator per image).")),
    "lamb": (("--lamb",), dict(type=click.FloatRange(min=0, min_open=True), default=_default("lamb"),
             show_default=True, help="EM step TV weight lambda (Eq. 21).")),
    "rho": (("--rho",), dict(type=click.FloatRange(min=0, min_open=True), default=_default("rho"),
            show_default=True, help="EM step ADMM penalty rho (Eqs. 22-27).")),
    "tau_reduce": (("--tau-reduce",), dict(type=click.Choice(TAU_REDUCES), default=_default("tau_reduce"),
                   show_default=True,
                   help="EM tau_a, tau_b (Eq. 17): one per image (a batch fuses each image as alone) or one mean "
                        "over the batch (the official code; the same for one image).")),
    "clip": (("--clip/--no-clip",), dict(default=_default("clip"), show_default=True,
             help="Clamp the x0 prediction to [-1, 1] before the EM step (official clip_denoised).")),
    "tv_prox": (("--tv-prox",), dict(type=click.Choice(TV_PROXES), default=_default("tv_prox"), show_default=True,
                help="EM step's F update: 'shrink' (the official code) or 'soft' (the paper's Eqs. 26-27 soft "
                     "threshold; needs --tv-threshold, since the paper's lamb/rho = 500 zeroes every gradient).")),
    "tv_threshold": (("--tv-threshold",), dict(type=click.FloatRange(min=0), default=_default("tv_threshold"),
                     help="Soft threshold kappa for --tv-prox soft (e.g. 0.01).")),
    "size_policy": (("--size-policy",), dict(type=click.Choice(SIZE_POLICIES), default=_default("size_policy"),
                    show_default=True,
                    help="pad: reflect-pad to /32 and crop back (no pixel lost); crop: official top-left crop "
                         "to /32.")),
    "train_timesteps": (("--train-timesteps",), dict(type=click.IntRange(min=1), default=_default("train_timesteps"),
                        show_default=True, help="Length of the model's training noise schedule (ADM models: 1000).")),
}

ACCEL_OPTIONS: dict[str, Spec] = {
    "dtype": (("--dtype",), dict(type=click.Choice([*DTYPE_NAMES, "auto"]), default=None,
              help="UNet body precision (GroupNorm, softmax and the EM step stay fp32); auto: the plan's choice "
                   "(fp16 on CUDA, fp32 on a CPU). Default fp32, with --fast auto.")),
    "channels_last": (("--channels-last/--no-channels-last",), dict(default=None,
                      help="NHWC memory format for the UNet's convolutions (default off).")),
    "compile": (("--compile/--no-compile",), dict(default=None,
                help="torch.compile the whole step, fullgraph (default off; with --fast the plan's choice).")),
    "compile_mode": (("--compile-mode",), dict(type=click.Choice(COMPILE_MODES), default=None,
                     help="Inductor's mode (default 'default'; max-autotune takes minutes to compile).")),
    "compile_backend": (("--compile-backend",), dict(type=click.Choice(COMPILE_BACKENDS), default=None,
                        help="torch.compile backend (default inductor). eager and aot_eager trace the step "
                             "without generating code: a debugging and testing aid (graph breaks, the compile "
                             "cache), not faster.")),
    "cuda_graphs": (("--cuda-graphs/--no-cuda-graphs",), dict(default=None,
                    help="Capture one step as a CUDA graph and replay it for every step (CUDA only).")),
    "backend": (("--backend",), dict(type=click.Choice(BACKENDS), default=None,
                help="Step-tail backend (default auto; DDFM_FAST_BACKEND overrides).")),
}

MODEL_OPTIONS: list[Spec] = [
    (("--checkpoint",), dict(metavar="PATH|PRESET",
     help="UNet weights (.pt/.pth/.safetensors) or a preset name (see `ddfm-fast info`); default: the shipped "
          "analytic prior ddfm-shrink (ddfm-small is the trained one; adm256-uncond the paper's).")),
    (("--model-config",), dict(type=click.Path(dir_okay=False),
     help="JSON/YAML create_model arguments, when the checkpoint does not carry them.")),
    (("--paper",), dict(is_flag=True,
     help="The official protocol: top-left crop to /32, seed 3407, lamb 0.5, rho 0.001, one EM tau over the "
          "batch, the gray output, batch size 1, and the paper's prior adm256-uncond with its 100 steps unless "
          "--checkpoint / --steps say otherwise. Contradicting flags are rejected.")),
]

RUN_OPTIONS: list[Spec] = [
    (("--device",), dict(help="torch device, e.g. cuda, cuda:1, cpu; default CUDA when available.")),
    (("--batch-size",), dict(type=click.IntRange(min=1), default=1, show_default=True,
     help="Fuse up to N same-size pairs at once (one EM tau per image; equal to single runs up to float "
          "rounding).")),
    (("--overwrite",), dict(is_flag=True, help="Redo pairs whose output exists (default: keep them, resume).")),
    (("--progress-bar/--no-progress-bar", "progress_bar"), dict(default=None,
     help="Show progress bars on stderr (default: only on a terminal).")),
]

FAST_OPTION: Spec = (("--fast",), dict(is_flag=True,
                     help="AccelConfig.fast(): the fastest path the execution plan knows for the device (on CUDA "
                          "fp16, compile, Triton tail, CUDA graphs; on a CPU fp32 eager, and it says why). "
                          "Explicit acceleration flags override it."))


def option_group(dest: str, specs: list[Spec]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding ``specs`` to a command; the command receives their values as one dict ``dest=``."""
    names = [click.Option(decls, **attrs).name for decls, attrs in specs]

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[dest] = {name: kwargs.pop(name) for name in names}
            return f(*args, **kwargs)

        for decls, attrs in reversed(specs):  # click lists options in decorator order, top first
            wrapper = click.option(*decls, **attrs)(wrapper)
        return wrapper

    return decorate


sampler_options = option_group("sampler", list(SAMPLER_OPTIONS.values()))
accel_options = option_group("accel", [*ACCEL_OPTIONS.values(), FAST_OPTION])
model_options = option_group("model", MODEL_OPTIONS)
run_options = option_group("run", RUN_OPTIONS)


# --------------------------------------------------------------------------------------------------- flags


def flag(name: str) -> str:
    """The command-line flag of a config field: ``tv_threshold`` -> ``--tv-threshold``."""
    return "--" + name.replace("_", "-")


_FIELDS = sorted({*SAMPLER_OPTIONS, *ACCEL_OPTIONS, *(f.name for f in dataclasses.fields(RunConfig))},
                 key=len, reverse=True)


def usage_error(exc: ConfigError) -> click.UsageError:
    """A :class:`ConfigError` (whose message starts with the field it is about) as a usage error in flags.

    ``tv_prox='soft' needs an explicit tv_threshold`` reads ``--tv-prox soft needs an explicit --tv-threshold``:
    the leading field, every ``field='value'``, and every field name with an underscore are written as flags.
    """
    text = str(exc)
    for name in _FIELDS:
        text = re.sub(rf"\b{name}='([^']*)'", lambda m, n=name: f"{flag(n)} {m.group(1)}", text)
        if "_" in name:
            text = re.sub(rf"(?<![-\w]){name}\b", flag(name), text)
        elif re.match(rf"{name}\b", text):
            text = flag(name) + text[len(name):]
    return click.UsageError(text)


def explicit(ctx: click.Context, name: str) -> bool:
    """True when the user gave option ``name`` (not its default)."""
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)


def _as_flag(name: str, value: Any) -> str:
    spec = SAMPLER_OPTIONS.get(name)
    if spec is not None and "/" in spec[0][0]:  # a boolean --x/--no-x flag
        on, off = spec[0][0].split("/")
        return on if value else off
    return f"{flag(name)} {value}"


# --------------------------------------------------------------------------------------------------- builder


def paper_conflicts(given: dict[str, Any], *, output: str, output_flag: Optional[str], resize: Optional[str],
                    batch_size: int, file_format: Optional[str] = None) -> list[str]:
    """The flags that contradict ``--paper`` (explicit values equal to the protocol's are fine; ``--steps`` and
    ``--checkpoint`` may change the model and its steps). Lossless formats (PNG, TIFF, BMP) hold the paper's
    pixels; JPEG does not."""
    paper = SamplerConfig.paper()
    conflicts = [f"{_as_flag(k, v)} (the paper uses {getattr(paper, k)})"
                 for k, v in given.items() if k != "steps" and v != getattr(paper, k)]
    if output != "gray":
        flag_ = output_flag or ("an .npy output" if output == "npy" else "--" + output)
        conflicts.append(f"{flag_} (the paper writes the min-max stretched 8-bit gray output)")
    if file_format == "jpeg":
        conflicts.append("a JPEG output (lossy; the paper writes PNG)")
    if resize is not None:
        conflicts.append("--resize-to-* (the paper fuses registered pairs of equal size)")
    if batch_size != 1:
        conflicts.append(f"--batch-size {batch_size} (the official driver fuses one image at a time)")
    return conflicts


def accel_config(accel: dict[str, Any]) -> AccelConfig:
    """``--fast`` (``AccelConfig.fast()``) or the faithful default, with the explicit acceleration flags on top."""
    given = {k: v for k, v in accel.items() if k in ACCEL_OPTIONS and v is not None}
    if given.get("dtype") == "auto":
        given["dtype"] = None
    base = AccelConfig.fast() if accel.get("fast") else AccelConfig()
    return base.replace(**given)


def build_run(ctx: click.Context, *, sampler: dict[str, Any], accel: dict[str, Any], model: dict[str, Any],
              run: dict[str, Any], mode: str, output: str = "gray", output_flag: Optional[str] = None,
              resize: Optional[str] = None, file_format: Optional[str] = None) -> RunConfig:
    """The run the flags describe (``fuse`` and ``score``); bad or contradicting flags are a usage error.

    ``file_format`` is the outputs' format (:data:`ddfm_fast.outputs.FORMATS`; None: PNG, or ``.npy`` for raw
    npy output), from ``-o``'s extension or ``--format`` (:func:`output_format`)."""
    given = {k: v for k, v in sampler.items() if explicit(ctx, k)}
    checkpoint = model["checkpoint"]
    from ddfm_fast.io import pixel_cap

    try:
        pixel_cap()  # DDFM_FAST_MAX_PIXELS is read when the first image is; a bad value fails now, not then
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        if model["paper"]:
            conflicts = paper_conflicts(given, output=output, output_flag=output_flag, resize=resize,
                                        batch_size=run["batch_size"], file_format=file_format)
            if conflicts:
                raise click.UsageError("--paper sets the official protocol and cannot be combined with: "
                                       + "; ".join(conflicts))
            from ddfm_fast.checkpoint import DEFAULT_PRESET

            sampler_cfg = SamplerConfig.paper(**{**given, "steps": sampler["steps"]})
            checkpoint = checkpoint or DEFAULT_PRESET
        else:
            sampler_cfg = SamplerConfig(**sampler)
        return RunConfig(sampler=sampler_cfg, accel=accel_config(accel), mode=mode, output=output,
                         resize=resize, checkpoint=checkpoint, model_config=model["model_config"],
                         batch_size=run["batch_size"], file_format=file_format)
    except ConfigError as exc:
        raise usage_error(exc) from exc


# --------------------------------------------------------------------------------------------------- modes


_MODE_FOLDERS = {"ivf": ("ir_dir", "vis_dir"), "mif": ("func_dir", "mri_dir")}


def mode_and_folders(mode: Optional[str], dirs: dict[str, Any]) -> tuple[str, Any, Any]:
    """The fusion mode from ``--mode`` and the folder options (``--func-dir`` / ``--mri-dir`` imply mif), and
    the folders of its ir side and vis side (either may be None). ``dirs`` holds the four folder options."""
    given = {m: [flag(k) for k in keys if dirs[k] is not None] for m, keys in _MODE_FOLDERS.items()}
    if given["ivf"] and given["mif"]:
        raise click.UsageError(f"{', '.join(given['ivf'])} (ivf) and {', '.join(given['mif'])} (mif) cannot be "
                               "combined: give the folders of one mode, not both")
    mode = mode or ("mif" if given["mif"] else "ivf")
    other = "mif" if mode == "ivf" else "ivf"
    if given[other]:
        mine = " and ".join(flag(k) for k in _MODE_FOLDERS[mode])
        raise click.UsageError(f"{', '.join(given[other])} belong to --mode {other}; in {mode} mode use {mine}")
    ir_key, vis_key = _MODE_FOLDERS[mode]
    return mode, dirs[ir_key], dirs[vis_key]


def require_both(mode: str, ir_dir: Any, vis_dir: Any, what: str = "a folder run") -> None:
    """Both folders of ``mode`` given, else a usage error naming the missing one."""
    ir_flag, vis_flag = (flag(k) for k in _MODE_FOLDERS[mode])
    if ir_dir is None or vis_dir is None:
        missing = ir_flag if ir_dir is None else vis_flag
        raise click.UsageError(f"{what} needs both {ir_flag} and {vis_flag}; {missing} is missing")


# --------------------------------------------------------------------------------------------------- run-time


def resolve_device(text: Optional[str]) -> Any:
    """``--device`` as a torch device (default CUDA when available); a device that cannot run is a usage error."""
    from ddfm_fast.api import default_device
    from ddfm_fast.plan import BackendError, check_device

    if text is None:
        return default_device()
    try:
        return check_device(text)
    except BackendError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc


def resolve_plan(run: RunConfig, device: Any) -> Any:
    """The execution plan of this run on ``device`` (None for EM only), printed once on stderr.

    A backend asked for explicitly that cannot run here (``BackendError``) is a one-line error.
    """
    from ddfm_fast.plan import BackendError, plan

    say = reporter()
    if run.sampler.prior == "none":
        say.info("plan: EM only (--prior none): no UNet step, so the accelerations do not apply")
        return None
    try:
        chosen = plan(device, run.accel)
    except BackendError as exc:
        raise click.ClickException(str(exc)) from exc
    say.info(f"plan: {chosen.describe()}")
    for warning in chosen.warnings:  # an acceleration asked for that is slower here: said on its own line
        say.warn(f"{warning}; the run goes on as asked (drop the flag, or see `ddfm-fast info`, for the faster "
                 "default)")
    return chosen


def report_fallbacks(plan: Any) -> None:
    """Say, at the end of a run, which fast paths the run gave up (the plan that ran records them)."""
    for fallback in [] if plan is None else plan.fallbacks:
        reporter().info(f"fell back: {fallback}")


def load_model(run: RunConfig, device: Any) -> Any:
    """The run's model on ``device`` (None for EM only), loaded strictly; the shipped prior is announced in one
    line. A missing or broken checkpoint is a one-line error naming the file."""
    if run.sampler.prior == "none":
        return None
    from ddfm_fast.api import DefaultPriorNotice, resolve_model
    from ddfm_fast.checkpoint import CheckpointError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DefaultPriorNotice)
            model = resolve_model(run.checkpoint, model_config=run.model_config, device=device)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    for w in caught:  # the notice about the shipped prior as one line; any other warning passed on as it was
        if issubclass(w.category, DefaultPriorNotice):
            reporter().info(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def bar_factory(enabled: Optional[bool]) -> Any:
    """A tqdm factory on stderr; ``None`` shows the bars only when stderr is a terminal; never with --quiet."""
    from tqdm.auto import tqdm

    if reporter().quiet:  # no bars, and the run's live lines wait for the final report (errors only)
        return _SilentBar
    return functools.partial(tqdm, file=sys.stderr, dynamic_ncols=True,
                             disable=None if enabled is None else not enabled)


class _SilentBar(NoBar):
    """The progress bar of ``--quiet``: shows nothing and writes nothing (failures are reported at the end)."""

    @staticmethod
    def write(s: str, file: Any = None) -> None:
        pass


# --------------------------------------------------------------------------------------------------- reporting


@dataclass
class Reporter:
    """What a command prints besides its errors: nothing with ``quiet``; with ``json_lines`` one JSON object a
    line on stdout (``{"event": "pair", ...}`` per pair, ``{"event": "end", ...}`` once, last)."""

    quiet: bool = False
    json_lines: bool = False
    ended: bool = False

    def info(self, text: str) -> None:
        if not self.quiet:
            click.echo(text, err=True)

    def warn(self, text: str) -> None:
        if not self.quiet:
            click.echo(f"warning: {text}", err=True)

    def error(self, text: str) -> None:
        click.echo(text, err=True)

    def event(self, obj: dict[str, Any]) -> None:
        """One JSON line on stdout (``--log-json``); ``{"event": "end"}`` only once."""
        if not self.json_lines or self.ended:
            return
        if obj.get("event") == "end":
            self.ended = True
        click.echo(json.dumps(obj, ensure_ascii=True, default=str))
        sys.stdout.flush()


_REPORTER_KEY = "ddfm_fast.reporter"


def reporter(ctx: Optional[click.Context] = None) -> Reporter:
    """The running command's :class:`Reporter` (a default one outside a command)."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is None:
        return Reporter()
    return ctx.meta.setdefault(_REPORTER_KEY, Reporter())  # meta is shared by a context and its parents


def _set_quiet(ctx: click.Context, _param: Any, value: bool) -> None:
    if value:
        reporter(ctx).quiet = True
        ctx.with_resource(warnings.catch_warnings())  # the filters are restored when the command ends
        warnings.simplefilter("ignore")  # run-time fallbacks are still in the summary and the JSON end line


def _set_json(ctx: click.Context, _param: Any, value: bool) -> None:
    if value:
        reporter(ctx).json_lines = True


LOG_OPTIONS: list[Spec] = [
    (("-q", "--quiet"), dict(is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
     help="Print nothing but errors (no plan, progress, notices or totals); the exit code tells the rest.")),
    (("--log-json",), dict(is_flag=True, expose_value=False, is_eager=True, callback=_set_json,
     help="One JSON object per line on stdout: one per pair ({\"event\": \"pair\", \"status\": "
          "\"done\"|\"skipped\"|\"failed\", ...}) and a final {\"event\": \"end\", \"exit_code\": ...}; "
          "for pipelines.")),
]


def log_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--quiet`` and ``--log-json`` to a command (they set the :class:`Reporter`; no argument is passed)."""
    for decls, attrs in reversed(LOG_OPTIONS):
        f = click.option(*decls, **attrs)(f)
    return f


# --------------------------------------------------------------------------------------------------- outputs and errors


def output_format(path: Path, kind: str, param_hint: str = "-o/--output", *, check: bool = True) -> str:
    """The output format ``path``'s extension asks for, checked against the output ``kind`` (unless not
    ``check``); a usage error naming the file and the choices otherwise (``-o fused.gif``, ``--raw -o x.jpg``).
    Commands with an output file (``eval -o``, ``compare -o``) can use it the same way."""
    from ddfm_fast import outputs

    try:
        fmt = outputs.format_of(path)
        if check:
            outputs.check_format(kind, fmt)
    except outputs.OutputFormatError as exc:
        raise click.BadParameter(str(exc), param_hint=param_hint) from None
    return fmt


FORMAT_OPTION: Spec = (("--format", "out_format"), dict(
    type=click.Choice(["png", "tif", "jpg", "bmp", "npy"]), default=None,
    help="File format of a folder run's outputs (default png; npy: the raw float luminance). One pair: the "
         "extension of -o chooses (.png, .tif/.tiff, .jpg/.jpeg, .bmp, .npy)."))
_FORMAT_NAMES = {"png": "png", "tif": "tiff", "jpg": "jpeg", "bmp": "bmp", "npy": "npy"}


def output_choice(single_out: Optional[Path], kind: str, folder_format: Optional[str], *,
                  raw_format_given: bool) -> tuple[str, str]:
    """``(output kind, file format)`` from the output flags and ``-o`` (one pair) or ``--format`` (folders).

    The format comes from the extension: ``-o fused.jpg`` writes JPEG, ``-o fused.tif --raw`` a 16-bit TIFF,
    ``-o fused.npy`` the raw float luminance (as ``--raw-format npy``). A kind the format cannot hold
    (``--raw -o x.jpg``, ``--color -o x.npy``), an unknown extension, and an explicit ``--raw-format`` that
    the extension contradicts are usage errors naming the file.
    """
    from ddfm_fast import outputs

    if single_out is not None:
        if folder_format is not None:
            raise click.UsageError("--format is for folder runs; for one pair the extension of -o chooses the format "
                                   "(.png, .tif, .jpg, .bmp or .npy)")
        fmt, hint = output_format(single_out, "gray" if kind == "npy" else kind, check=False), "-o/--output"
    else:
        fmt, hint = (_FORMAT_NAMES[folder_format] if folder_format else ("npy" if kind == "npy" else "png")), "--format"
    if fmt == "npy" and kind in ("gray", "png16") and not raw_format_given:
        kind = "npy"  # the extension (or --format npy) asks for the raw float output
    if kind == "npy" and fmt != "npy":
        where = f"{single_out}" if single_out is not None else f"--format {folder_format}"
        raise click.BadParameter(f"{where}: raw npy output (--raw-format npy) is written as .npy", param_hint=hint)
    try:
        outputs.check_format(kind, fmt)
    except outputs.OutputFormatError as exc:
        where = f"{single_out}: " if single_out is not None else ""
        raise click.BadParameter(f"{where}{exc}", param_hint=hint) from None
    return kind, fmt


def check_writable(path: Path, what: str = "-o/--output", *, folder: bool = False) -> None:
    """Fail now, before a model is loaded, when an output cannot be written at ``path``: it lies under a regular
    file, in a read-only or unwritable folder, or is a folder where a file is meant (or the reverse). One line
    naming the option and the path; missing folders are fine (they are created)."""
    from ddfm_fast import outputs

    problem = outputs.output_problem(path, folder=folder)
    if problem:
        raise click.ClickException(f"{what}: cannot write there: {problem}")


def check_not_input(dests: Iterable[Path], inputs: Iterable[Path], what: str) -> None:
    """Fail now, naming the option, when one of the files a command will write (``dests``) is one of the files
    it reads (``inputs``): :func:`ddfm_fast.outputs.replaced_input`."""
    from ddfm_fast import io, outputs

    hit = outputs.replaced_input(dests, inputs)
    if hit is not None:
        dest, src = hit
        also = "" if dest == src else f" ({io.display_name(src)})"
        raise click.BadParameter(f"{io.display_name(dest)} is one of the inputs{also}: it would be replaced; "
                                 "name another path", param_hint=what)


def one_line(exc: BaseException) -> str:
    """An exception as one line: an ``OSError`` as ``FILE: what went wrong``, anything else with its type."""
    from ddfm_fast import io

    if isinstance(exc, OSError):
        names = [io.display_name(n) for n in (exc.filename, exc.filename2) if n is not None]
        text = exc.strerror or str(exc) or type(exc).__name__
        return f"{' -> '.join(names)}: {text}" if names else text
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError); try a smaller --batch-size or smaller images"
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside it, a file-system error (a write that fails mid-run: disk full, folder gone, read-only) or a
    library's ``InputError`` / ``PairError`` ends the command with one line naming the file (exit 1), not a
    traceback; a ``ConfigError`` found late is a usage error naming the flag (exit 2). Use as ``with opts.one_line_errors():`` or the :func:`friendly_errors` decorator."""
    from ddfm_fast.pairing import InputError
    from ddfm_fast.runner import PairError

    try:
        yield
    except (InputError, PairError) as exc:
        raise click.ClickException(str(exc)) from exc
    except ConfigError as exc:  # found once the model is known (its default steps against --train-timesteps)
        raise usage_error(exc) from exc
    except OSError as exc:
        raise click.ClickException(one_line(exc)) from exc


def friendly_errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """A command decorator: :func:`one_line_errors` around the whole command."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with one_line_errors():
            return f(*args, **kwargs)

    return wrapper
