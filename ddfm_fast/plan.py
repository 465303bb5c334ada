"""The execution plan: one place that decides how a step runs on a device, and says why.

``plan(device, accel, env)`` turns an :class:`~ddfm_fast.config.AccelConfig` into an :class:`ExecutionPlan`:
the step-tail backend, the UNet dtype, compile, CUDA graphs and channels_last, each with the reason a faster
choice is not taken (the ``not_supported_reasons`` pattern of xformers). A switch left to the plan (``None``) is
chosen per device: on CUDA the fast path (fp16, compile, Triton tail, CUDA graphs); on a CPU the faithful fp32
eager path, because there each of those is slower for a single run (measured in ``bench/results/``). A switch
asked for explicitly is honoured; if it is known to be slower on this device the plan carries a warning saying
so. A fast path given up at run time (a compile or a capture that fails) is recorded with :meth:`fall_back`,
which also warns: nothing falls back in silence.

Step-tail backends:
    ``torch``   the plain-PyTorch tail (the oracle; runs anywhere)
    ``triton``  fused Triton kernels around the FFTs (``ddfm_fast.kernels.em_tail``); on CUDA, or on a CPU under
                ``TRITON_INTERPRET=1`` (Triton's interpreter: a correctness tool, slow)
    ``auto``    ``triton`` where it is available and useful (CUDA, compiled kernels), else ``torch``

``DDFM_FAST_BACKEND=torch|triton|auto`` overrides the requested backend (a kill-switch for the custom kernels).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

import torch

from ddfm_fast.config import BACKENDS, AccelConfig

ENV_BACKEND = "DDFM_FAST_BACKEND"
KERNELS_MODULE = "ddfm_fast.kernels.em_tail"


class BackendError(RuntimeError):
    """A backend or device that was asked for explicitly cannot run here."""


class FallbackWarning(RuntimeWarning):
    """A fast path was not taken or was given up (the plan records it too)."""


@functools.lru_cache(maxsize=None)
def _kernels_import_error() -> Optional[str]:
    """Import the kernels once (this imports triton); the error text when that fails, else None."""
    try:
        importlib.import_module(KERNELS_MODULE)
    except Exception as exc:  # noqa: BLE001 - any import failure (a broken triton, a missing libcuda) is a reason
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_not_supported_reasons(device: torch.device | str, env: Optional[Mapping[str, str]] = None) -> list[str]:
    """Why the Triton step tail cannot run on ``device`` (empty when it can).

    Checks, in order: the device type; CUDA being usable; triton and the kernels module being importable; and,
    on the CPU, Triton's interpreter: ``TRITON_INTERPRET=1`` must be set, and it must have been set before the
    kernels were imported (Triton decides at import time whether a kernel is interpreted).
    """
    env = os.environ if env is None else env
    device = torch.device(device)
    reasons: list[str] = []
    interpret = env.get("TRITON_INTERPRET") == "1"
    if device.type == "cpu":
        if not interpret:
            reasons.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set")
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            reasons.append("CUDA is not available to this torch build or machine")
    else:
        reasons.append(f"Triton kernels are not built for device type {device.type!r}")
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed (pip install 'ddfm-fast[triton]')")
    elif importlib.util.find_spec(KERNELS_MODULE) is None:
        reasons.append("the Triton step-tail kernels are not part of this version of ddfm-fast")
    elif not reasons:  # import triton only when nothing else already rules it out
        error = _kernels_import_error()
        if error is not None:
            reasons.append(f"importing {KERNELS_MODULE} failed ({error})")
        elif device.type == "cpu" and not importlib.import_module(KERNELS_MODULE).INTERPRETED:
            reasons.append(
                f"{KERNELS_MODULE} was imported before TRITON_INTERPRET=1 was set, so its kernels are compiled for "
                "a GPU; set TRITON_INTERPRET=1 before anything imports triton")
    return reasons


def check_device(device: torch.device | str) -> torch.device:
    """The device as a ``torch.device``, or a :class:`BackendError` saying why it cannot be used here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackendError(f"device {device!r} is not a device name ({exc})") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {str(device)!r}: CUDA is not available (this torch build is "
                               f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}); use device 'cpu' (--device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise BackendError(f"device {str(device)!r}: ddfm-fast runs on 'cpu' or 'cuda' devices, not {dev.type!r}")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class ExecutionPlan:
    """How the step runs on one device: each choice, the reasons faster ones are not taken, and what changed.

    ``reasons`` say why a faster path is not used; ``warnings`` say that an explicitly requested switch is slower
    here; ``fallbacks`` list fast paths given up at run time (each also warned as a :class:`FallbackWarning`).
    """

    device: str
    backend: str
    dtype: str
    compile: bool
    compile_mode: str
    compile_backend: str
    cuda_graphs: bool
    channels_last: bool
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line, e.g. ``cpu: torch tail, fp32, eager (compile: not picked on a CPU ...)``."""
        parts = [f"{self.backend} tail", self.dtype]
        parts += ["channels_last"] if self.channels_last else []
        parts += [f"compile({self.compile_mode})" if self.compile_backend == "inductor"
                  else f"compile({self.compile_backend})"] if self.compile else ["eager"]
        parts += ["cuda_graphs"] if self.cuda_graphs else []
        text = f"{self.device}: " + ", ".join(parts)
        notes = self.reasons + self.warnings + [f"fell back: {f}" for f in self.fallbacks]
        return text + (" (" + "; ".join(notes) + ")" if notes else "")

    def fall_back(self, what: str, reason: str) -> None:
        """Record that a fast path was given up at run time, turn it off in the plan, and warn."""
        message = f"{what} given up: {reason}"
        self.fallbacks.append(message)
        if what == "compile":
            self.compile = False
        elif what == "cuda_graphs":
            self.cuda_graphs = False
        warnings.warn(f"ddfm-fast: {message}", FallbackWarning, stacklevel=2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve_backend(requested: str, device: torch.device, env: Mapping[str, str]) -> tuple[str, list[str]]:
    override = env.get(ENV_BACKEND, "").strip().lower()
    if override:
        if override not in BACKENDS:
            raise BackendError(f"{ENV_BACKEND}={override!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        requested = override
    if requested == "torch":
        return "torch", []
    reasons = triton_not_supported_reasons(device, env)
    if requested == "triton":
        if reasons:
            asked = f"{ENV_BACKEND}=triton" if override == "triton" else "backend 'triton'"
            raise BackendError(f"{asked} cannot run here: " + "; ".join(reasons))
        return "triton", []
    if not reasons and device.type == "cuda" and env.get("TRITON_INTERPRET") != "1":
        return "triton", []
    if not reasons:
        reasons = ["Triton tail: TRITON_INTERPRET=1 runs Triton in its CPU interpreter, slower than plain torch; "
                   "ask for backend 'triton' explicitly to use it (e.g. to test the kernels)"]
    else:
        reasons = ["Triton tail not used: " + "; ".join(reasons)]
    return "torch", reasons


def plan(device: torch.device | str, accel: Optional[AccelConfig] = None,
         env: Optional[Mapping[str, str]] = None) -> ExecutionPlan:
    """Decide every acceleration for ``device``; see the module docstring for the rules.

    Raises :class:`BackendError` for a device that cannot be used or an explicit Triton backend that cannot run.
    """
    accel = accel or AccelConfig()
    env = os.environ if env is None else env
    dev = check_device(device)
    cuda = dev.type == "cuda"
    backend, reasons = _resolve_backend(accel.backend, dev, env)
    warns: list[str] = []

    dtype = accel.dtype
    if dtype is None:
        dtype = "fp16" if cuda else "fp32"
        if not cuda:
            reasons.append("fp16/bf16 UNet: not picked on a CPU (half precision is emulated or barely faster there, "
                           "and fp32 reproduces the official floats)")
    elif not cuda and dtype == "fp16":
        warns.append("fp16 on a CPU is emulated and many times slower than fp32")
    elif not cuda and dtype == "bf16" and not cpu_has_native_bf16():
        warns.append("bf16 on this CPU (no AVX512-BF16 / AMX) is emulated and many times slower than fp32")

    compile_ = accel.compile
    if compile_ is None:
        compile_ = cuda
        if not cuda:
            reasons.append("compile: not picked on a CPU (a first compile takes 15-60 s, more than a single "
                           "pair's sampling saves)")
    elif compile_ and not cuda and accel.compile_backend == "inductor":
        warns.append("torch.compile on a CPU costs 15-60 s per image size before the first step; it pays off "
                     "only over many pairs of one size")

    graphs = accel.cuda_graphs
    if graphs is None:
        graphs = cuda
        if not cuda:
            reasons.append("CUDA graphs: need a CUDA device")
    elif graphs and not cuda:
        warns.append(f"CUDA graphs were asked for, but they need a CUDA device; running without graphs on "
                     f"{dev.type}")
        graphs = False

    channels_last = bool(accel.channels_last)
    return ExecutionPlan(device=str(dev), backend=backend, dtype=dtype, compile=bool(compile_),
                         compile_mode=accel.compile_mode, compile_backend=accel.compile_backend,
                         cuda_graphs=bool(graphs), channels_last=channels_last, reasons=reasons, warnings=warns)
