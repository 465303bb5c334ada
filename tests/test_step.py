"""One step, several executions (``ddfm_fast.step``, ``ddfm_fast.sampler``): eager, compiled, reduced precision.

Every execution runs :func:`ddfm_fast.step.ddfm_step`; these tests check that the compiled one equals the eager
one, that nothing falls back in silence, and that compiled steps are cached per shape without tripping Dynamo's
recompile limit. What needs a GPU (CUDA graph capture and replay, fp16 kernels, the Triton tail compiled for
real) is in tests/test_gpu.py, run by ``ddfm-fast bench --suite gpu``.
"""

from __future__ import annotations

import pytest
import torch

import ddfm_fast
from ddfm_fast.benchmarks import psnr_8bit
from ddfm_fast.config import AccelConfig, ConfigError, SamplerConfig
from ddfm_fast.plan import FallbackWarning, triton_not_supported_reasons
from ddfm_fast.sampler import DDFMSampler, NonFiniteError
from ddfm_fast.unet import UNetConfig, UNetModel

TEN = SamplerConfig(steps=10, tau_reduce="batch")  # the golden run's settings


@pytest.fixture(scope="module")
def tiny(reference_dir):
    return ddfm_fast.load_model(reference_dir / "tiny_unet.pt", config=reference_dir / "tiny_unet_config.json")


@pytest.fixture(scope="module")
def inputs(sampler_golden):
    g = sampler_golden
    return tuple(torch.from_numpy(g[k]) for k in ("x_start", "I", "V"))


@pytest.fixture(scope="module")
def reference10(tiny, inputs):
    return DDFMSampler(TEN, AccelConfig(backend="torch")).sample(tiny, *inputs).sample


def _small_model(seed: int = 0) -> UNetModel:
    cfg = UNetConfig.from_create_model_args(dict(image_size=64, num_channels=16, num_res_blocks=1,
                                                 channel_mult="1,2", attention_resolutions="32", num_head_channels=8,
                                                 learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True,
                                                 norm_groups=8))
    torch.manual_seed(seed)
    model = UNetModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # the output conv starts at zero; give every weight a value
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_runner_reuse_gives_the_same_result(tiny, inputs, reference10):
    """A second call of the same shape reuses the runner (buffers reset) and gives the same floats."""
    sampler = DDFMSampler(TEN, AccelConfig(backend="torch"))
    steps = []
    out = sampler.sample(tiny, *inputs, callback=lambda o: steps.append((o.j, o.idx, o.timestep))).sample
    torch.testing.assert_close(out, reference10, rtol=0, atol=0)
    assert [s[1] for s in steps] == list(range(9, -1, -1))
    assert [s[2] for s in steps] == sampler.schedule.timestep_map[::-1].tolist()
    again = sampler.sample(tiny, *inputs).sample
    torch.testing.assert_close(again, reference10, rtol=0, atol=0)
    assert len(sampler._runners) == 1


def test_runners_are_bounded_and_released(tiny, inputs):
    """One runner per shape, at most max_runners (least recently used released first); close() frees them."""
    sampler = DDFMSampler(SamplerConfig(steps=2), max_runners=2)
    x, I, V = inputs  # noqa: E741
    crops = [(slice(None), slice(None), slice(0, h), slice(0, w)) for h, w in ((32, 32), (32, 48), (48, 32))]
    first = sampler.sample(tiny, x[crops[0]], I[crops[0]], V[crops[0]]).sample
    sampler.sample(tiny, x[crops[1]], I[crops[1]], V[crops[1]])
    sampler.sample(tiny, x[crops[0]], I[crops[0]], V[crops[0]])  # (32, 32) is now the most recently used
    sampler.sample(tiny, x[crops[2]], I[crops[2]], V[crops[2]])  # evicts (32, 48)
    assert [k[3:5] for k in sampler._runners] == [(32, 32), (48, 32)]
    again = sampler.sample(tiny, x[crops[0]], I[crops[0]], V[crops[0]]).sample
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    sampler.close()
    assert not sampler._runners
    with pytest.raises(ValueError, match="max_runners"):
        DDFMSampler(SamplerConfig(steps=2), max_runners=0)


@pytest.mark.parametrize("tau_reduce", ["batch", "image"])
def test_whole_step_compiles_with_fullgraph(tiny, inputs, reference10, tau_reduce):
    """Dynamo traces the whole step (UNet + EM + colour + DDIM) with fullgraph=True: any graph break fails.

    The "eager" compile backend runs Dynamo's tracing without inductor's code generation, so this check costs
    seconds; the same function runs in both, so the result is bitwise the eager loop's.
    """
    sampler = DDFMSampler(TEN.replace(tau_reduce=tau_reduce), AccelConfig(compile=True, compile_backend="eager"))
    res = sampler.sample(tiny, *inputs)
    if tau_reduce == "batch":
        torch.testing.assert_close(res.sample, reference10, rtol=0, atol=0)
    assert res.compile_seconds is not None and res.compile_seconds > 0
    assert res.plan.compile and not res.plan.fallbacks


def test_ten_image_sizes_under_compile_never_fall_back_to_eager(tiny):
    """Each runner compiles its own copy of the step: a folder of 10 sizes stays compiled (Dynamo's recompile
    limit is 8 per code object), with a bounded number of runners alive."""
    sampler = DDFMSampler(SamplerConfig(steps=1), AccelConfig(compile=True, compile_backend="eager"), max_runners=3)
    gen = torch.Generator().manual_seed(0)
    for k in range(10):
        h, w = 32, 32 + 8 * k
        x = torch.randn(1, 3, h, w, generator=gen)
        I, V = torch.rand(2, 1, 1, h, w, generator=gen) * 2 - 1  # noqa: E741
        with torch._dynamo.config.patch(error_on_recompile=True):  # a shape change inside one runner fails
            res = sampler.sample(tiny, x, I, V)
        assert res.compile_seconds is not None, f"size {h}x{w} did not compile"
    assert res.plan.compile and res.plan.fallbacks == []
    assert len(sampler._runners) == 3


def test_inductor_compiled_step_matches_eager():
    """A real inductor compile of the step on a small UNet: same result up to fused-kernel rounding."""
    model = _small_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    I, V = torch.rand(2, 1, 1, 32, 32, generator=gen) * 2 - 1  # noqa: E741
    cfg = SamplerConfig(steps=4)
    ref = DDFMSampler(cfg).sample(model, x, I, V).sample
    out = DDFMSampler(cfg, AccelConfig(compile=True)).sample(model, x, I, V).sample
    # Inductor fuses and reorders float32 arithmetic (~1e-6 per op); the EM step amplifies that where
    # I - f_pre ~ 0, as between machines (see test_sampler.py): the end-to-end tolerance.
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype, min_psnr", [("bf16", 40.0), ("fp16", 50.0)])
def test_reduced_precision_unet_stays_close(tiny, inputs, reference10, dtype, min_psnr):
    """bf16 / fp16 UNet body (GroupNorm and softmax in fp32, EM in fp32) against the fp32 path, 8-bit output.

    Measured (10 steps, 64x96, the tiny random-weight model): bf16 48.7 dB, fp16 60.3 dB PSNR against the fp32
    output (bf16 keeps 8 bits of mantissa, fp16 11). The bounds leave ~9 dB of margin; a body left in the wrong
    dtype, or an EM step run in half precision (its 1e-10 epsilons underflow), falls far below them. The GPU
    suite checks fp16 on the paper-size model. The caller's model is never cast in place.
    """
    res = DDFMSampler(TEN, AccelConfig(dtype=dtype)).sample(tiny, *inputs)
    assert next(tiny.parameters()).dtype == torch.float32, "the caller's model was modified"
    assert res.sample.dtype == torch.float32 and res.plan.dtype == dtype
    psnr = psnr_8bit(res.sample, reference10)
    assert psnr >= min_psnr, f"PSNR {psnr:.1f} dB"


def test_options_are_validated():
    with pytest.raises(ConfigError, match="compile_mode"):
        AccelConfig(compile_mode="turbo")
    with pytest.raises(ConfigError, match="dtype"):
        AccelConfig(dtype=torch.int8)
    assert AccelConfig(dtype=torch.float16).dtype == "fp16"
    assert AccelConfig.preset("fast") == AccelConfig.fast()
    with pytest.raises(ConfigError, match="preset"):
        AccelConfig.preset("turbo")


def test_cuda_graphs_on_cpu_are_not_used_and_the_plan_says_so(tiny, inputs, reference10):
    res = DDFMSampler(TEN, AccelConfig(cuda_graphs=True)).sample(tiny, *inputs)
    assert not res.plan.cuda_graphs and "need a CUDA device" in res.plan.describe()
    torch.testing.assert_close(res.sample, reference10, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_step_with_the_triton_tail(tiny, inputs):
    """The Triton tail enters the compiled step as one opaque custom op whose scalars and buffers are arguments.

    ``aot_eager`` functionalises the graph as inductor does (the op may receive copies of the buffers and the
    results are copied back); under TRITON_INTERPRET=1 the kernels run in the interpreter. Bitwise equal to the
    uncompiled Triton loop. (On a GPU, tests/test_gpu.py compiles this with inductor and captures it.)
    """
    if triton_not_supported_reasons("cpu"):
        pytest.skip("; ".join(triton_not_supported_reasons("cpu")))
    cfg = SamplerConfig(steps=3)
    ref = DDFMSampler(cfg, AccelConfig(backend="triton")).sample(tiny, *inputs).sample
    res = DDFMSampler(cfg, AccelConfig(backend="triton", compile=True, compile_backend="aot_eager")).sample(
        tiny, *inputs)
    torch.testing.assert_close(res.sample, ref, rtol=0, atol=0)
    assert res.plan.backend == "triton" and res.plan.compile and not res.plan.fallbacks


@pytest.mark.slow
def test_inductor_compiles_the_step_with_the_triton_tail():
    """Inductor (not only aot_eager) compiles the step with the Triton custom op: what the fast path does on a GPU.

    Inductor's functionalization cannot re-apply a custom op's mutation of a complex tensor; the rfft2 workspace
    goes in as a real view made outside the graph. A regression here shows as a recorded compile fallback.
    """
    if triton_not_supported_reasons("cpu"):
        pytest.skip("; ".join(triton_not_supported_reasons("cpu")))
    model = _small_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    I, V = torch.rand(2, 1, 1, 32, 32, generator=gen) * 2 - 1  # noqa: E741
    cfg = SamplerConfig(steps=3)
    ref = DDFMSampler(cfg, AccelConfig(backend="triton")).sample(model, x, I, V).sample
    res = DDFMSampler(cfg, AccelConfig(backend="triton", compile=True)).sample(model, x, I, V)
    assert res.plan.compile and not res.plan.fallbacks, res.plan.describe()
    # Inductor reorders the UNet's float32 arithmetic (measured 2.8e-5 after 3 steps): the tolerance of the
    # inductor test above.
    torch.testing.assert_close(res.sample, ref, rtol=0, atol=1e-3)


def test_a_cached_copy_never_serves_stale_weights(tiny, inputs):
    """An fp16/bf16 or channels_last run works on a copy of the caller's model; when the caller changes the
    weights in place, the next run copies them again."""
    x, I, V = (t[..., :32, :32] for t in inputs)  # noqa: E741
    model = _small_model()
    sampler = DDFMSampler(SamplerConfig(steps=1), AccelConfig(channels_last=True))
    first = sampler.sample(model, x, I, V).sample
    with torch.no_grad():
        next(model.parameters()).mul_(-3)
    second = sampler.sample(model, x, I, V).sample
    fresh = DDFMSampler(SamplerConfig(steps=1)).sample(model, x, I, V).sample
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, fresh, rtol=0, atol=1e-5)  # channels_last convolutions round differently
    assert len(sampler._runners) == 1 and len(sampler._models) == 1


def test_a_failing_compiler_falls_back_to_eager_and_says_so(tiny, inputs, reference10, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    sampler = DDFMSampler(TEN, AccelConfig(compile=True))
    with pytest.warns(FallbackWarning, match="compile given up.*inductor exploded"):
        res = sampler.sample(tiny, *inputs)
    torch.testing.assert_close(res.sample, reference10, rtol=0, atol=0)
    assert not res.plan.compile and "inductor exploded" in res.plan.fallbacks[0]
    assert sampler.plan("cpu") is res.plan  # later runners read the updated plan: no second attempt


def test_non_finite_weights_fail_naming_the_stage(inputs):
    model = _small_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    x, I, V = (t[..., :32, :32] for t in inputs)  # noqa: E741
    with pytest.raises(NonFiniteError, match="UNet's noise prediction"):
        DDFMSampler(SamplerConfig(steps=2)).sample(model, x, I, V)


@pytest.mark.parametrize("field, value, message", [
    ("lamb", float("nan"), "lamb must be a finite number > 0"),
    ("rho", -1.0, "rho must be a finite number > 0"),
    ("lamb", float("inf"), "lamb must be a finite number > 0"),
    ("seed", 2**64, "seed must be an integer"),
    ("seed", -1, "seed must be an integer"),
    ("steps", "ddimx", "steps 'ddimx'"),
    ("steps", 0, "at least one step"),
])
def test_sampler_config_rejects_bad_values_naming_them(field, value, message):
    with pytest.raises(ConfigError, match=message):
        SamplerConfig(**{field: value})


def test_em_only_steps_are_iterations():
    assert SamplerConfig(prior="none", steps=7).num_steps() == 7
    assert SamplerConfig(prior="none").for_model(None).num_steps() == 100
    with pytest.raises(ConfigError, match="EM iterations"):
        SamplerConfig(prior="none", steps="ddim10")


def test_config_round_trips_to_a_dict():
    cfg = SamplerConfig.paper(steps=(3, 4))
    d = cfg.to_dict()
    assert d["steps"] == [3, 4] and d["size_policy"] == "crop" and d["seed"] == 3407
    assert SamplerConfig(**{**d, "steps": tuple(d["steps"])}) == cfg


def test_steps_are_checked_against_the_models_own_schedule():
    """A respacing must divide the schedule the model was trained with (train_timesteps), not only 1000 steps."""
    assert SamplerConfig(steps=5, train_timesteps=10).num_steps() == 5
    with pytest.raises(ConfigError, match="steps 50"):
        SamplerConfig(steps=50, train_timesteps=10)


def test_respacings_have_one_spelling_and_numpy_integers_are_integers():
    import numpy as np

    assert SamplerConfig(steps="10, 20") == SamplerConfig(steps=(10, 20)) == SamplerConfig(steps=[10, 20])
    assert SamplerConfig(steps=[100]).steps == SamplerConfig(steps="100").steps == 100
    assert SamplerConfig(steps=" ddim 10").steps == "ddim10"
    cfg = SamplerConfig(steps=np.int64(7), seed=np.int64(3), clip=np.True_, train_timesteps=np.int32(1000))
    assert (cfg.steps, cfg.seed, cfg.clip, cfg.train_timesteps) == (7, 3, True, 1000)
    assert type(cfg.seed) is int and type(cfg.clip) is bool
    for bad in (dict(lamb=True), dict(tv_prox="soft", tv_threshold=True)):
        with pytest.raises(ConfigError, match="must be a number"):
            SamplerConfig(**bad)
