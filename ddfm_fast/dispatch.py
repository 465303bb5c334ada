"""One place that decides which backend runs the step tail (EM step, colour, DDIM update), and says why.

Backends:
    ``torch``   the plain-PyTorch step (the oracle; runs anywhere)
    ``triton``  fused Triton kernels around the FFTs (``ddfm_fast.kernels.em_tail``); on CUDA, or on CPU under
                ``TRITON_INTERPRET=1`` (Triton's interpreter: a correctness tool, slow)
    ``auto``    ``triton`` where it is available and useful (CUDA, compiled kernels), else ``torch`` with the
                reason reported; it never picks the interpreter

``DDFM_FAST_BACKEND=torch|triton|auto`` overrides the argument (a kill-switch for the custom kernels).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_BACKEND = "DDFM_FAST_BACKEND"


class BackendError(RuntimeError):
    """A backend that was asked for explicitly cannot run here."""


@dataclass(frozen=True)
class BackendChoice:
    """The backend that will run, what was asked for, and why any faster path was not taken."""

    name: str
    requested: str
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        text = f"backend {self.name!r} (requested {self.requested!r})"
        return text + (": " + "; ".join(self.reasons) if self.reasons else "")


KERNELS_MODULE = "ddfm_fast.kernels.em_tail"


@functools.lru_cache(maxsize=None)
def _kernels_import_error() -> str | None:
    """Import the kernels once (this imports triton); the error text when that fails, else None."""
    try:
        importlib.import_module(KERNELS_MODULE)
    except Exception as exc:  # noqa: BLE001 - any import failure (a broken triton, a missing libcuda) is a reason
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_not_supported_reasons(device: torch.device | str) -> list[str]:
    """Why the Triton step tail cannot run on ``device`` (empty when it can).

    Checks, in order: the device type; CUDA being usable; triton and the kernels module being installed and
    importable; and, on the CPU, Triton's interpreter: ``TRITON_INTERPRET=1`` must be set, and it must have been
    set before the kernels were imported (Triton decides at import time whether a kernel is interpreted).
    """
    device = torch.device(device)
    reasons: list[str] = []
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
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
    elif reasons:
        pass  # do not import triton just to report a second reason
    else:
        error = _kernels_import_error()
        if error is not None:
            reasons.append(f"importing {KERNELS_MODULE} failed ({error})")
        elif device.type == "cpu" and not importlib.import_module(KERNELS_MODULE).INTERPRETED:
            reasons.append(
                f"{KERNELS_MODULE} was imported before TRITON_INTERPRET=1 was set, so its kernels are compiled for "
                "a GPU; set TRITON_INTERPRET=1 before anything imports triton")
    return reasons


def _triton_not_useful_reasons(device: torch.device | str) -> list[str]:
    """Why ``auto`` does not pick Triton although it could run: the interpreter is not a fast path."""
    if torch.device(device).type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        return ["TRITON_INTERPRET=1 runs Triton in its CPU interpreter, which is slower than plain torch; "
                "ask for backend='triton' explicitly to use it (e.g. to test the kernels)"]
    return []


def resolve_backend(requested: str | None, device: torch.device | str) -> BackendChoice:
    """Pick the backend for ``device``. ``requested`` None means ``"auto"``; the environment overrides both.

    An explicit ``"triton"`` that cannot run is an error; ``"auto"`` falls back to ``"torch"`` and the choice
    carries the reasons (``ddfm-fast info`` prints them, and a CUDA fallback warns once).
    """
    env = os.environ.get(ENV_BACKEND, "").strip().lower()
    if env:
        if env not in BACKENDS:
            raise BackendError(f"{ENV_BACKEND}={env!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        requested = env
    requested = (requested or "auto").lower()
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return BackendChoice("torch", requested)
    reasons = triton_not_supported_reasons(device)
    if not reasons:
        if requested == "triton":
            return BackendChoice("triton", requested)
        reasons = _triton_not_useful_reasons(device)
        if not reasons:
            return BackendChoice("triton", requested)
    if requested == "triton":
        raise BackendError("backend 'triton' cannot run here: " + "; ".join(reasons))
    choice = BackendChoice("torch", requested, tuple(reasons))
    if torch.device(device).type == "cuda":
        _warn_once(f"ddfm-fast: the Triton step tail is not used on CUDA, running plain torch: {'; '.join(reasons)}")
    return choice


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
