"""Checkpoint loading: presets, formats, configs, and one clear error per way a file can be wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ddfm_fast.checkpoint import (
    PRESETS,
    CheckpointError,
    load_model,
    resolve_preset,
    save_safetensors,
)
from ddfm_fast.unet import ADM256_UNCOND_ARGS, UNetModel


@pytest.fixture(scope="module")
def tiny_weights(reference_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(reference_dir / "tiny_unet.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_args(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "tiny_unet_config.json").read_text())


@pytest.fixture(scope="module")
def tiny_model(reference_dir: Path) -> UNetModel:
    return load_model(reference_dir / "tiny_unet.pt", config=reference_dir / "tiny_unet_config.json")


def _same_weights(model: UNetModel, weights: dict[str, torch.Tensor]) -> bool:
    sd = model.state_dict()
    return list(sd) == list(weights) and all(torch.equal(sd[k], weights[k]) for k in weights)


def _load_error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, **kwargs)
    return str(info.value)


# -- successful loads -------------------------------------------------------------------------


def test_load_tiny_pt(tiny_model: UNetModel, tiny_weights) -> None:
    assert _same_weights(tiny_model, tiny_weights)
    assert not tiny_model.training
    assert not any(p.requires_grad for p in tiny_model.parameters())
    assert not any(p.is_meta for p in tiny_model.parameters())
    assert tiny_model.default_steps == 100
    assert tiny_model.config.model_channels == 32


def test_load_with_dict_config_and_dtype(reference_dir: Path, tiny_args, tiny_weights) -> None:
    model = load_model(str(reference_dir / "tiny_unet.pt"), config=tiny_args, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert torch.equal(model.state_dict()["out.2.weight"], tiny_weights["out.2.weight"].double())


def test_load_with_yaml_config(tmp_path: Path, reference_dir: Path, tiny_args, tiny_weights) -> None:
    # The official config style: unquoted comma lists, and a model_path key that is ignored.
    lines = [f"{k}: {v if v != '' else chr(34) * 2}" for k, v in tiny_args.items()]
    yaml_path = tmp_path / "model_config.yaml"
    yaml_path.write_text("\n".join(lines + ["model_path: models/whatever.pt"]) + "\n")
    assert "attention_resolutions: 16,8" in yaml_path.read_text()
    model = load_model(reference_dir / "tiny_unet.pt", config=yaml_path)
    assert _same_weights(model, tiny_weights)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict(tmp_path: Path, tiny_args, tiny_weights, wrapper: str) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: tiny_weights, "epoch": 3}, path)
    assert _same_weights(load_model(path, config=tiny_args), tiny_weights)


def test_legacy_non_zip_pt(tmp_path: Path, tiny_args, tiny_weights) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(tiny_weights, path, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    assert _same_weights(load_model(path, config=tiny_args), tiny_weights)


def test_safetensors_round_trip_carries_config(tmp_path: Path, tiny_model: UNetModel, tiny_weights) -> None:
    path = tmp_path / "sub" / "tiny.safetensors"
    assert save_safetensors(tiny_model, path, metadata={"note": "test", "epochs": 2}) == path
    assert [p.name for p in path.parent.iterdir()] == ["tiny.safetensors"]  # no temp file left
    model = load_model(path)  # no config argument: it comes from the metadata
    assert model.config == tiny_model.config and model.default_steps == 100
    assert _same_weights(model, tiny_weights)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Bitwise: CPU parameters are realigned, so the file format does not change the numerics.
        torch.testing.assert_close(model(x, torch.tensor([10])), tiny_model(x, torch.tensor([10])), rtol=0, atol=0)
    # Overwriting is atomic too and keeps a custom default_steps.
    tiny_model.default_steps = 25
    try:
        save_safetensors(tiny_model, path)
    finally:
        tiny_model.default_steps = 100
    assert load_model(path).default_steps == 25


def test_safetensors_with_official_create_model_args(tmp_path: Path, tiny_args, tiny_weights) -> None:
    path = tmp_path / "official_args.safetensors"
    metadata = {"create_model_args": json.dumps(tiny_args), "default_steps": "50"}
    save_file(dict(tiny_weights), path, metadata=metadata)
    model = load_model(path)
    assert model.default_steps == 50 and model.config.out_channels == 6
    assert _same_weights(model, tiny_weights)


# -- presets ----------------------------------------------------------------------------------


def test_preset_table() -> None:
    preset = PRESETS["adm256-uncond"]
    assert preset.filename == "256x256_diffusion_uncond.pt" and preset.default_steps == 100
    assert dict(preset.create_model_args) == dict(ADM256_UNCOND_ARGS)
    url = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
    assert preset.url == url


def test_missing_preset_file_says_where_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDFM_FAST_HOME", str(tmp_path / "home"))
    msg = _load_error("adm256-uncond")
    assert "256x256_diffusion_uncond.pt" in msg
    assert str(tmp_path / "home" / "256x256_diffusion_uncond.pt") in msg
    assert PRESETS["adm256-uncond"].url in msg and "DDFM_FAST_HOME" in msg


def test_preset_found_in_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDFM_FAST_HOME", str(tmp_path))
    (tmp_path / "256x256_diffusion_uncond.pt").write_bytes(b"placeholder")
    assert resolve_preset("adm256-uncond") == tmp_path / "256x256_diffusion_uncond.pt"
    # The placeholder is not a checkpoint: loading it is an error naming the file, never random weights.
    msg = _load_error("adm256-uncond")
    assert str(tmp_path / "256x256_diffusion_uncond.pt") in msg and "corrupt" in msg


def test_unknown_preset_lists_presets() -> None:
    msg = _load_error("adm512-cond")
    assert "'adm512-cond'" in msg and "adm256-uncond" in msg and "preset" in msg


# -- one clear error per broken file ----------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    msg = _load_error(path)
    assert str(path) in msg and "no such file" in msg


def test_truncated_pt(tmp_path: Path, reference_dir: Path, tiny_args) -> None:
    data = (reference_dir / "tiny_unet.pt").read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    msg = _load_error(path, config=tiny_args)
    assert str(path) in msg and "truncated or corrupt" in msg


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.pth", "empty.pt", "garbage.safetensors"])
def test_garbage_bytes(tmp_path: Path, tiny_args, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else np.random.default_rng(0).bytes(4096))
    msg = _load_error(path, config=tiny_args)
    assert str(path) in msg and "truncated or corrupt" in msg


def test_truncated_safetensors(tmp_path: Path, tiny_model: UNetModel) -> None:
    path = tmp_path / "tiny.safetensors"
    save_safetensors(tiny_model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _load_error(path)
    assert str(path) in msg and "truncated or corrupt" in msg


class _NotATensor:
    """A class the weights-only unpickler must refuse."""


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"a": 1, "b": "text"}, "not a state dict of tensors"),
        ([torch.zeros(2)], "expected a state dict"),
        ({}, "it is empty"),
    ],
)
def test_not_a_tensor_dict(tmp_path: Path, tiny_args, payload, match: str) -> None:
    path = tmp_path / "payload.pt"
    torch.save(payload, path)
    msg = _load_error(path, config=tiny_args)
    assert str(path) in msg and match in msg


def test_pickled_code_is_refused(tmp_path: Path, tiny_args) -> None:
    path = tmp_path / "code.pt"
    torch.save({"a": _NotATensor()}, path)
    msg = _load_error(path, config=tiny_args)
    assert str(path) in msg and "never runs pickled code" in msg


def test_missing_key(tmp_path: Path, tiny_args, tiny_weights) -> None:
    broken = dict(tiny_weights)
    del broken["middle_block.1.qkv.weight"]
    path = tmp_path / "missing_key.pt"
    torch.save(broken, path)
    msg = _load_error(path, config=tiny_args)
    assert str(path) in msg and "1 missing key(s)" in msg and "middle_block.1.qkv.weight" in msg


def test_unexpected_key(tmp_path: Path, tiny_args, tiny_weights) -> None:
    path = tmp_path / "extra_key.pt"
    torch.save({**tiny_weights, "label_emb.weight": torch.zeros(1000, 128)}, path)
    msg = _load_error(path, config=tiny_args)
    assert str(path) in msg and "1 unexpected key(s)" in msg and "label_emb.weight" in msg


def test_wrong_shape(tmp_path: Path, tiny_args, tiny_weights) -> None:
    path = tmp_path / "wrong_shape.safetensors"
    save_file({**tiny_weights, "out.2.weight": torch.zeros(3, 32, 3, 3)}, path)
    msg = _load_error(path, config=tiny_args)
    assert str(path) in msg and "1 shape mismatch(es)" in msg
    assert "out.2.weight: file [3, 32, 3, 3] vs model [6, 32, 3, 3]" in msg


def test_integer_tensor_is_refused(tmp_path: Path, tiny_args, tiny_weights) -> None:
    path = tmp_path / "int.pt"
    torch.save({**tiny_weights, "out.2.bias": torch.zeros(6, dtype=torch.int64)}, path)
    msg = _load_error(path, config=tiny_args)
    assert str(path) in msg and "not floating point" in msg


def test_config_contradicting_weights(reference_dir: Path) -> None:
    path = reference_dir / "tiny_unet.pt"
    for kwargs in ({}, {"config": dict(ADM256_UNCOND_ARGS)}):  # assumed adm256, then given explicitly
        msg = _load_error(path, **kwargs)
        assert str(path) in msg and "do not match the model config" in msg
        assert "--model-config" in msg and "num_channels=256" in msg
    assert "assumed: no config was given" in _load_error(path)


def test_bad_config_files(tmp_path: Path, reference_dir: Path) -> None:
    weights = reference_dir / "tiny_unet.pt"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{ not json")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("image_size: [64\n")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    unknown_key = tmp_path / "unknown.json"
    unknown_key.write_text(json.dumps({"image_size": 64, "num_channels": 32, "num_res_blocks": 1, "wat": 1}))
    cases = [
        (tmp_path / "absent.json", "no such file"),
        (bad_json, "not valid JSON"),
        (bad_yaml, "not valid YAML"),
        (not_mapping, "expected a mapping"),
        (unknown_key, "wat"),
    ]
    for config_path, problem in cases:
        msg = _load_error(weights, config=config_path)
        assert str(config_path) in msg and problem in msg, msg


def test_save_is_atomic_on_failure(
    tmp_path: Path, tiny_model: UNetModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous content")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(tiny_model, path)
    assert path.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
