"""Run the official MMIF-DDFM sampler from a user's clone, on our inputs and our weights (``bench --upstream``).

The point is an honest baseline: the speed-up of every fast-path row is measured against the official code itself,
on the same GPU, the same model weights, the same noise and sources, and its 8-bit output is compared with ours.
Nothing of the official code ships with ddfm-fast; the user points at their own clone
(``git clone https://github.com/Zhaozixiang1228/MMIF-DDFM``).

How the clone is used, and why:

* Its packages have generic names (``guided_diffusion``, ``util``), so they are imported with the clone first on
  ``sys.path`` and removed from ``sys.modules`` afterwards; modules of those names imported before are restored.
* Its sampler module imports plotting and image-file libraries (matplotlib, ``skimage.io``, OpenCV) that only its
  ``record=True`` progress images use. Where one is not installed (a GPU box without network), a stand-in module is
  put in its place for the import; calling anything from it raises. We run ``record=False``, so those stand-ins are
  never called; the run's notes list them.
* Its colour conversion, though, is scikit-image's ``rgb2ycbcr`` / ``ycbcr2rgb`` (numpy on the CPU, called every
  step through ``util/pytorch_colors.py``, which also moves the tensor to the CPU and back). Without scikit-image
  the stand-in ``skimage.color`` provides those two functions, written after scikit-image's formulas (the float32
  or float64 matmul of the input with the cast matrix, the 16/128/128 offsets) with the matrices of
  :mod:`ddfm_fast.color`; ``tests/test_upstream.py`` checks them bitwise against scikit-image where it is
  installed. The CPU round trip stays the official wrapper's own.
* The model is built with the clone's own ``create_model`` (``model_path`` pointing nowhere, so it starts random as
  the official code does when the checkpoint is missing) and then given our weights with a strict
  ``load_state_dict``: the key names are guided-diffusion's on both sides.
* The sampler comes from the clone's ``configs/diffusion_config.yaml`` with ``timestep_respacing`` set to the
  benchmark's step count, exactly as the official ``sample.py`` builds it; ``p_sample_loop`` runs with the official
  ``lamb=0.5, rho=0.001``. Its progress bar is silenced (that changes nothing it computes).
* The official loop compares a (B,)-shaped timestep tensor with a one-element tensor in an ``if``, so it only runs
  batch 1; the official code is timed at batch 1 only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import io
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ddfm_fast.unet import UNetConfig

# Files of the official repository this module relies on; checked up front so a wrong path gets one clear error.
REQUIRED_FILES = (
    "guided_diffusion/unet.py",
    "guided_diffusion/gaussian_diffusion.py",
    "guided_diffusion/EM_onestep.py",
    "util/pytorch_colors.py",
    "configs/diffusion_config.yaml",
)
# Imported by the official modules; replaced by stand-ins when not installed (skimage.color: see the module doc).
OPTIONAL_IMPORTS = ("matplotlib", "matplotlib.pyplot", "skimage", "skimage.io", "skimage.color", "cv2")
# The clone's top-level packages (generic names: isolated, then removed again).
CLONE_PACKAGES = ("guided_diffusion", "util")


class UpstreamError(RuntimeError):
    """The official code could not be found, imported or run; the message names the path and the problem."""


@dataclass
class UpstreamRun:
    """One timed run of the official sampler."""

    sample: torch.Tensor  # (1, 3, H, W) float32, the official p_sample_loop's return value
    seconds: float  # wall time of the timed run (device synchronised)
    warmup_seconds: float  # a 2-step run first (cuDNN algorithm choice, allocator warm-up)
    peak_mem_gib: float | None
    notes: list[str] = field(default_factory=list)


def check_clone(path: Path) -> Path:
    """The clone's root, or :class:`UpstreamError` naming the path and the first missing file."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UpstreamError(f"{root}: not a directory (expected a clone of github.com/Zhaozixiang1228/MMIF-DDFM)")
    for rel in REQUIRED_FILES:
        if not (root / rel).is_file():
            raise UpstreamError(f"{root}: {rel} is missing; is this a clone of the official MMIF-DDFM repository?")
    return root.resolve()


def create_model_args(config: UNetConfig) -> dict[str, Any]:
    """Guided-diffusion ``create_model`` keyword arguments for ``config`` (inverse of ``from_create_model_args``).

    Raises :class:`UpstreamError` for configs the official code cannot build or sample: our small-model
    extensions (``norm_groups`` != 32, no middle attention), fractional channel multipliers, or a model without
    the learned-variance channels that the official ``learned_range`` sampler splits off.
    """
    problems = []
    if config.norm_groups != 32 or config.norm_eps != 1e-5:
        problems.append(f"GroupNorm with {config.norm_groups} groups, eps {config.norm_eps} (official: 32, 1e-5)")
    if not config.middle_attention:
        problems.append("no middle-block attention")
    if any(float(m) != int(m) for m in config.channel_mult):
        problems.append(f"fractional channel_mult {config.channel_mult}")
    if config.out_channels != 6 or config.in_channels != 3:
        problems.append(f"{config.in_channels} -> {config.out_channels} channels (official sampler: 3 -> 6)")
    if not config.conv_resample:
        problems.append("conv_resample=False")
    if problems:
        raise UpstreamError("the official code cannot run this model: " + "; ".join(problems))
    return {
        "image_size": config.image_size,
        "num_channels": config.model_channels,
        "num_res_blocks": config.num_res_blocks,
        "channel_mult": ",".join(str(int(m)) for m in config.channel_mult),
        "learn_sigma": True,
        "class_cond": False,
        "use_checkpoint": False,
        "attention_resolutions": ",".join(str(config.image_size // r) for r in config.attention_resolutions),
        "num_heads": config.num_heads,
        "num_head_channels": config.num_head_channels,
        "num_heads_upsample": config.num_heads_upsample,
        "use_scale_shift_norm": config.use_scale_shift_norm,
        "dropout": config.dropout,
        "resblock_updown": config.resblock_updown,
        "use_fp16": False,
        "use_new_attention_order": False,
    }


class _StandIn(types.ModuleType):
    """Importable in place of a missing optional library; using anything from it raises."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*_args: Any, **_kwargs: Any) -> None:
            raise UpstreamError(f"{self.__name__}.{name} was called, but {self.__name__} is not installed "
                                "(ddfm-fast put a stand-in in its place for the official code's imports)")

        return unavailable


def _skimage_float(arr: Any) -> Any:
    import numpy as np

    arr = np.asarray(arr)
    if arr.shape[-1] != 3:
        raise ValueError(f"the input array must have size 3 along the last axis, got {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"ddfm-fast's stand-in for skimage.color takes float32/float64 only, got {arr.dtype}")
    return arr


def _rgb2ycbcr(rgb: Any) -> Any:
    """scikit-image ``rgb2ycbcr`` for float input: ``rgb @ M.T`` in the input's float type, plus the offsets."""
    import numpy as np

    from ddfm_fast.color import OFFSET, YCBCR_FROM_RGB

    arr = _skimage_float(rgb)
    out = arr @ np.asarray(YCBCR_FROM_RGB, dtype=np.float64).T.astype(arr.dtype)
    for c, off in enumerate(OFFSET):
        out[..., c] += off
    return out


def _ycbcr2rgb(ycbcr: Any) -> Any:
    """scikit-image ``ycbcr2rgb`` for float input: the offsets removed, then ``@ inv(M).T`` in its float type."""
    import numpy as np

    from ddfm_fast.color import OFFSET, RGB_FROM_YCBCR

    arr = _skimage_float(ycbcr).copy()
    for c, off in enumerate(OFFSET):
        arr[..., c] -= off
    return arr @ np.asarray(RGB_FROM_YCBCR, dtype=np.float64).T.astype(arr.dtype)


def _stand_in(name: str) -> _StandIn:
    module = _StandIn(name)
    if name == "skimage.color":
        module.rgb2ycbcr, module.ycbcr2rgb = _rgb2ycbcr, _ycbcr2rgb
    return module


def _read_flat_yaml(path: Path) -> dict[str, Any]:
    """The official diffusion config: PyYAML when installed; else its flat ``key: value`` lines by hand."""
    text = path.read_text()
    try:
        import yaml
    except ImportError:
        out: dict[str, Any] = {}
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise UpstreamError(f"{path}: cannot read line {line!r} without PyYAML (pip install pyyaml)")
            value = value.strip()
            lowered = value.lower()
            out[key.strip()] = (True if lowered == "true" else False if lowered == "false"
                                else int(value) if value.lstrip("-").isdigit() else value)
        return out
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise UpstreamError(f"{path}: expected a mapping of sampler settings")
    return data


@contextlib.contextmanager
def official_modules(root: Path) -> Iterator[tuple[types.ModuleType, types.ModuleType, list[str]]]:
    """Import the clone's ``guided_diffusion.unet`` and ``guided_diffusion.gaussian_diffusion`` in isolation.

    Yields ``(unet_module, diffusion_module, notes)``. On exit, every module the import added is removed and
    modules of the same names that existed before are put back.
    """
    root = check_clone(root)
    saved = {name: mod for name, mod in sys.modules.items()
             if name.split(".")[0] in CLONE_PACKAGES}
    for name in saved:
        del sys.modules[name]
    before = set(sys.modules)
    # What the optional names were before (a test may have hidden a library with ``sys.modules[name] = None``).
    prior_optional = {name: sys.modules[name] for name in OPTIONAL_IMPORTS if name in sys.modules}
    notes: list[str] = []
    sys.path.insert(0, str(root))
    try:
        for name in OPTIONAL_IMPORTS:
            had = set(sys.modules)
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - not installed, or installed but broken (e.g. a numpy ABI clash)
                top = name.split(".")[0]
                for added in set(sys.modules) - had:  # drop what the failed import left half-initialised
                    if added.split(".")[0] == top:
                        del sys.modules[added]
                if not isinstance(exc, ImportError):
                    notes.append(f"{name} is installed but failed to import ({type(exc).__name__}: "
                                 f"{str(exc)[:120]}); using a stand-in")
                stand_in = _stand_in(name)
                sys.modules[name] = stand_in
                parent, _, child = name.rpartition(".")
                if isinstance(sys.modules.get(parent), _StandIn):  # never touch a real, installed parent
                    setattr(sys.modules[parent], child, stand_in)
                notes.append(f"{name} not installed: ddfm-fast's rgb2ycbcr/ycbcr2rgb (scikit-image's formulas) "
                             "stood in" if name == "skimage.color" else
                             f"{name} not installed: a stand-in was imported in its place (used only by record=True)")
        util_dir = root / "util"
        if not (util_dir / "__init__.py").is_file():
            # The clone's util/ is a namespace package, and any regular package named util elsewhere on sys.path
            # would win over it even with the clone first; pin the name to the clone's folder.
            util = types.ModuleType("util")
            util.__path__ = [str(util_dir)]
            util.__spec__ = importlib.machinery.ModuleSpec("util", None, is_package=True)
            util.__spec__.submodule_search_locations = [str(util_dir)]
            sys.modules["util"] = util
        try:
            unet_mod = importlib.import_module("guided_diffusion.unet")
            diffusion_mod = importlib.import_module("guided_diffusion.gaussian_diffusion")
        except Exception as exc:  # noqa: BLE001 - any import failure of the user's clone is reported with its path
            raise UpstreamError(f"{root}: importing the official code failed: {type(exc).__name__}: {exc}") from exc
        for mod in (unet_mod, diffusion_mod, sys.modules.get("util.pytorch_colors")):
            if mod is None:
                raise UpstreamError(f"{root}: the official sampler did not import util.pytorch_colors")
            origin = Path(getattr(mod, "__file__", "") or "").resolve()
            if root not in origin.parents:
                raise UpstreamError(f"{root}: {mod.__name__} was imported from {origin}, not from the clone")
        yield unet_mod, diffusion_mod, notes
    finally:
        if str(root) in sys.path:
            sys.path.remove(str(root))
        for name in set(sys.modules) - before:
            if name.split(".")[0] in CLONE_PACKAGES:
                del sys.modules[name]
        for name in OPTIONAL_IMPORTS:
            if isinstance(sys.modules.get(name), _StandIn):
                del sys.modules[name]
                if name in prior_optional:
                    sys.modules[name] = prior_optional[name]
        sys.modules.update(saved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_official_model(unet_mod: types.ModuleType, config: UNetConfig, state_dict: Mapping[str, torch.Tensor],
                         device: torch.device) -> nn.Module:
    """The clone's ``create_model`` for ``config``, given ``state_dict`` strictly, in eval mode on ``device``."""
    args = create_model_args(config)
    # create_model tries to load ``model_path`` and prints "Got exception ... Randomly initialize" on failure;
    # a path that cannot exist gives the official random start, and its print is kept out of our output.
    with contextlib.redirect_stdout(io.StringIO()):
        model = unet_mod.create_model(**args, model_path="/nonexistent/ddfm-fast-upstream-bench.pt")
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        raise UpstreamError(f"our weights do not load into the official UNet: {exc}") from exc
    return model.to(device).eval()


class OfficialSampler:
    """The official model and ``p_sample_loop`` from a clone, imported and built once (a context manager).

    ``with OfficialSampler(root, config, state_dict, device) as official: official.sample(x, I, V, steps)``;
    on exit the clone's modules are removed again (see :func:`official_modules`).
    """

    def __init__(self, root: Path, config: UNetConfig, state_dict: Mapping[str, torch.Tensor],
                 device: torch.device) -> None:
        self.root, self.config, self.state_dict, self.device = Path(root), config, state_dict, torch.device(device)
        self.notes: list[str] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "OfficialSampler":
        try:
            unet_mod, self._diffusion, notes = self._stack.enter_context(official_modules(self.root))
            self.notes = notes + [f"official code from {self.root.resolve()}"]
            self._config = _read_flat_yaml(self.root / "configs/diffusion_config.yaml")
            self.model = build_official_model(unet_mod, self.config, self.state_dict, self.device)
            from tqdm.auto import tqdm

            # The official loop draws a progress bar per image; silence it (its arithmetic is untouched).
            self._diffusion.tqdm = functools.partial(tqdm, disable=True)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.model = None
        self._stack.close()

    def sample(self, x_start: torch.Tensor, I: torch.Tensor, V: torch.Tensor,  # noqa: E741
               steps: int) -> torch.Tensor:
        """The official ``p_sample_loop`` with ``timestep_respacing = steps``, lamb 0.5, rho 0.001, no recording."""
        if x_start.shape[0] != 1:
            raise UpstreamError(f"the official sampler runs batch 1 only, got batch {x_start.shape[0]}")
        sampler = self._diffusion.create_sampler(**{**self._config, "timestep_respacing": str(steps)})
        with torch.no_grad():
            out = sampler.p_sample_loop(model=self.model, x_start=x_start.clone(), record=False, I=I, V=V,
                                        save_root=None, img_index=None, lamb=0.5, rho=0.001)
        return out.detach().float()


def run_official(root: Path, config: UNetConfig, state_dict: Mapping[str, torch.Tensor], x_start: torch.Tensor,
                 I: torch.Tensor, V: torch.Tensor, steps: int, *, warmup: bool = True) -> UpstreamRun:  # noqa: E741
    """Time the official ``p_sample_loop`` (``steps`` DDIM steps) on one image with our weights.

    ``x_start`` (1, 3, H, W), ``I`` and ``V`` (1, 1, H, W) in [-1, 1] on the device to run on; the official
    ``lamb=0.5, rho=0.001``, ``record=False``. With ``warmup``, a 2-step run goes first and is timed apart.
    Importing the clone and building its model are not timed. Peak memory is the official run's own (its model
    and activations over the timed run), not what the caller already holds on the device.
    """
    device = x_start.device
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with OfficialSampler(root, config, state_dict, device) as official:
        warm = 0.0
        if warmup:
            t0 = time.perf_counter()
            official.sample(x_start, I, V, 2)
            _sync(device)
            warm = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = official.sample(x_start, I, V, steps)
        _sync(device)
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else None
    return UpstreamRun(sample=out, seconds=seconds, warmup_seconds=warm, peak_mem_gib=peak, notes=official.notes)
