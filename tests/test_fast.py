"""The fast path on CPU: static-buffer step logic, graph-break-free compilation, reduced-precision UNet.

What needs a GPU (CUDA graph capture and replay, fp16 kernels, the Triton tail compiled for real) is in
tests/test_gpu.py, run by ``ddfm-fast bench --suite gpu``.
"""

from __future__ import annotations

import pytest
import torch

import ddfm_fast
from ddfm_fast.benchmarks import psnr_8bit
from ddfm_fast.fast import FastDDFMSampler, FastOptions
from ddfm_fast.sampler import DDFMSampler
from ddfm_fast.unet import UNetConfig, UNetModel


@pytest.fixture(scope="module")
def tiny(reference_dir):
    return ddfm_fast.load_model(reference_dir / "tiny_unet.pt", config=reference_dir / "tiny_unet_config.json")


@pytest.fixture(scope="module")
def inputs(sampler_golden):
    g = sampler_golden
    return tuple(torch.from_numpy(g[k]) for k in ("x_start", "I", "V"))


@pytest.fixture(scope="module")
def reference10(tiny, inputs):
    return DDFMSampler(10, backend="torch").sample(tiny, *inputs).sample


def test_static_buffers_and_device_step_counter_equal_the_eager_loop(tiny, inputs, reference10):
    """Same ops over preallocated buffers, coefficients read by a device counter: bitwise the same result."""
    sampler = FastDDFMSampler(10, backend="torch")
    steps = []
    out = sampler.sample(tiny, *inputs, callback=lambda o: steps.append(o.idx)).sample
    torch.testing.assert_close(out, reference10, rtol=0, atol=0)
    assert steps == list(range(9, -1, -1))
    runner = next(iter(sampler._runners.values()))
    assert int(runner.buf.j) == 10
    # A second call of the same shape reuses the buffers (the runner resets them) and gives the same result.
    again = sampler.sample(tiny, *inputs).sample
    torch.testing.assert_close(again, reference10, rtol=0, atol=0)
    assert len(sampler._runners) == 1


def test_runners_are_bounded_and_released(tiny, inputs):
    """One runner per shape, at most max_runners (least recently used released first); close() frees them all,
    including their registration for the Triton custom op."""
    from ddfm_fast import fast

    sampler = FastDDFMSampler(2, backend="torch", max_runners=2)
    x, I, V = inputs  # noqa: E741
    crops = [(slice(None), slice(None), slice(0, h), slice(0, w)) for h, w in ((32, 32), (32, 48), (48, 32))]
    first = sampler.sample(tiny, x[crops[0]], I[crops[0]], V[crops[0]]).sample
    sampler.sample(tiny, x[crops[1]], I[crops[1]], V[crops[1]])
    sampler.sample(tiny, x[crops[0]], I[crops[0]], V[crops[0]])  # (32, 32) is now the most recently used
    kept = dict(sampler._runners)
    sampler.sample(tiny, x[crops[2]], I[crops[2]], V[crops[2]])  # evicts (32, 48)
    assert [k[-3:-1] for k in sampler._runners] == [(32, 32), (48, 32)]
    evicted = [r for k, r in kept.items() if k[-3:-1] == (32, 48)][0]
    assert evicted.handle not in fast._RUNNERS
    assert all(r.handle in fast._RUNNERS for r in sampler._runners.values())
    again = sampler.sample(tiny, x[crops[0]], I[crops[0]], V[crops[0]]).sample
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    handles = [r.handle for r in sampler._runners.values()]
    sampler.close()
    assert not sampler._runners and not any(h in fast._RUNNERS for h in handles)
    with pytest.raises(ValueError, match="max_runners"):
        FastDDFMSampler(2, max_runners=0)


@pytest.mark.parametrize("tau_reduce", ["batch", "image"])
def test_whole_step_compiles_with_fullgraph(tiny, inputs, reference10, tau_reduce):
    """Dynamo traces the whole step (UNet + EM + colour + DDIM) with fullgraph=True: any graph break fails.

    The "eager" compile backend runs dynamo's tracing without inductor's code generation, so this check costs
    seconds; numerics of a real inductor compile are checked on a small model below.
    """
    torch._dynamo.reset()
    sampler = FastDDFMSampler(10, backend="torch", tau_reduce=tau_reduce,
                              options=FastOptions(compile=True, compile_backend="eager"))
    out = sampler.sample(tiny, *inputs).sample
    if tau_reduce == "batch":
        torch.testing.assert_close(out, reference10, rtol=0, atol=0)
    runner = next(iter(sampler._runners.values()))
    assert runner.compile_seconds is not None and runner.compile_seconds > 0


def test_inductor_compiled_step_matches_eager():
    """A real inductor compile of the step on a small UNet: same result up to fused-kernel rounding."""
    torch._dynamo.reset()
    cfg = UNetConfig.from_create_model_args(dict(image_size=64, num_channels=16, num_res_blocks=1,
                                                 channel_mult="1,2", attention_resolutions="32", num_head_channels=8,
                                                 learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True,
                                                 norm_groups=8))
    torch.manual_seed(0)
    model = UNetModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # the output conv starts at zero; give every weight a value
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    I, V = torch.rand(2, 1, 1, 32, 32, generator=gen) * 2 - 1  # noqa: E741
    ref = DDFMSampler(4, backend="torch").sample(model, x, I, V).sample
    out = FastDDFMSampler(4, backend="torch", options=FastOptions(compile=True)).sample(model, x, I, V).sample
    # Inductor fuses and reorders float32 arithmetic (~1e-6 per op); the EM step amplifies that where
    # I - f_pre ~ 0, as between machines (see test_sampler.py): the end-to-end tolerance.
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype, min_psnr", [(torch.bfloat16, 40.0), (torch.float16, 50.0)])
def test_reduced_precision_unet_stays_close(reference_dir, inputs, reference10, dtype, min_psnr):
    """bf16 UNet body (GroupNorm and softmax in fp32, EM in fp32) against the fp32 path, on the 8-bit output.

    Measured here (10 steps, 64x96, the tiny random-weight model): bf16 48.7 dB, fp16 60.3 dB PSNR against the
    fp32 output (bf16 keeps 8 bits of mantissa, fp16 11). The bounds leave ~9 dB of margin; a body left in the
    wrong dtype, or an EM step run in half precision (its 1e-10 epsilons underflow), falls far below them.
    The GPU suite checks fp16 on the paper-size model.
    """
    model = ddfm_fast.load_model(reference_dir / "tiny_unet.pt", config=reference_dir / "tiny_unet_config.json")
    out = FastDDFMSampler(10, backend="torch", options=FastOptions(dtype=dtype)).sample(model, *inputs).sample
    assert next(model.parameters()).dtype == dtype and out.dtype == torch.float32
    psnr = psnr_8bit(out, reference10)
    assert psnr >= min_psnr, f"PSNR {psnr:.1f} dB"


def test_options_are_validated_and_described():
    assert FastOptions.preset("fast").describe() == "fp16+compile(max-autotune-no-cudagraphs)+cuda_graphs"
    assert FastOptions().describe() == "fp32"
    with pytest.raises(ValueError, match="compile_mode"):
        FastOptions(compile_mode="turbo")
    with pytest.raises(ValueError, match="dtype"):
        FastOptions(dtype=torch.int8)


def test_cuda_graphs_on_cpu_say_they_are_not_used(tiny, inputs, reference10):
    sampler = FastDDFMSampler(10, backend="torch", options=FastOptions(cuda_graphs=True))
    with pytest.warns(RuntimeWarning, match="cuda_graphs needs a CUDA device"):
        out = sampler.sample(tiny, *inputs).sample
    torch.testing.assert_close(out, reference10, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_step_with_the_triton_tail(tiny, inputs):
    """The Triton tail enters the compiled step as one opaque custom op with declared mutations.

    ``aot_eager`` functionalises the graph as inductor does (the op may receive copies of the buffers and the
    results are copied back); under TRITON_INTERPRET=1 the kernels run in the interpreter. Bitwise equal to the
    uncompiled Triton loop. (On a GPU, tests/test_gpu.py compiles this with inductor and captures it.)
    """
    from ddfm_fast.dispatch import triton_not_supported_reasons

    if triton_not_supported_reasons("cpu"):
        pytest.skip("; ".join(triton_not_supported_reasons("cpu")))
    torch._dynamo.reset()
    ref = DDFMSampler(3, backend="triton").sample(tiny, *inputs).sample
    sampler = FastDDFMSampler(3, backend="triton",
                              options=FastOptions(compile=True, compile_backend="aot_eager"))
    out = sampler.sample(tiny, *inputs).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert next(iter(sampler._runners.values())).backend.name == "triton"


def test_a_failing_compiler_falls_back_to_eager_and_says_so(tiny, inputs, reference10, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    sampler = FastDDFMSampler(10, backend="torch", options=FastOptions(compile=True))
    with pytest.warns(RuntimeWarning, match="torch.compile of the step failed.*inductor exploded"):
        out = sampler.sample(tiny, *inputs).sample
    torch.testing.assert_close(out, reference10, rtol=0, atol=0)
    assert "inductor exploded" in next(iter(sampler._runners.values())).notes[0]
