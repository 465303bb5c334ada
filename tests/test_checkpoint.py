"""Checkpoint loading: presets, formats, configs, and one clear error per way a file can be wrong."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ddfm_fast.checkpoint import (
    META_CONFIG,
    PRESETS,
    CheckpointError,
    load_model,
    resolve_config,
    resolve_preset,
    save_safetensors,
)
from ddfm_fast.unet import ADM256_UNCOND_ARGS, UNetConfig, UNetModel


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
    assert str(path) in msg and "truncated or corrupt" in msg and "weights_only" not in msg


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


class _RunsCode:
    """Unpickling this calls os.mkdir(target): the file would run code if it were ever unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


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


def _save_plain_pickle(obj, path: Path) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=4)


@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle.dump"])
@pytest.mark.parametrize("kind", ["class", "code"])
def test_pickled_objects_are_named_as_such_and_never_run(tmp_path: Path, tiny_args, writer: str, kind: str) -> None:
    target = tmp_path / "code_ran"
    obj = {"a": _NotATensor() if kind == "class" else _RunsCode(target), "w": torch.zeros(2)}
    path = tmp_path / "objects.pt"
    if writer == "pickle.dump":
        _save_plain_pickle(obj, path)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "torch.save")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes the unusual pickle protocol of pickle.dump files
        msg = _load_error(path, config=tiny_args)
    assert not target.exists()  # nothing ran
    named = "test_checkpoint._NotATensor" if kind == "class" else "posix.mkdir"
    assert msg.startswith(f"{path}: holds pickled Python objects ({named}), refused for safety"), msg
    assert "torch.save(model.state_dict()" in msg and "ddfm-fast download --safetensors" in msg
    # torch's own error text advises loading with its weights-only check off, which would run the code.
    assert "weights_only" not in msg and "weights only" not in msg.lower() and "\n" not in msg


def test_a_plain_pickle_of_tensors_is_named_as_such(tmp_path: Path, tiny_args) -> None:
    path = tmp_path / "plain.pt"
    _save_plain_pickle({"w": torch.zeros(2)}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        msg = _load_error(path, config=tiny_args)
    assert msg.startswith(f"{path}: is a plain Python pickle (pickle.dump), not a PyTorch checkpoint"), msg
    assert "weights_only" not in msg


# -- metadata and configs: every field checked ------------------------------------------------


def _with_metadata(tmp_path: Path, weights, metadata: dict[str, str], name: str = "meta.safetensors") -> Path:
    path = tmp_path / name
    save_file(dict(weights), path, metadata=metadata)
    return path


def _unet(**changes) -> dict:
    """Changes to the tiny UNet's UNetConfig.to_dict() (the test fills in the rest)."""
    return changes


_DEEP = "[" * 20000 + "]" * 20000  # 40 kB, within the size bound; json's recursion limit is hit long before


@pytest.mark.parametrize(
    ("config_text", "problem"),
    [
        ("[1, 2]", "expected a mapping of model config fields (a JSON object), found list"),
        ('"a string"', "found str"),
        ("null", "found null"),
        ("{not json", "not valid JSON"),
        (_DEEP, "nested too deeply"),
        ('{"a":' * 10000 + "1" + "}" * 10000, "nested too deeply"),
        ("[" + "1," * 40000 + "1]", "far more than a model config takes"),
        (_unet(channel_mult=[]), "field 'channel_mult' is empty"),
        (_unet(channel_mult="1,2"), "field 'channel_mult' must be a list"),
        (_unet(channel_mult=[1, -2]), "field 'channel_mult' entries must be numbers in (0, 64], got -2"),
        (_unet(channel_mult=[1] * 11), "field 'channel_mult' has 11 entries, more than 10"),
        (_unet(model_channels=-32), "field 'model_channels' must be between 1 and 4096, got -32"),
        (_unet(model_channels=10**12), "field 'model_channels' must be between 1 and 4096"),
        (_unet(model_channels="lots"), "field 'model_channels' must be a whole number, got 'lots' (str)"),
        (_unet(model_channels=True), "field 'model_channels' must be a whole number, got True (bool)"),
        (_unet(model_channels=[32]), "field 'model_channels' must be a whole number"),
        (_unet(num_res_blocks=0), "field 'num_res_blocks' must be between 1 and 32"),
        (_unet(num_heads=0, num_head_channels=-1), "field 'num_heads' must be between 1 and 1024"),
        (_unet(num_heads=3, num_head_channels=-1), "field 'num_heads' gives 3 attention heads"),
        (_unet(in_channels=1), "field 'in_channels' must be between 3 and 3"),
        (_unet(out_channels=5), "field 'out_channels' must be 3"),
        (_unet(dropout=2.0), "field 'dropout' must be in [0, 1)"),
        ('{"dropout": NaN, "model_channels": 32}', "field 'dropout' must be in [0, 1)"),
        (_unet(norm_eps=0), "field 'norm_eps' must be in (0, 1]"),
        (_unet(use_fp16="maybe"), "field 'use_fp16' must be true or false"),
        (_unet(attention_resolutions="16"), "field 'attention_resolutions' must be a list"),
        (_unet(attention_resolutions=[0]), "field 'attention_resolutions' must be between 1"),
        (_unet(norm_groups=5), "not divisible by norm_groups=5"),
        (_unet(wat=1), "unknown UNetConfig field(s): ['wat']"),
        (json.dumps({1: 2}), "unknown create_model argument(s): ['1']"),
    ],
)
def test_metadata_config_fields_are_checked(tmp_path: Path, tiny_weights, tiny_args, config_text, problem: str) -> None:
    if isinstance(config_text, dict):
        config_text = json.dumps({**UNetConfig.from_create_model_args(tiny_args).to_dict(), **config_text})
    path = _with_metadata(tmp_path, tiny_weights, {META_CONFIG: config_text})
    msg = _load_error(path)
    assert msg.startswith(f"the '{META_CONFIG}' metadata of {path}: "), msg
    assert problem in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ({"num_channels": 0}, "field 'num_channels' must be between 1 and 4096, got 0"),
        ({"num_channels": 2**40}, "field 'num_channels' must be between 1 and 4096"),
        ({"channel_mult": "1,0,2"}, "field 'channel_mult' entries must be numbers in (0, 64], got '0'"),
        ({"channel_mult": []}, "field 'channel_mult' is empty"),
        ({"channel_mult": "1,x"}, "field 'channel_mult' entries must be numbers"),
        ({"image_size": 100}, "channel_mult is empty and image_size 100 has no official default"),
        ({"image_size": -64}, "field 'image_size' must be between 1 and 8192"),
        ({"attention_resolutions": "16,abc"}, "field 'attention_resolutions' must be a whole number, got 'abc'"),
        ({"attention_resolutions": "128"}, "field 'attention_resolutions' must be between 1 and 64, got 128"),
        ({"learn_sigma": "perhaps"}, "field 'learn_sigma' must be true or false"),
        ({"num_head_channels": 0}, "field 'num_head_channels' must be between 1 and 16384 (or -1), got 0"),
        ({"num_head_channels": 24}, "not divisible by num_head_channels=24"),
        ({"model_path": 5}, "field 'model_path' must be a string"),
        ({"class_cond": True}, "class_cond=True (class-conditional UNet) is not supported"),
    ],
)
def test_create_model_arguments_are_checked(tmp_path: Path, reference_dir: Path, tiny_weights, tiny_args, args,
                                            problem: str) -> None:
    path = _with_metadata(tmp_path, tiny_weights, {"create_model_args": json.dumps({**tiny_args, **args})})
    msg = _load_error(path)
    assert msg.startswith(f"the 'create_model_args' metadata of {path}: "), msg
    assert problem in msg, msg
    # The same arguments given directly name the dict as the source.
    msg = _load_error(reference_dir / "tiny_unet.pt", config={**tiny_args, **args})
    assert msg.startswith("the given config dict: ") and problem in msg, msg


def test_string_booleans_mean_what_they_say(tmp_path: Path, tiny_args, tiny_weights) -> None:
    # bool("False") is True: a config written with quoted booleans must not flip learn_sigma (6 output channels).
    config, _ = resolve_config({**tiny_args, "learn_sigma": "True", "use_fp16": "false", "num_channels": "32"})
    assert config.out_channels == 6 and config.use_fp16 is False and config.model_channels == 32
    config, _ = resolve_config({**tiny_args, "learn_sigma": "False"})
    assert config.out_channels == 3


@pytest.mark.parametrize(("steps", "problem"), [
    ("abc", "is not a whole number"), ("1e3", "is not a whole number"), ("-3", "is not a whole number"),
    ("0", "= 0 is outside 1..1000"), ("5000", "= 5000 is outside 1..1000"),
    ("9" * 400, "is not a whole number"),
])
def test_out_of_range_default_steps(tmp_path: Path, tiny_weights, tiny_args, steps: str, problem: str) -> None:
    path = _with_metadata(tmp_path, tiny_weights, {"create_model_args": json.dumps(tiny_args), "default_steps": steps})
    msg = _load_error(path)
    assert msg.startswith(f"{path}: metadata field 'default_steps' = ") and problem in msg, msg


def test_deeply_nested_yaml_config(tmp_path: Path, reference_dir: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    msg = _load_error(reference_dir / "tiny_unet.pt", config=path)
    assert msg.startswith(f"model config {path}: ") and ("nested too deeply" in msg or "not valid YAML" in msg), msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_holding_nan_or_inf_are_refused(tmp_path: Path, tiny_args, tiny_weights, bad: float) -> None:
    broken = {k: v.clone() for k, v in tiny_weights.items()}
    broken["out.2.bias"][1] = bad
    path = tmp_path / "nan.pt"
    torch.save(broken, path)
    msg = _load_error(path, config=tiny_args)
    assert msg.startswith(f"{path}: 1 tensor(s) hold NaN or infinite values, first: out.2.bias;"), msg


def test_odd_checkpoint_paths(tmp_path: Path, reference_dir: Path) -> None:
    (tmp_path / "folder.pt").mkdir()
    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "loop.pt").symlink_to(tmp_path / "loop.pt")
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "nowhere.pt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases = {
        "folder.pt": "is a folder",
        "fifo.pt": "is a named pipe (FIFO)",  # refused without opening it (an open would wait for a writer)
        "loop.pt": "is a symbolic link loop",
        "dangling.pt": "is a broken symbolic link",
        "empty.safetensors": "is empty (0 bytes); the file is truncated or corrupt",
    }
    for name, problem in cases.items():
        msg = _load_error(tmp_path / name)
        assert msg.startswith(f"{tmp_path / name}: {problem}"), msg
    raw = os.path.join(os.fsencode(tmp_path), b"bad\xff\nname.pt")
    with open(raw, "wb") as fh:
        fh.write(b"garbage" * 100)
    msg = _load_error(os.fsdecode(raw))
    assert msg.startswith(f"{tmp_path}/bad\\xff\\nname.pt: cannot read this PyTorch checkpoint"), msg
    msg.encode("utf-8")


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
