"""The two option types of ddfm-fast: what the sampler computes, and how fast it runs.

* :class:`SamplerConfig` holds every setting that changes the fused pixels (the prior, the DDIM respacing, the
  seed, the EM step's lambda and rho, the TV proximal operator, clipping, the size policy). It is frozen and
  validated once, at construction, so the layers below it (sampler, EM-only loop, runners, summaries) never
  re-check a value. A new sampler option is one field here (and one flag in ``ddfm_fast/cli_options.py``); the
  folder runner's summary and its resume check are derived from :meth:`SamplerConfig.to_dict`, so they cover the
  new field without being told.
* :class:`AccelConfig` holds the accelerations (UNet dtype, channels_last, ``torch.compile``, CUDA graphs, the
  step-tail backend). Each switch is independent; ``None`` means "let the execution plan choose for this device"
  (:func:`ddfm_fast.plan.plan`), which is what the ``fast`` preset asks for.

The paper's constants live here and nowhere else: :data:`PAPER_SEED`, :data:`PAPER_LAMB`, :data:`PAPER_RHO`,
:data:`PAPER_STEPS` (Zhao et al., ICCV 2023, Sec. 4.1, and the official ``sample.py``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from ddfm_fast.schedule import NUM_TRAIN_TIMESTEPS, Respacing, space_timesteps

PAPER_SEED = 3407  # the official driver's torch.manual_seed
PAPER_LAMB = 0.5  # the EM step's TV weight lambda (official sample.py)
PAPER_RHO = 0.001  # the EM step's ADMM penalty rho (official sample.py)
PAPER_STEPS = 100  # DDIM steps of the paper's runs (configs/diffusion_config.yaml: timestep_respacing 100)
EM_ONLY_DEFAULT_ITERATIONS = 100  # ablation I, one EM iteration per step of the paper's sampler

Prior = Literal["diffusion", "none"]
TauReduce = Literal["batch", "image"]
TVProx = Literal["shrink", "soft"]
SizePolicy = Literal["pad", "crop"]

PRIORS = ("diffusion", "none")
# The prior a run uses when none is named (``--checkpoint`` / ``model=``): the analytic ``ddfm_fast.shrinkage``
# prior, chosen by bench/shrinkage_fit.py and scored by bench/quality_report.py against EM only and ddfm-small.
DEFAULT_PRIOR = "ddfm-shrink"
TAU_REDUCES = ("batch", "image")
TV_PROXES = ("shrink", "soft")
SIZE_POLICIES = ("pad", "crop")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


class ConfigError(ValueError):
    """A sampler or acceleration option is out of range; the message names the option."""


def _as_int(value: Any) -> Any:
    """A Python int for any integer type (numpy's too); other values unchanged (bools stay bools)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        return value
    return operator.index(value)


def _positive_finite(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _normalise_steps(steps: Optional[Respacing], prior: str,
                     train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Optional[Union[int, str, tuple[int, ...]]]:
    """A hashable respacing (int, str or tuple of ints) that the schedule accepts, or None (model default)."""
    if steps is None:
        return None
    steps = _as_int(steps)
    if isinstance(steps, bool):
        raise ConfigError("steps must be an int, 'N', 'N1,N2' or 'ddimN', not a bool")
    if prior == "none":
        # EM only has no diffusion schedule: steps count EM iterations.
        if isinstance(steps, str) and steps.strip().isdigit():
            steps = int(steps.strip())
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps with prior 'none' count EM iterations and must be an int >= 1, got {steps!r}")
        return steps
    # One spelling per respacing, so equal respacings compare equal (resume, caches): N as an int, a comma list as a
    # tuple of ints (a one-element list is N), 'ddimN' without spaces.
    if isinstance(steps, str):
        text = "".join(steps.split())
        if text.isdigit():
            value: Union[int, str, tuple[int, ...]] = int(text)
        elif "," in text and not text.startswith("ddim"):
            try:
                value = tuple(int(c) for c in text.split(","))
            except ValueError:
                raise ConfigError(f"steps {steps!r}: expected an int, 'N', a comma list 'N1,N2' or 'ddimN'") from None
        else:
            value = text
    elif isinstance(steps, int):
        value = steps
    else:
        try:
            value = tuple(operator.index(c) for c in steps)
        except TypeError:
            raise ConfigError(f"steps must be an int, 'N', 'N1,N2' or 'ddimN', got {steps!r}") from None
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    try:
        kept = space_timesteps(train_timesteps, value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"steps {steps!r}: {exc} (the schedule has train_timesteps={train_timesteps})") from None
    if not kept:
        raise ConfigError(f"steps {steps!r} keeps no timestep")
    return value


@dataclass(frozen=True)
class SamplerConfig:
    """Every setting that decides the fused pixels (Zhao et al., ICCV 2023, Algorithm 1 and Eqs. 16-30).

    Attributes:
        prior: ``"diffusion"`` (DDFM) or ``"none"`` (the paper's ablation I: EM iterations only, no model).
        steps: the DDIM respacing (int N, ``"N"``, ``"N1,N2"``, ``"ddimN"``); ``None`` means the model's own
            default (100 for the paper's model). With ``prior="none"`` the number of EM iterations (default 100).
        seed: the seed of each image's initial noise x_T (a CPU generator per image; official 3407).
        lamb: lambda, the TV weight of Eq. 21 (official 0.5).
        rho: rho, the ADMM penalty of Eqs. 22-27 (official 0.001).
        tau_reduce: how the hyper-parameters tau_a, tau_b (Eq. 17) are averaged: ``"image"`` (one value per image,
            so a batch fuses each image as it would be fused alone; for one image it is the official value) or
            ``"batch"`` (official: one mean over the whole batch).
        clip: clamp the x0 prediction to [-1, 1] before the EM step (official ``clip_denoised=True``).
        tv_prox: the F update of the TV sub-problem: ``"shrink"`` (official linear shrink) or ``"soft"`` (the
            paper's soft threshold, Eqs. 26-27, which needs ``tv_threshold``).
        tv_threshold: the soft threshold kappa >= 0 (only with ``"soft"``; see :func:`ddfm_fast.em.resolve_tv_prox`).
        size_policy: ``"pad"`` (reflect-pad to the model's multiple and crop back: no pixel lost) or ``"crop"``
            (the official top-left crop).
        train_timesteps: length of the base linear schedule (the ADM models: 1000).
    """

    prior: Prior = "diffusion"
    steps: Optional[Respacing] = None
    seed: int = PAPER_SEED
    lamb: float = PAPER_LAMB
    rho: float = PAPER_RHO
    tau_reduce: TauReduce = "image"
    clip: bool = True
    tv_prox: TVProx = "shrink"
    tv_threshold: Optional[float] = None
    size_policy: SizePolicy = "pad"
    train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self) -> None:
        from ddfm_fast.em import resolve_tv_prox

        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if self.prior not in PRIORS:
            raise ConfigError(f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        set_("train_timesteps", _as_int(self.train_timesteps))
        set_("seed", _as_int(self.seed))
        if type(self.clip).__module__ == "numpy" and getattr(self.clip, "dtype", None) is not None \
                and self.clip.dtype.kind == "b":  # numpy's bool
            set_("clip", bool(self.clip))
        if isinstance(self.train_timesteps, bool) or not isinstance(self.train_timesteps, int) \
                or self.train_timesteps < 1:
            raise ConfigError(f"train_timesteps must be an int >= 1, got {self.train_timesteps!r}")
        set_("steps", _normalise_steps(self.steps, self.prior, self.train_timesteps))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be an integer in 0..2**64-1, got {self.seed!r}")
        set_("lamb", _positive_finite("lamb", self.lamb))
        set_("rho", _positive_finite("rho", self.rho))
        if self.tau_reduce not in TAU_REDUCES:
            raise ConfigError(f"tau_reduce must be one of {', '.join(TAU_REDUCES)}, got {self.tau_reduce!r}")
        if not isinstance(self.clip, bool):
            raise ConfigError(f"clip must be True or False, got {self.clip!r}")
        if self.tv_threshold is not None:
            if isinstance(self.tv_threshold, bool):
                raise ConfigError(f"tv_threshold must be a number, got {self.tv_threshold!r}")
            try:
                set_("tv_threshold", float(self.tv_threshold))
            except (TypeError, ValueError):
                raise ConfigError(f"tv_threshold must be a number, got {self.tv_threshold!r}") from None
        try:
            resolve_tv_prox(self.tv_prox, self.tv_threshold)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.size_policy not in SIZE_POLICIES:
            raise ConfigError(f"size_policy must be one of {', '.join(SIZE_POLICIES)}, got {self.size_policy!r}")

    @classmethod
    def paper(cls, **overrides: Any) -> "SamplerConfig":
        """The official protocol: 100 steps, seed 3407, lambda 0.5, rho 0.001, top-left crop, batch tau."""
        base = dict(prior="diffusion", steps=PAPER_STEPS, seed=PAPER_SEED, lamb=PAPER_LAMB, rho=PAPER_RHO,
                    tau_reduce="batch", clip=True, tv_prox="shrink", tv_threshold=None, size_policy="crop")
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> "SamplerConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def for_model(self, default_steps: Optional[int]) -> "SamplerConfig":
        """This config with ``steps`` filled in: the model's ``default_steps`` (diffusion) or 100 iterations (EM)."""
        if self.steps is not None:
            return self
        if self.prior == "none":
            return self.replace(steps=EM_ONLY_DEFAULT_ITERATIONS)
        return self.replace(steps=int(default_steps) if default_steps is not None else PAPER_STEPS)

    @property
    def kappa(self) -> Optional[float]:
        """The soft threshold as the EM step uses it (None for the official shrink)."""
        return self.tv_threshold if self.tv_prox == "soft" else None

    def num_steps(self) -> int:
        """How many UNet calls (or EM iterations) this config makes; ``steps`` must be set."""
        if self.steps is None:
            raise ConfigError("steps is not set (it means the model's default); call for_model() first")
        if self.prior == "none":
            return int(self.steps)  # type: ignore[arg-type]
        return len(space_timesteps(self.train_timesteps, self.steps))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (the summary records them; resume compares them)."""
        d = dataclasses.asdict(self)
        if isinstance(self.steps, tuple):
            d["steps"] = list(self.steps)
        return d


DTYPE_NAMES = ("fp32", "fp16", "bf16")
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class AccelConfig:
    """The accelerations; each is an independent switch, ``None`` = the execution plan picks for the device.

    Attributes:
        dtype: the UNet body's dtype, ``"fp32"``, ``"fp16"`` or ``"bf16"`` (GroupNorm and softmax stay fp32, the
            EM step always runs in fp32: its 1e-10 epsilons underflow in half precision).
        channels_last: NHWC memory format for the UNet's convolutions.
        compile: ``torch.compile`` the whole step (UNet + tail) with ``fullgraph=True``.
        compile_mode: inductor's mode, ``"default"`` (a compile of about a minute on the paper model) or
            ``"max-autotune"`` (minutes; opt-in). Inductor's own CUDA graphs are never used: the sampler captures
            the step itself (``cuda_graphs``), and the two cannot be combined.
        compile_backend: ``"inductor"``; ``"eager"`` (Dynamo tracing only: checks graph breaks and the compile
            cache without code generation) or ``"aot_eager"`` (also functionalises the graph as inductor does),
            both used by the CPU tests.
        cuda_graphs: capture one step as a CUDA graph and replay it for every step (CUDA only).
        backend: the step tail after the UNet: ``"auto"``, ``"torch"`` (plain PyTorch) or ``"triton"`` (fused
            kernels, ``ddfm_fast.kernels.em_tail``).
    """

    dtype: Optional[str] = "fp32"
    channels_last: Optional[bool] = False
    compile: Optional[bool] = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    cuda_graphs: Optional[bool] = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        dtype = self.dtype
        if dtype is not None and not isinstance(dtype, str):
            dtype = _dtype_name(dtype)
            object.__setattr__(self, "dtype", dtype)
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        for name in ("channels_last", "compile", "cuda_graphs"):
            if getattr(self, name) not in (None, True, False):
                raise ConfigError(f"{name} must be True, False or None (auto), got {getattr(self, name)!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ConfigError(f"compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, "
                              f"got {self.compile_backend!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    @classmethod
    def faithful(cls) -> "AccelConfig":
        """fp32, eager, no graphs: the path that reproduces the official floats."""
        return cls()

    @classmethod
    def fast(cls, **overrides: Any) -> "AccelConfig":
        """The fastest the plan knows for the device: on CUDA fp16 + compile (inductor default mode) + Triton tail +
        CUDA graphs; on a CPU, where each of those is slower for a single run, fp32 eager (the plan says why)."""
        base: dict[str, Any] = dict(dtype=None, channels_last=False, compile=None, cuda_graphs=None, backend="auto")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def preset(cls, name: Union[str, "AccelConfig", None]) -> "AccelConfig":
        """``"faithful"`` or ``"fast"`` (or an AccelConfig / None, returned as is / faithful)."""
        if name is None:
            return cls()
        if isinstance(name, AccelConfig):
            return name
        if name == "faithful":
            return cls.faithful()
        if name == "fast":
            return cls.fast()
        raise ConfigError(f"unknown acceleration preset {name!r}; choose 'faithful' or 'fast'")

    def replace(self, **changes: Any) -> "AccelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dtype_name(dtype: Any) -> str:
    """``torch.float16`` -> ``"fp16"`` (the API also takes torch dtypes)."""
    import torch

    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    if dtype not in names:
        raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return names[dtype]


def torch_dtype(name: str) -> Any:
    """``"fp16"`` -> ``torch.float16``."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
