"""Checkpoint presets, strict loading and saving of the UNet prior.

``load_model`` turns a preset name or a weights file (``.pt``/``.pth`` state dict or ``.safetensors``)
plus an optional architecture config into a ready ``UNetModel`` (eval mode, no gradients).

Unlike the official ``create_model``, which prints the exception and goes on with random weights when
a checkpoint fails to load, every problem here raises ``CheckpointError`` naming the file and what
to do: a path that is not a readable file, a truncated or corrupt file, pickled Python objects (refused
unread: loading them would run code), config metadata with a field of the wrong type or out of bounds
(each field checked, :func:`resolve_config`), weights that do not fit the architecture or hold NaN.
The model is built on the meta device and the loaded tensors are assigned to it
(``load_state_dict(assign=True)``), so the 552.8 M-parameter ADM prior is never built twice. ``.pt`` files
are memory-mapped when their format allows it and used in place on the CPU (0.2 s for the 2.2 GB ADM
file, pages read on first use; the NaN check then reads every page once); safetensors weights sit at
unaligned offsets and are copied once on the CPU (see ``_CPU_ALIGNMENT``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from ddfm_fast.io import FileProblem, atomic_path, display_name, open_regular_file
from ddfm_fast.schedule import NUM_TRAIN_TIMESTEPS
from ddfm_fast.shrinkage import DEFAULT_CONTRAST as SHRINK_CONTRAST
from ddfm_fast.shrinkage import DEFAULT_STEPS as SHRINK_STEPS
from ddfm_fast.shrinkage import ShrinkagePrior
from ddfm_fast.unet import ADM256_UNCOND_ARGS, DDFM_SMALL_ARGS, UNetConfig, UNetModel

PathLike = Union[str, "os.PathLike[str]"]
ConfigLike = Union[None, UNetConfig, Mapping[str, Any], PathLike]

# safetensors metadata keys (all values are strings).
META_CONFIG = "ddfm_fast.config"  # json of UNetConfig.to_dict()
META_CREATE_MODEL_ARGS = "create_model_args"  # json of the official create_model keyword arguments
META_DEFAULT_STEPS = "default_steps"

_TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}
_MAX_LISTED = 5  # how many offending keys an error message lists
# torch's CPU allocator aligns to 64 bytes, and CPU conv/matmul kernels pick their code path by
# alignment. safetensors data sits at arbitrary 8-byte offsets of the mapped file: convolving with
# those weights gave the tiny UNet outputs 4.5e-6 away from the same weights loaded from .pt.
_CPU_ALIGNMENT = 64


class CheckpointError(ValueError):
    """A checkpoint or model config could not be turned into a model; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named set of weights: where to find the file and which architecture it holds."""

    name: str
    filename: str
    create_model_args: Mapping[str, Any]
    description: str
    url: str | None = None
    default_steps: int = 100
    sha256: str | None = None  # checked on load when known
    packaged: bool = False  # shipped inside the package (ddfm_fast/weights/), never looked up elsewhere
    analytic: bool = False  # a closed-form prior built in code (``ddfm_fast.shrinkage``): no file, no weights


# The shipped prior's own step count (also in its file's metadata, which load_model reads first).
DEFAULT_STEPS_SMALL = 20
PACKAGED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

PRESETS: dict[str, Preset] = {
    "adm256-uncond": Preset(
        name="adm256-uncond",
        filename="256x256_diffusion_uncond.pt",
        create_model_args=ADM256_UNCOND_ARGS,
        description="guided-diffusion 256x256 unconditional ImageNet ADM, the prior of the DDFM paper",
        url="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
    ),
    "ddfm-shrink": Preset(
        name="ddfm-shrink",
        filename="",
        create_model_args={},
        description="analytic shrinkage prior (no network, no weights: x0 = m + k abar_t (z - m), z = x_t / "
        f"sqrt(abar_t), m its mean, k = {SHRINK_CONTRAST:g}); with the EM step it fuses by per-pixel saliency in about a second on a CPU; "
        "see ddfm_fast/shrinkage.py. The shipped default",
        default_steps=SHRINK_STEPS,
        packaged=True,
        analytic=True,
    ),
    "ddfm-small": Preset(
        name="ddfm-small",
        filename="ddfm-small.safetensors",
        create_model_args=DDFM_SMALL_ARGS,
        description="small fully convolutional prior (1.7 M parameters) trained by ddfm-fast train-prior on "
        "RoadScene/MSRS/TNO training images; shipped with the package, for quick CPU fusion",
        default_steps=DEFAULT_STEPS_SMALL,
        packaged=True,
    ),
}
DEFAULT_PRESET = "adm256-uncond"


def weights_home() -> Path:
    """Folder searched for preset weights: ``$DDFM_FAST_HOME``, default ``~/.cache/ddfm-fast``."""
    return Path(os.environ.get("DDFM_FAST_HOME") or "~/.cache/ddfm-fast").expanduser()


def _preset_search_dirs() -> list[Path]:
    # The package folder is where small priors shipped with ddfm-fast live.
    return [weights_home(), PACKAGED_WEIGHTS_DIR]


def _unknown_preset(name: str) -> CheckpointError:
    known = ", ".join(sorted(PRESETS))
    return CheckpointError(
        f"'{name}' is neither an existing file nor a known preset (presets: {known}). "
        "Give the path of a .pt/.pth/.safetensors file or one of the preset names."
    )


def resolve_preset(name: str) -> Path:
    """The local file of preset ``name``; raises ``CheckpointError`` saying where to put it if absent."""
    if name not in PRESETS:
        raise _unknown_preset(name)
    preset = PRESETS[name]
    if preset.analytic:
        raise CheckpointError(f"preset '{name}' is built into ddfm-fast and has no file; load it with "
                              f"load_model('{name}')")
    if preset.packaged:
        candidate = PACKAGED_WEIGHTS_DIR / preset.filename
        if candidate.is_file():
            return candidate
        raise CheckpointError(
            f"preset '{name}' is shipped with ddfm-fast as {candidate}, but that file is missing: the package was "
            "installed without its package data. Reinstall ddfm-fast (pip install --force-reinstall ddfm-fast)."
        )
    dirs = _preset_search_dirs()
    for folder in dirs:
        candidate = folder / preset.filename
        if candidate.is_file():
            return candidate
    target = dirs[0] / preset.filename
    how = ""
    if preset.url:
        how = f" Download it from {preset.url}, e.g.\n  curl -L --create-dirs -o {target} {preset.url}"
    raise CheckpointError(
        f"preset '{name}' needs the weights file {preset.filename}, which was not found in "
        f"{', '.join(str(d) for d in dirs)}. Put it at {target} (set DDFM_FAST_HOME to use another "
        f"folder) or pass the file's path instead of the preset name.{how}"
    )


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or Path(text).suffix.lower() in _TORCH_SUFFIXES | {".safetensors"}


# ---------------------------------------------------------------------------------------------
# Reading weights
# ---------------------------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    if path.suffix.lower() in _TORCH_SUFFIXES:
        return False
    # Unknown suffix: a safetensors file starts with an 8-byte header length and then a JSON '{'.
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


# Lines of torch.load's error text that are torch's advice, not the reason: among them the suggestion to load the
# file with the weights-only check switched off, which would run whatever code the file holds.
_TORCH_ADVICE = re.compile(r"weights.only|Weights only load failed|file an issue|Check the documentation|"
                           r"safe_globals|allowlist|trusted source", re.IGNORECASE)


def _load_error_reason(exc: BaseException) -> str:
    """The informative part of a torch.load error on one line, without torch's advice."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _TORCH_ADVICE.search(line)]
    reason = " ".join(lines)
    if len(reason) > 200:
        reason = reason[:197] + "..."
    return reason or type(exc).__name__ + " (unexpected end of file)"


# A plain state dict pickles only these: tensors rebuilt by torch, an OrderedDict, and byte strings.
_PLAIN_GLOBALS = re.compile(r"(torch|collections|_codecs)\.")
_PICKLE_OPCODES_WITH_GLOBALS = ("GLOBAL", "INST")


def _pickled_globals(path: Path, exc: BaseException) -> list[str]:
    """The Python callables and classes a refused pickle would import (empty when it names none we can see).

    Found without unpickling anything: torch's own static scan for its zip format, else the name its unpickler
    gave when it refused the file, else (a plain pickle, not a torch.save file) a scan of the pickle's opcodes.
    """
    if zipfile.is_zipfile(path):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # a broken archive: fall through to what torch.load said
            pass
    named = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    if named:
        return sorted(set(named))
    return [g for g in _scan_pickle_globals(path) if not _PLAIN_GLOBALS.match(g)]


_PUT_OPS = ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT")
_GET_OPS = ("GET", "BINGET", "LONG_BINGET")


def _scan_pickle_globals(path: Path, limit: int = 1 << 24) -> list[str]:
    """Globals named by the pickles at the start of ``path`` (a legacy torch.save file holds several in a row).

    ``pickletools.genops`` only decodes opcodes; nothing is imported or called. STACK_GLOBAL takes its module and
    name from the two strings pushed last, which this tracks (strings fetched from the memo included).
    """
    import pickletools

    found: list[str] = []
    try:
        with path.open("rb") as fh:
            for _ in range(6):  # magic number, protocol, system info, the object, storage keys (legacy format)
                strings: list[str] = []
                memo: dict[int, str] = {}
                memo_next = 0
                top: str | None = None  # the string the previous opcode left on top of the stack, if any
                for op, arg, _pos in pickletools.genops(fh):
                    if fh.tell() > limit:
                        return found
                    pushed: str | None = None
                    if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                        found.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif "UNICODE" in op.name and isinstance(arg, str):
                        pushed = arg
                        strings.append(arg)
                    elif op.name in _PUT_OPS:
                        index = memo_next if op.name == "MEMOIZE" else int(arg)
                        memo_next += op.name == "MEMOIZE"
                        if top is not None:
                            memo[index] = top
                        pushed = top  # storing in the memo leaves the stack as it was
                    elif op.name in _GET_OPS and int(arg) in memo:
                        pushed = memo[int(arg)]
                        strings.append(pushed)
                    top = pushed
    except Exception:  # the end of the pickles (raw storage bytes follow in a legacy file), or garbage
        pass
    return found


def _is_plain_pickle(path: Path) -> bool:
    """A pickle written by ``pickle.dump``, not ``torch.save``: its legacy format starts with the pickled magic
    number (protocol 2, a LONG1 opcode), its zip format is a zip archive."""
    with path.open("rb") as fh:
        head = fh.read(3)
    return head[:1] == b"\x80" and head != b"\x80\x02\x8a" and not zipfile.is_zipfile(path)


def _refused_pickle(path: Path, names: list[str]) -> CheckpointError:
    more = len(names) - _MAX_LISTED
    shown = ", ".join(names[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")
    return CheckpointError(
        f"{display_name(path)}: holds pickled Python objects ({shown}), refused for safety: loading it would run "
        "code from the file, and ddfm-fast loads only plain weights. Convert it with a program you trust, where the "
        "file was made: re-save only the weights, torch.save(model.state_dict(), 'weights.pt') or "
        "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'); for the paper's model, "
        "`ddfm-fast download --safetensors` fetches the official plain-weights file and writes a .safetensors copy."
    )


def _read_torch(path: Path) -> Any:
    # Memory-map zip-format files (torch >= 1.6 default) so the weights are paged in, not copied.
    # The legacy (pre-zip) format cannot be mapped. weights_only=True never unpickles code.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
        names = _pickled_globals(path, exc)
        if names:
            raise _refused_pickle(path, names) from exc
        if _is_plain_pickle(path):
            raise CheckpointError(
                f"{display_name(path)}: is a plain Python pickle (pickle.dump), not a PyTorch checkpoint, and "
                f"ddfm-fast does not unpickle it ({_load_error_reason(exc)}). Re-save the weights with "
                "torch.save(state_dict, 'weights.pt') or as .safetensors."
            ) from exc
        raise CheckpointError(
            f"{display_name(path)}: cannot read this PyTorch checkpoint; the file is truncated or corrupt "
            f"({_load_error_reason(exc)}). Download or copy it again."
        ) from exc


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept ``dict[str, Tensor]``, or a dict holding one under ``state_dict`` or ``model``."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{display_name(path)}: expected a state dict (a dict of parameter name -> tensor), "
            f"found {type(obj).__name__}."
        )
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad or not obj:
        detail = (
            "it is empty"
            if not obj
            else f"{len(bad)} entries are not tensors, e.g. "
            + ", ".join(f"{k!r} ({type(obj[k]).__name__})" for k in bad[:_MAX_LISTED])
        )
        raise CheckpointError(
            f"{display_name(path)}: not a state dict of tensors: {detail}. Expected parameter name -> tensor."
        )
    return dict(obj)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open  # imported here: only needed for this format

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # SafetensorError, OSError, ... with the parser's reason
        raise CheckpointError(
            f"{display_name(path)}: cannot read this safetensors file; it is truncated or corrupt "
            f"({' '.join(str(exc).split())}). "
            "Download or copy it again."
        ) from exc
    if not tensors:
        raise CheckpointError(f"{display_name(path)}: the safetensors file holds no tensors.")
    return tensors, metadata


def _check_file(path: Path) -> None:
    """A readable, non-empty regular file, or a CheckpointError saying what the path is instead."""
    try:
        with open_regular_file(path):
            pass
    except FileProblem as exc:
        name = display_name(path)
        if exc.reason == "no such file":
            raise CheckpointError(f"{name}: no such file (checkpoint not found). Check the path.") from None
        if exc.reason.startswith("is empty"):
            raise CheckpointError(f"{name}: {exc.reason}; the file is truncated or corrupt. Download or copy it "
                                  "again.") from None
        raise CheckpointError(f"{name}: {exc.reason}; give the path of a .pt/.pth/.safetensors checkpoint.") from None


def read_checkpoint(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file into ``(state_dict, metadata)``; metadata is empty for ``.pt`` files."""
    path = Path(path).expanduser()
    _check_file(path)
    try:
        safetensors = _is_safetensors(path)
    except OSError as exc:  # it changed since it was checked
        raise CheckpointError(f"{display_name(path)}: cannot be read ({exc.strerror or exc}).") from exc
    if safetensors:
        return _read_safetensors(path)
    return _as_state_dict(_read_torch(path), path), {}


def _check_finite(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or infinity: such a model fuses every image to black (its output is NaN).

    One min/max reduction per tensor, where a NaN or an infinity shows: 0.04 s per 100 M float32 values on one
    core of the 2-core dev CPU, so about 0.2 s for the paper's 552.8 M parameters; 10-40 ms for ddfm-small.
    """
    bad = []
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.numel():
            lo, hi = torch.aminmax(tensor.detach().reshape(-1))
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                bad.append(key)
    if bad:
        raise CheckpointError(
            f"{display_name(path)}: {len(bad)} tensor(s) hold NaN or infinite values, first: "
            f"{', '.join(bad[:_MAX_LISTED])}; the file is damaged or its training diverged. Download or copy it "
            "again, or use an earlier checkpoint."
        )


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise CheckpointError(
            f"{display_name(path)}: sha256 {digest.hexdigest()} differs from the expected {expected}; "
            "the file is damaged or is not the preset's file. Download it again."
        )


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

# Bounds on each config field. Generous, far beyond any UNet a fusion prior uses (the paper's ADM: 256 channels,
# 6 levels, 2 ResBlocks a level); their job is to turn a corrupt or hostile config into an error naming the field,
# before it reaches torch as a zero-sized or astronomically large layer.
_MAX_CHANNELS = 4096  # model_channels / num_channels
_MAX_LEVEL_CHANNELS = 16384  # channel_mult x model_channels at any level
_MAX_LEVELS = 10  # entries of channel_mult (the deepest level is downsampled 2**9 = 512 times)
_MAX_MULT = 64
_MAX_RES_BLOCKS = 32
_MAX_IMAGE_SIZE = 8192
_MAX_HEADS = 1024
_MAX_GROUPS = 1024
_MAX_ATTENTION_ENTRIES = 16
_MAX_CONFIG_TEXT = 1 << 16  # bytes of JSON/YAML a config may take (the ADM config takes 450)
_MAX_DEFAULT_STEPS = NUM_TRAIN_TIMESTEPS  # a respacing keeps at most every training timestep


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _FieldError(ValueError):
    """A config field that is wrong; turned into a CheckpointError naming the source and the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field '{field}' {problem}")


def _int_field(d: Mapping[str, Any], key: str, lo: int, hi: int, *, minus_one: bool = False) -> int:
    value = d[key]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]{1,12}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError(key, f"must be a whole number, got {_show(value)} ({_kind(value)})")
    if minus_one and value == -1:
        return value
    if not lo <= value <= hi:
        also = " (or -1)" if minus_one else ""
        raise _FieldError(key, f"must be between {lo} and {hi}{also}, got {value}")
    return value


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _bool_field(d: Mapping[str, Any], key: str) -> bool:
    value = d[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _FieldError(key, f"must be true or false, got {_show(value)} ({_kind(value)})")


def _float_field(d: Mapping[str, Any], key: str, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    value = d[key]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _FieldError(key, f"must be a number, got {_show(value)} ({_kind(value)})")
    value = float(value)
    low_ok = value > lo if lo_open else value >= lo
    high_ok = value < hi if hi_open else value <= hi
    if not (math.isfinite(value) and low_ok and high_ok):
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise _FieldError(key, f"must be in {span}, got {_show(value)}")
    return value


def _list_field(d: Mapping[str, Any], key: str, max_len: int, *, comma_string: bool) -> list[Any]:
    """A list of scalars: a JSON/YAML list, one number, or (official create_model style) "a,b,c"."""
    value = d[key]
    if isinstance(value, str) and comma_string:
        items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    else:
        want = "a list or a comma-separated string" if comma_string else "a list"
        raise _FieldError(key, f"must be {want} of numbers, got {_show(value)} ({_kind(value)})")
    if len(items) > max_len:
        raise _FieldError(key, f"has {len(items)} entries, more than {max_len}")
    return items


def _mult_field(d: Mapping[str, Any], key: str, *, comma_string: bool) -> list[float]:
    items = _list_field(d, key, _MAX_LEVELS, comma_string=comma_string)
    if not items:
        raise _FieldError(key, "is empty; it needs one multiplier per resolution level, e.g. [1, 2, 4]")
    out = []
    for item in items:
        try:
            m = float(item) if isinstance(item, (str, int, float)) and not isinstance(item, bool) else math.nan
        except ValueError:
            m = math.nan
        if not (math.isfinite(m) and 0 < m <= _MAX_MULT):
            raise _FieldError(key, f"entries must be numbers in (0, {_MAX_MULT}], got {_show(item)}")
        out.append(int(m) if m.is_integer() else m)
    return out


def _int_list_field(d: Mapping[str, Any], key: str, lo: int, hi: int, *, comma_string: bool) -> list[int]:
    items = _list_field(d, key, _MAX_ATTENTION_ENTRIES, comma_string=comma_string)
    return [_int_field({key: item}, key, lo, hi) for item in items]


# Official create_model arguments and our extensions: field -> check.
_CREATE_MODEL_CHECKS = {
    "image_size": lambda d, k: _int_field(d, k, 1, _MAX_IMAGE_SIZE),
    "num_channels": lambda d, k: _int_field(d, k, 1, _MAX_CHANNELS),
    "num_res_blocks": lambda d, k: _int_field(d, k, 1, _MAX_RES_BLOCKS),
    "num_heads": lambda d, k: _int_field(d, k, 1, _MAX_HEADS),
    "num_head_channels": lambda d, k: _int_field(d, k, 1, _MAX_LEVEL_CHANNELS, minus_one=True),
    "num_heads_upsample": lambda d, k: _int_field(d, k, 1, _MAX_HEADS, minus_one=True),
    "dropout": lambda d, k: _float_field(d, k, 0.0, 1.0, lo_open=False, hi_open=True),
    "norm_groups": lambda d, k: _int_field(d, k, 1, _MAX_GROUPS),
    **{k: (lambda d, k: _bool_field(d, k)) for k in (
        "learn_sigma", "class_cond", "use_checkpoint", "use_scale_shift_norm", "resblock_updown", "use_fp16",
        "use_new_attention_order", "middle_attention")},
}

# UNetConfig.to_dict() fields (what ddfm-fast writes into a safetensors file's metadata): field -> check.
_UNET_CONFIG_CHECKS = {
    "image_size": _CREATE_MODEL_CHECKS["image_size"],
    "model_channels": lambda d, k: _int_field(d, k, 1, _MAX_CHANNELS),
    "num_res_blocks": _CREATE_MODEL_CHECKS["num_res_blocks"],
    "channel_mult": lambda d, k: _mult_field(d, k, comma_string=False),
    # downsample rates (1 = full resolution) at which attention runs
    "attention_resolutions": lambda d, k: _int_list_field(d, k, 1, 1 << 16, comma_string=False),
    "in_channels": lambda d, k: _int_field(d, k, 3, 3),  # DDFM samples RGB images
    "out_channels": lambda d, k: _out_channels(d, k),
    "num_heads": _CREATE_MODEL_CHECKS["num_heads"],
    "num_head_channels": _CREATE_MODEL_CHECKS["num_head_channels"],
    "num_heads_upsample": _CREATE_MODEL_CHECKS["num_heads_upsample"],
    "dropout": _CREATE_MODEL_CHECKS["dropout"],
    "norm_groups": _CREATE_MODEL_CHECKS["norm_groups"],
    "norm_eps": lambda d, k: _float_field(d, k, 0.0, 1.0, lo_open=True, hi_open=False),
    **{k: (lambda d, k: _bool_field(d, k)) for k in (
        "use_scale_shift_norm", "resblock_updown", "conv_resample", "use_checkpoint", "use_fp16",
        "middle_attention")},
}


def _out_channels(d: Mapping[str, Any], key: str) -> int:
    value = _int_field(d, key, 1, 64)
    if value not in (3, 6):
        raise _FieldError(key, f"must be 3 (epsilon) or 6 (epsilon and variance, learn_sigma), got {value}")
    return value


def _checked_fields(d: Mapping[str, Any], checks: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` with every known field checked and normalised; unknown fields are left for UNetConfig to name."""
    out = dict(d)
    for key, check in checks.items():
        if key in d:
            out[key] = check(d, key)
    return out


def _check_create_model_args(d: Mapping[str, Any]) -> dict[str, Any]:
    out = _checked_fields(d, _CREATE_MODEL_CHECKS)
    if "model_path" in out and not isinstance(out["model_path"], (str, type(None))):
        raise _FieldError("model_path", f"must be a string, got {_kind(out['model_path'])}")
    if out.get("channel_mult", "") not in ("", None):
        out["channel_mult"] = _mult_field(out, "channel_mult", comma_string=True)
    if "attention_resolutions" in out:
        # Pixel sizes here ("32,16,8" at image_size 256); create_model turns them into downsample rates.
        size = out.get("image_size", _MAX_IMAGE_SIZE)
        hi = size if isinstance(size, int) else _MAX_IMAGE_SIZE
        out["attention_resolutions"] = _int_list_field(out, "attention_resolutions", 1, hi, comma_string=True)
    return out


def _check_architecture(config: UNetConfig) -> None:
    """What UNetConfig leaves unchecked and torch would hit later: layers without channels, or attention heads
    that do not divide their channels (a reshape error in the first forward pass)."""
    ds = 1
    for level, mult in enumerate(config.channel_mult):
        channels = int(mult * config.model_channels)
        if not 1 <= channels <= _MAX_LEVEL_CHANNELS:
            raise _FieldError("channel_mult", f"level {level}: {mult} x {config.model_channels} channels gives "
                              f"{channels}, outside 1..{_MAX_LEVEL_CHANNELS}")
        attention = ds in config.attention_resolutions
        if level == len(config.channel_mult) - 1 and config.middle_attention:
            attention = True
        for upsample in (False, True):
            heads = config.heads_for(channels, upsample=upsample)
            if attention and (heads < 1 or channels % heads):
                field = "num_head_channels" if config.num_head_channels != -1 else (
                    "num_heads_upsample" if upsample and config.num_heads_upsample != -1 else "num_heads")
                raise _FieldError(field, f"gives {heads} attention heads for the {channels} channels of level "
                                  f"{level}, which they do not divide")
        ds *= 2


def _config_from_mapping(d: Any) -> UNetConfig:
    """A mapping is either UNetConfig.to_dict() output or official create_model arguments; every field is checked
    against its type and bounds (raises ``_FieldError``, ``ValueError`` or ``TypeError`` naming the field)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"expected a mapping of model config fields (a JSON object), found {_kind(d)}")
    not_text = [k for k in d if not isinstance(k, str)]
    if not_text:
        raise ValueError(f"field names must be strings, found {_show(not_text[0])}")
    if "model_channels" in d:
        config = UNetConfig.from_dict(_checked_fields(d, _UNET_CONFIG_CHECKS))
    else:
        args = _check_create_model_args(d)
        config = UNetConfig.from_create_model_args({k: v for k, v in args.items() if k != "model_path"})
    _check_architecture(config)
    return config


def _parse_config_text(text: str, source: str, *, yaml_too: bool) -> Any:
    """JSON (or YAML, a superset) text of a config; size and nesting bounded, every failure a CheckpointError."""
    if len(text) > _MAX_CONFIG_TEXT:
        raise CheckpointError(f"{source}: {len(text)} characters, far more than a model config takes "
                              f"(at most {_MAX_CONFIG_TEXT}); refused.")
    if not yaml_too:
        try:
            return json.loads(text)
        except RecursionError:
            raise CheckpointError(f"{source}: nested too deeply to be a model config.") from None
        except ValueError as exc:  # JSONDecodeError, or an integer literal with thousands of digits
            raise CheckpointError(f"{source}: not valid JSON ({exc}).") from exc
    try:
        import yaml
    except ImportError as exc:
        raise CheckpointError(
            f"{source}: reading YAML needs PyYAML (pip install pyyaml); or use a .json file."
        ) from exc
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise CheckpointError(f"{source}: nested too deeply to be a model config.") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise CheckpointError(f"{source}: not valid YAML ({' '.join(str(exc).split())}).") from exc


def _read_config_file(path: Path) -> Any:
    source = f"model config {display_name(path)}"
    try:
        with open_regular_file(path) as fh:
            raw = fh.read(_MAX_CONFIG_TEXT + 1)
    except FileProblem as exc:
        raise CheckpointError(f"{source}: {exc.reason}.") from None
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot read the file ({exc.strerror or exc}).") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{source}: not UTF-8 text ({exc}).") from exc
    return _parse_config_text(text, source, yaml_too=path.suffix.lower() != ".json")


def _from_mapping(data: Any, source: str) -> UNetConfig:
    try:
        return _config_from_mapping(data)
    except (ValueError, TypeError, NotImplementedError) as exc:  # _FieldError is a ValueError
        raise CheckpointError(f"{source}: {exc}.") from exc


def resolve_config(config: ConfigLike) -> tuple[UNetConfig, str]:
    """Turn ``config`` (UNetConfig, dict of create_model args, or a JSON/YAML file) into a UNetConfig.

    Every field is checked against its type and bounds. Returns the config and a short description of its source
    for error messages.
    """
    if isinstance(config, UNetConfig):
        return config, "the given UNetConfig"
    if isinstance(config, Mapping):
        source = "the given config dict"
        data: Any = config
    elif isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser()
        source = f"model config {display_name(path)}"
        data = _read_config_file(path)
    else:
        raise CheckpointError(
            f"config must be a dict, a UNetConfig or a file path, not {type(config).__name__}."
        )
    return _from_mapping(data, source), source


def _config_from_metadata(metadata: Mapping[str, str], path: Path) -> tuple[UNetConfig, str] | None:
    for key in (META_CONFIG, META_CREATE_MODEL_ARGS):
        if key in metadata:
            source = f"the '{key}' metadata of {display_name(path)}"
            data = _parse_config_text(metadata[key], source, yaml_too=False)
            return _from_mapping(data, source), source
    return None


# ---------------------------------------------------------------------------------------------
# Matching weights to the architecture
# ---------------------------------------------------------------------------------------------


def _mismatch_report(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> list[str]:
    """Human-readable lines for missing keys, unexpected keys, shape and dtype problems (empty if fine)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        (k, tuple(found[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in found and found[k].shape != expected[k].shape
    ]
    not_float = [k for k in expected if k in found and not found[k].is_floating_point()]
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing key(s), first: {', '.join(missing[:_MAX_LISTED])}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s), first: {', '.join(unexpected[:_MAX_LISTED])}")
    if shapes:
        shown = "; ".join(f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in shapes[:_MAX_LISTED])
        lines.append(f"{len(shapes)} shape mismatch(es), first: {shown}")
    if not_float:
        shown = ", ".join(f"{k} ({found[k].dtype})" for k in not_float[:_MAX_LISTED])
        lines.append(f"{len(not_float)} tensor(s) are not floating point: {shown}")
    return lines


def _describe(config: UNetConfig) -> str:
    return (
        f"image_size={config.image_size}, num_channels={config.model_channels}, "
        f"num_res_blocks={config.num_res_blocks}, channel_mult={list(config.channel_mult)}, "
        f"attention_ds={list(config.attention_resolutions)}, out_channels={config.out_channels}"
    )


def _check_fits(
    model: UNetModel, state_dict: Mapping[str, torch.Tensor], path: Path, config_source: str
) -> None:
    problems = _mismatch_report(model.state_dict(), state_dict)
    if not problems:
        return
    details = "\n  ".join(problems)
    raise CheckpointError(
        f"{display_name(path)}: the weights do not match the model config ({config_source}: "
        f"{_describe(model.config)}):\n  {details}\n"
        "If the weights are for another architecture, give its create_model arguments with "
        "--model-config (a JSON/YAML file like configs/model_config_imagenet.yaml) or config=...; "
        "if the config is right, the file is incomplete or not a UNet checkpoint."
    )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _locate(checkpoint: PathLike) -> tuple[Path, Preset | None]:
    """A preset name (its local file) or a path; a bare word that is neither is an unknown preset."""
    text = os.fspath(checkpoint)
    if isinstance(checkpoint, str) and text in PRESETS:
        return resolve_preset(text), PRESETS[text]
    if isinstance(checkpoint, str) and not _looks_like_path(text) and not Path(text).exists():
        raise _unknown_preset(text)
    return Path(text).expanduser(), None


def _choose_config(
    config: ConfigLike, metadata: Mapping[str, str], path: Path, preset: Preset | None
) -> tuple[UNetConfig, str]:
    """The architecture, in order: ``config``; the file's metadata; the preset; else adm256-uncond."""
    if config is not None:
        return resolve_config(config)
    from_metadata = _config_from_metadata(metadata, path)
    if from_metadata is not None:
        return from_metadata
    base = preset or PRESETS[DEFAULT_PRESET]
    source = f"preset '{base.name}'" + ("" if preset else " (assumed: no config was given)")
    return UNetConfig.from_create_model_args(base.create_model_args), source


def _default_steps(metadata: Mapping[str, str], path: Path, preset: Preset | None) -> int:
    if META_DEFAULT_STEPS in metadata:
        text = metadata[META_DEFAULT_STEPS]
        if not re.fullmatch(r"\s*[0-9]{1,9}\s*", text):
            raise CheckpointError(
                f"{display_name(path)}: metadata field '{META_DEFAULT_STEPS}' = {_show(text)} is not a whole number."
            )
        steps = int(text)
        if not 1 <= steps <= _MAX_DEFAULT_STEPS:
            raise CheckpointError(
                f"{display_name(path)}: metadata field '{META_DEFAULT_STEPS}' = {steps} is outside "
                f"1..{_MAX_DEFAULT_STEPS} (a DDIM respacing keeps at most the {NUM_TRAIN_TIMESTEPS} training "
                "timesteps)."
            )
        return steps
    return (preset or PRESETS[DEFAULT_PRESET]).default_steps


def load_model(
    checkpoint: PathLike,
    *,
    config: ConfigLike = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Build the UNet for ``checkpoint`` (a preset name or a weights file) and load it strictly.

    The architecture comes from, in order: ``config`` (create_model args dict, UNetConfig, or a
    JSON/YAML file); the safetensors metadata (``ddfm_fast.config`` or ``create_model_args``); the
    preset; else the paper's adm256-uncond. Returns the model in eval mode, ``requires_grad=False``,
    on ``device`` in ``dtype``. Raises ``CheckpointError`` for every problem, never falling back to
    random weights. An analytic preset (``ddfm-shrink``) is built from code: a
    :class:`~ddfm_fast.shrinkage.ShrinkagePrior`, which takes no ``config``. A ``device`` that cannot run here
    is a :class:`~ddfm_fast.plan.BackendError` and a ``dtype`` that is not a floating torch dtype a
    ``TypeError``, both before the file is read.
    """
    from ddfm_fast.plan import check_device

    device = check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype (torch.float32, torch.float16, torch.bfloat16), "
                        f"got {dtype!r}")
    if isinstance(checkpoint, str) and checkpoint in PRESETS and PRESETS[checkpoint].analytic:
        if config is not None:
            raise CheckpointError(f"preset '{checkpoint}' is analytic (no network) and takes no model config")
        return ShrinkagePrior().to(device=device, dtype=dtype).eval()
    path, preset = _locate(checkpoint)
    state_dict, metadata = read_checkpoint(path)
    if preset is not None and preset.sha256:
        _check_sha256(path, preset.sha256)
    unet_config, source = _choose_config(config, metadata, path, preset)

    # Built on meta and filled by assignment: no random init, and no second copy of the weights.
    with torch.device("meta"):
        model = UNetModel(unet_config, default_steps=_default_steps(metadata, path, preset))
    _check_fits(model, state_dict, path, source)
    _check_finite(state_dict, path)
    model.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(
            f"{display_name(path)}: no weights were loaded for {', '.join(still_meta[:_MAX_LISTED])}."
        )
    model.to(device=device, dtype=dtype)
    _align_cpu_parameters(model)
    model.requires_grad_(False)
    return model.eval()


def _align_cpu_parameters(model: torch.nn.Module) -> None:
    """Copy CPU parameters that are not 64-byte aligned, so results do not depend on the file format."""
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu" and param.data_ptr() % _CPU_ALIGNMENT:
                param.data = param.data.clone(memory_format=torch.contiguous_format)


def _metadata_strings(model: UNetModel, extra: Mapping[str, Any] | None) -> dict[str, str]:
    metadata = {
        "format": "pt",
        META_CONFIG: json.dumps(model.config.to_dict()),
        META_DEFAULT_STEPS: str(int(model.default_steps)),
    }
    for key, value in (extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def save_safetensors(
    model: UNetModel, path: PathLike, *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write the model's weights and config (``ddfm_fast.config`` metadata) to ``path`` atomically.

    Extra ``metadata`` values that are not strings are stored as JSON. The file is written to a
    temporary name in the same folder and renamed, so a crash never leaves a half-written checkpoint.
    """
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:  # the permissions any new file gets, not mkstemp's 0600
        save_file(tensors, str(tmp), metadata=_metadata_strings(model, metadata))
    return path
