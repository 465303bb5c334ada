"""The execution plan (``ddfm_fast.plan``): what runs on a device, why a faster path is not taken, what fell back."""

from __future__ import annotations

import pytest

from ddfm_fast.config import AccelConfig
from ddfm_fast.plan import BackendError, FallbackWarning, check_device, plan


def test_backend_choice_and_the_environment_override(monkeypatch):
    monkeypatch.delenv("DDFM_FAST_BACKEND", raising=False)
    assert plan("cpu", AccelConfig(backend="torch")).backend == "torch"
    monkeypatch.setenv("DDFM_FAST_BACKEND", "torch")
    assert plan("cpu", AccelConfig(backend="triton")).backend == "torch"  # the environment overrides the argument
    monkeypatch.setenv("DDFM_FAST_BACKEND", "fast")
    with pytest.raises(BackendError, match="DDFM_FAST_BACKEND"):
        plan("cpu")


def test_auto_says_why_triton_is_not_used(monkeypatch):
    monkeypatch.delenv("DDFM_FAST_BACKEND", raising=False)
    env = {}  # no TRITON_INTERPRET
    p = plan("cpu", AccelConfig(backend="auto"), env)
    assert p.backend == "torch" and any("TRITON_INTERPRET" in r for r in p.reasons)
    with pytest.raises(BackendError, match="cannot run here"):
        plan("cpu", AccelConfig(backend="triton"), env)


def test_fast_preset_on_a_cpu_keeps_the_faithful_path_and_says_why():
    p = plan("cpu", AccelConfig.fast(), {})
    assert (p.dtype, p.compile, p.cuda_graphs) == ("fp32", False, False)
    text = p.describe()
    for word in ("fp16/bf16", "compile", "CUDA graphs"):
        assert word in text, text


def test_explicit_slow_switches_on_a_cpu_are_honoured_with_a_warning():
    p = plan("cpu", AccelConfig(dtype="fp16", compile=True), {})
    assert (p.dtype, p.compile) == ("fp16", True)
    assert any("fp16 on a CPU" in w for w in p.warnings)
    assert any("torch.compile on a CPU" in w for w in p.warnings)
    graphs = plan("cpu", AccelConfig(cuda_graphs=True), {})
    assert graphs.cuda_graphs is False and any("need a CUDA device" in w for w in graphs.warnings)


def test_fallbacks_are_recorded_and_warned():
    p = plan("cpu", AccelConfig(compile=True, compile_backend="eager"), {})
    with pytest.warns(FallbackWarning, match="compile given up: boom"):
        p.fall_back("compile", "boom")
    assert p.compile is False and p.fallbacks == ["compile given up: boom"]
    assert "fell back: compile given up: boom" in p.describe()
    assert p.to_dict()["fallbacks"] == ["compile given up: boom"]


@pytest.mark.parametrize("device, message", [
    ("meta", "runs on 'cpu' or 'cuda'"),
    ("gpu", "not a device name"),
])
def test_devices_that_cannot_run_are_named(device, message):
    with pytest.raises(BackendError, match=message):
        check_device(device)


def test_cuda_on_a_machine_without_it_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendError, match="CUDA is not available"):
        check_device("cuda")


def test_an_environment_override_that_cannot_run_names_the_variable(monkeypatch):
    monkeypatch.setenv("DDFM_FAST_BACKEND", "triton")
    with pytest.raises(BackendError, match="DDFM_FAST_BACKEND=triton cannot run here"):
        plan("cpu", AccelConfig(), {"DDFM_FAST_BACKEND": "triton"})
