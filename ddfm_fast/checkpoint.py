"""Checkpoint presets, strict loading and saving of the UNet prior.

``load_model`` turns a preset name or a weights file (``.pt``/``.pth`` state dict or ``.safetensors``)
plus an optional architecture config into a ready ``UNetModel`` (eval mode, no gradients).

Unlike the official ``create_model``, which prints the exception and goes on with random weights when
a checkpoint fails to load (README §6.5), every problem here raises ``CheckpointError`` naming the
file and what to do. The model is built on the meta device and the loaded tensors are assigned to it
(``load_state_dict(assign=True)``), so the 552.8 M-parameter ADM prior is never built twice.
``.pt`` files are memory-mapped when their format allows it and used in place on the CPU (0.2 s for
the 2.2 GB ADM file, pages read on first use); safetensors weights sit at unaligned offsets and are
copied once on the CPU (see ``_CPU_ALIGNMENT``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

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


def _load_error_reason(exc: BaseException) -> str:
    """The informative part of a torch.load error (its messages are long and generic)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__ + " (unexpected end of file)"


def _read_torch(path: Path) -> Any:
    # Memory-map zip-format files (torch >= 1.6 default) so the weights are paged in, not copied.
    # The legacy (pre-zip) format cannot be mapped. weights_only=True never unpickles code.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
        reason = _load_error_reason(exc)
        if "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: the file holds pickled Python objects other than tensors ({reason}); "
                "ddfm-fast only loads plain state dicts and never runs pickled code. Re-save the "
                "weights as a dict of tensors (torch.save(model.state_dict(), ...)) or as .safetensors."
            ) from exc
        raise CheckpointError(
            f"{path}: cannot read this PyTorch checkpoint; the file is truncated or corrupt ({reason}). "
            "Download or copy it again."
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
            f"{path}: expected a state dict (a dict of parameter name -> tensor), found {type(obj).__name__}."
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
            f"{path}: not a state dict of tensors: {detail}. Expected parameter name -> tensor."
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
            f"{path}: cannot read this safetensors file; it is truncated or corrupt ({exc}). "
            "Download or copy it again."
        ) from exc
    if not tensors:
        raise CheckpointError(f"{path}: the safetensors file holds no tensors.")
    return tensors, metadata


def read_checkpoint(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file into ``(state_dict, metadata)``; metadata is empty for ``.pt`` files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file (checkpoint not found). Check the path.")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file; give the path of a .pt/.pth/.safetensors checkpoint.")
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _as_state_dict(_read_torch(path), path), {}


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise CheckpointError(
            f"{path}: sha256 {digest.hexdigest()} differs from the expected {expected}; "
            "the file is damaged or is not the preset's file. Download it again."
        )


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def _config_from_mapping(d: Mapping[str, Any]) -> UNetConfig:
    """A mapping is either UNetConfig.to_dict() output or official create_model arguments."""
    if "model_channels" in d:
        return UNetConfig.from_dict(d)
    return UNetConfig.from_create_model_args({k: v for k, v in d.items() if k != "model_path"})


def _read_config_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"model config {path}: no such file.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"model config {path}: cannot read the file ({exc}).") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"model config {path}: not valid JSON ({exc}).") from exc
    else:  # YAML is a superset of JSON, so this reads both
        try:
            import yaml
        except ImportError as exc:
            raise CheckpointError(
                f"model config {path}: reading YAML needs PyYAML (pip install pyyaml); or use a .json file."
            ) from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CheckpointError(f"model config {path}: not valid YAML ({exc}).") from exc
    if not isinstance(data, Mapping):
        raise CheckpointError(
            f"model config {path}: expected a mapping of create_model arguments, found {type(data).__name__}."
        )
    return data


def resolve_config(config: ConfigLike) -> tuple[UNetConfig, str]:
    """Turn ``config`` (UNetConfig, dict of create_model args, or a JSON/YAML file) into a UNetConfig.

    Returns the config and a short description of its source for error messages.
    """
    if isinstance(config, UNetConfig):
        return config, "the given UNetConfig"
    if isinstance(config, Mapping):
        source = "the given config dict"
        data: Mapping[str, Any] = config
    elif isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser()
        source = f"model config {path}"
        data = _read_config_file(path)
    else:
        raise CheckpointError(
            f"config must be a dict, a UNetConfig or a file path, not {type(config).__name__}."
        )
    try:
        return _config_from_mapping(data), source
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def _config_from_metadata(metadata: Mapping[str, str], path: Path) -> tuple[UNetConfig, str] | None:
    for key in (META_CONFIG, META_CREATE_MODEL_ARGS):
        if key in metadata:
            source = f"the '{key}' metadata of {path}"
            try:
                return _config_from_mapping(json.loads(metadata[key])), source
            except (ValueError, TypeError, NotImplementedError) as exc:
                raise CheckpointError(f"{source} is not a valid model config: {exc}") from exc
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
        f"{path}: the weights do not match the model config ({config_source}: "
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
        try:
            return int(metadata[META_DEFAULT_STEPS])
        except ValueError as exc:
            raise CheckpointError(
                f"{path}: metadata default_steps={metadata[META_DEFAULT_STEPS]!r} is not an integer."
            ) from exc
    return (preset or PRESETS[DEFAULT_PRESET]).default_steps


def load_model(
    checkpoint: PathLike,
    *,
    config: ConfigLike = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNetModel:
    """Build the UNet for ``checkpoint`` (a preset name or a weights file) and load it strictly.

    The architecture comes from, in order: ``config`` (create_model args dict, UNetConfig, or a
    JSON/YAML file); the safetensors metadata (``ddfm_fast.config`` or ``create_model_args``); the
    preset; else the paper's adm256-uncond. Returns the model in eval mode, ``requires_grad=False``,
    on ``device`` in ``dtype``. Raises ``CheckpointError`` for every problem, never falling back to
    random weights.
    """
    path, preset = _locate(checkpoint)
    state_dict, metadata = read_checkpoint(path)
    if preset is not None and preset.sha256:
        _check_sha256(path, preset.sha256)
    unet_config, source = _choose_config(config, metadata, path, preset)

    # Built on meta and filled by assignment: no random init, and no second copy of the weights.
    with torch.device("meta"):
        model = UNetModel(unet_config, default_steps=_default_steps(metadata, path, preset))
    _check_fits(model, state_dict, path, source)
    model.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: no weights were loaded for {', '.join(still_meta[:_MAX_LISTED])}.")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=_metadata_strings(model, metadata))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
