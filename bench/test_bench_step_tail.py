"""The DDFM step tail (everything after the UNet) at realistic sizes: official-style vs plain torch vs Triton.

    pytest bench/ --benchmark-only                       # 256x256 and 480x640 (+ larger on CUDA)
    DDFM_BENCH_LARGE=1 pytest bench/ --benchmark-only    # the larger sizes on a CPU too

Rows:
    official  written here in the structure of the official code (``DDIM.p_sample`` + ``EM_onestep``): three
              complex FFTs, boolean-mask writes, the EM state as a dict of tensors, the schedule coefficients
              copied host -> device at every use, the colour conversion through numpy on the host, and the
              (unused, sigma = 0) ``randn_like`` noise of every step
    torch     ``ddfm_fast.step.step_tail_torch``: the same arithmetic, on the device, no host round trip
    triton    ``ddfm_fast.kernels.em_tail.step_tail_triton`` (CUDA only: the CPU interpreter is not a speed measure)

On a CPU, 1024x768 and 1280x1024 run only with ``DDFM_BENCH_LARGE=1`` (they always run on CUDA).

Timing: one benchmark round runs ``CALLS`` steps. On CUDA the torch and Triton tails are captured as one CUDA
graph of ``CALLS`` calls and a round is one replay plus one synchronisation, so neither launch overhead nor a
per-call host sync is in the number (at 10-50 us per call, a sync per call would measure mostly that); the
official-style tail cannot be captured (it copies to the host every step) and runs ``CALLS`` plain calls per round.
On a CPU a round is ``CALLS`` plain calls.

``extra_info`` carries the device (and the CPU model), torch/triton versions and threads, the nominal bytes of
one step and the effective bandwidth (nominal bytes / median time per step), ``us_per_step``, and the quality:
the max |x_prev - x_prev(torch)| of one step from the same inputs. The nominal bytes are the fused tail's traffic
model (``ddfm_fast.benchmarks.tail_bytes``, ~36 float32 planes of B*H*W): the least this tail moves, so the GB/s
of every row compare speeds on one scale (and, for the Triton row, estimate the achieved bandwidth).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import device_info
from ddfm_fast import color
from ddfm_fast.benchmarks import cpu_model, tail_bytes
from ddfm_fast.config import SamplerConfig
from ddfm_fast.em import em_init
from ddfm_fast.schedule import Schedule
from ddfm_fast.step import step_tail_torch

LAMB, RHO = 0.5, 0.001
STEPS = 100  # the paper's respacing; the benchmark uses its first step's coefficients
CFG = SamplerConfig(steps=STEPS, lamb=LAMB, rho=RHO, tau_reduce="batch")
CALLS = 100 if torch.cuda.is_available() else 3  # steps per benchmark round (one CUDA graph replay on CUDA)
_LARGE = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("DDFM_BENCH_LARGE") != "1",
                            reason="large size on a CPU: set DDFM_BENCH_LARGE=1 to run it")
SIZES = [
    pytest.param((256, 256), id="256x256"),
    pytest.param((480, 640), id="480x640"),
    pytest.param((1024, 768), id="1024x768", marks=_LARGE),
    pytest.param((1280, 1024), id="1280x1024", marks=_LARGE),
]


# ----------------------------------------------------------------------------------- official-style tail


def _extract(arr: np.ndarray, idx: int, like: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's ``_extract_into_tensor``: the whole numpy array to the device, then index and broadcast."""
    res = torch.from_numpy(arr).to(device=like.device)[torch.tensor([idx], device=like.device)].float()
    while len(res.shape) < len(like.shape):
        res = res[..., None]
    return res.expand(like.shape)


def _psf2otf_diff(height: int, width: int, axis: int, device) -> torch.Tensor:
    psf = np.zeros((height, width), dtype=np.float32)
    psf[0, 0] = 1.0
    if axis == 1:
        psf[0, 1] = -1.0
    else:
        psf[1, 0] = -1.0
    psf = np.roll(psf, -1, axis=axis)
    return torch.from_numpy(np.fft.fft2(psf).astype(np.complex64)).to(device)


def official_em_initial(I: torch.Tensor) -> dict:  # noqa: E741
    h, w = I.shape[-2:]
    k1, k2 = _psf2otf_diff(h, w, 1, I.device), _psf2otf_diff(h, w, 0, I.device)
    return {"C": torch.ones_like(I), "D": torch.ones_like(I), "F2": torch.zeros_like(I), "F1": torch.zeros_like(I),
            "H": torch.zeros_like(I), "tau_a": 1, "tau_b": 1, "fft_k1": k1, "fft_k2": k2,
            "fft_k1sq": torch.conj(k1) * k1, "fft_k2sq": torch.conj(k2) * k2}


def official_em_onestep(f_pre, I, V, HP: dict, lamb=LAMB, rho=RHO):  # noqa: E741
    fft_k1, fft_k2, fft_k1sq, fft_k2sq = HP["fft_k1"], HP["fft_k2"], HP["fft_k1sq"], HP["fft_k2sq"]
    C, D, F2, F1, H, tau_a, tau_b = HP["C"], HP["D"], HP["F2"], HP["F1"], HP["H"], HP["tau_a"], HP["tau_b"]
    Y = I - V
    X = f_pre - V
    # E-step
    D = torch.sqrt(2 / tau_b / (X**2 + 1e-6))
    C = torch.sqrt(2 / tau_a / ((Y - X + 1e-6) ** 2))
    D[D > 2 * C] = 2 * C[D > 2 * C]
    tau_b = torch.mean(1.0 / (D + 1e-10) + tau_b / 2)
    tau_a = torch.mean(1.0 / (C + 1e-10) + tau_a / 2)
    # M-step: three forward FFTs and a complex inverse
    H = torch.real(torch.fft.ifft2((torch.fft.fft2(Y - X) + torch.conj(fft_k1) * torch.fft.fft2(F1)
                                    + torch.conj(fft_k2) * torch.fft.fft2(F2)) / (1 + fft_k1sq + fft_k2sq)))
    a1 = torch.zeros_like(H)
    a1[:, :, :, :-1] = H[:, :, :, :-1] - H[:, :, :, 1:]
    a1[:, :, :, -1] = H[:, :, :, -1]
    F1 = (rho / (2 * lamb + rho)) * a1
    a2 = torch.zeros_like(H)
    a2[:, :, :-1, :] = H[:, :, :-1, :] - H[:, :, 1:, :]
    a2[:, :, -1, :] = H[:, :, -1, :]
    F2 = (rho / (2 * lamb + rho)) * a2
    X = (2 * C * Y + rho * (Y - H)) / (2 * C + 2 * D + rho)
    F = I - X
    return F, {"C": C, "D": D, "F2": F2, "F1": F1, "H": H, "tau_a": tau_a, "tau_b": tau_b, "fft_k1": fft_k1,
               "fft_k2": fft_k2, "fft_k1sq": fft_k1sq, "fft_k2sq": fft_k2sq}


_M = np.array(color.YCBCR_FROM_RGB)
_M_INV = np.array(color.RGB_FROM_YCBCR)
_OFFSET = np.array(color.OFFSET)


def _host_rgb2ycbcr(x: torch.Tensor) -> torch.Tensor:
    """scikit-image's rgb2ycbcr on the host: to numpy NHWC, matmul, offset, back to the device."""
    arr = x.detach().cpu().numpy().transpose(0, 2, 3, 1)
    out = arr @ _M.T.astype(arr.dtype)
    out += _OFFSET.astype(arr.dtype)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2))).to(x.device)


def _host_ycbcr2rgb(x: torch.Tensor) -> torch.Tensor:
    arr = x.detach().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float64)
    out = (arr - _OFFSET) @ _M_INV.T
    return torch.from_numpy(np.ascontiguousarray(out.astype(np.float32).transpose(0, 3, 1, 2))).to(x.device)


class OfficialStyleTail:
    """The post-UNet part of the official ``p_sample`` for spaced index ``idx``, in its structure."""

    def __init__(self, schedule: Schedule, idx: int):
        self.s, self.idx = schedule, idx

    def __call__(self, x, eps, I, V, HP):  # noqa: E741
        s, idx = self.s, self.idx
        x0 = _extract(s.sqrt_recip_alphas_cumprod, idx, x) * x - _extract(s.sqrt_recipm1_alphas_cumprod, idx, x) * eps
        x0 = x0.clamp(-1, 1)
        ycc = _host_rgb2ycbcr(x0) / 255
        F, HP = official_em_onestep(ycc[:, 0:1], I, V, HP)
        ycc[:, 0:1] = F
        x0 = _host_ycbcr2rgb(ycc * 255)
        eps = (_extract(s.sqrt_recip_alphas_cumprod, idx, x) * x - x0) / _extract(s.sqrt_recipm1_alphas_cumprod,
                                                                                   idx, x)
        ac_prev = _extract(s.alphas_cumprod_prev, idx, x)
        sigma = 0.0  # eta = 0
        mean_pred = x0 * torch.sqrt(ac_prev) + torch.sqrt(1 - ac_prev - sigma**2) * eps
        noise = torch.randn_like(x)
        nonzero_mask = (torch.tensor(idx, device=x.device) != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        return mean_pred + nonzero_mask * sigma * noise, x0, HP


# ------------------------------------------------------------------------------------------------ harness


def _inputs(height: int, width: int, device: torch.device, batch: int = 1):
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 3, height), torch.linspace(0, 4, width), indexing="ij")
    I = (torch.sin(yy + xx) * 0.6 + 0.05 * torch.randn(batch, 1, height, width, generator=g)).clamp(-1, 1)  # noqa: E741
    V = (torch.cos(2 * yy - xx) * 0.7 + 0.05 * torch.randn(batch, 1, height, width, generator=g)).clamp(-1, 1)
    x = torch.randn(batch, 3, height, width, generator=g)
    eps = 0.9 * x + 0.3 * torch.randn(batch, 3, height, width, generator=g)
    return [t.to(device) for t in (I, V, x, eps)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(impl: str, I, V, device):  # noqa: E741
    """A closure running one step tail from (x, eps), and its state (fresh, official initial state)."""
    schedule = Schedule.create(STEPS)
    table = schedule.table(device)
    coef = table.coef[0]
    if impl == "official":
        tail, hp = OfficialStyleTail(schedule, STEPS - 1), [official_em_initial(I)]

        def step(x, eps):
            x_prev, _, hp[0] = tail(x, eps, I, V, hp[0])
            return x_prev
        return step
    state = em_init(I)
    if impl == "torch":
        return lambda x, eps: step_tail_torch(x, eps, coef, I, V, state, CFG)[0]
    from ddfm_fast.kernels.em_tail import TailWorkspace, step_tail_triton

    ws = TailWorkspace.create(I)
    return lambda x, eps: step_tail_triton(x, eps, coef, I, V, state, lamb=LAMB, rho=RHO, workspace=ws)[0]


def _round(step, x, eps, device: torch.device, graphed: bool):
    """One benchmark round: ``CALLS`` steps, replayed from one CUDA graph when ``graphed``."""
    if not graphed:
        def run():
            for _ in range(CALLS):
                step(x, eps)
            _sync(device)
        return run
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # FFT plans, kernel builds, workspaces: outside the capture
            step(x, eps)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            step(x, eps)

    def replay():
        graph.replay()
        _sync(device)
    return replay


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", ["official", "torch", "triton"])
def test_step_tail(benchmark, impl, size, bench_device):
    device = bench_device
    if impl == "triton":
        if device.type != "cuda":
            pytest.skip("the Triton tail is benchmarked on CUDA only: on a CPU it runs in Triton's interpreter, "
                        "which measures Python, not the kernels")
        from ddfm_fast.plan import triton_not_supported_reasons

        reasons = triton_not_supported_reasons(device)
        if reasons:
            pytest.skip("Triton cannot run: " + "; ".join(reasons))
    height, width = size
    I, V, x, eps = _inputs(height, width, device)  # noqa: E741

    # Quality: one step from the initial state, against the plain-torch oracle.
    reference = _make_step("torch", I, V, device)(x, eps).clone()
    max_abs = float((_make_step(impl, I, V, device)(x, eps) - reference).abs().max())

    graphed = device.type == "cuda" and impl != "official"
    run = _round(_make_step(impl, I, V, device), x, eps, device, graphed)
    run()  # warm-up
    rounds = 20 if device.type == "cuda" else (10 if height * width <= 256 * 256 else 5)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    nbytes = tail_bytes(1, height, width)
    info = {**device_info(), "cpu_model": cpu_model(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "impl": impl, "shape": f"1x3x{height}x{width}", "nominal_bytes": nbytes, "calls_per_round": CALLS,
            "timing": "one CUDA graph of the calls per round" if graphed else "plain calls", "max_abs_vs_torch": max_abs}
    if benchmark.stats is not None:
        per_step = benchmark.stats.stats.median / CALLS
        info.update(median_step_s=per_step, us_per_step=1e6 * per_step, effective_GBps=nbytes / per_step / 1e9)
    benchmark.extra_info.update(info)
