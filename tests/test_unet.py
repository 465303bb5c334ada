"""The ADM UNet: architecture (state-dict layout), numerics against the official goldens, attention."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddfm_fast.checkpoint import load_model
from numerics import float32_network_atol, max_abs  # noqa: E402 (tests/numerics.py)
from ddfm_fast.unet import (
    ADM256_UNCOND_ARGS,
    ADM256_UNCOND_CONFIG,
    UNetConfig,
    UNetModel,
    legacy_qkv_attention,
    timestep_embedding,
)

# Golden tolerance for one float32 forward of the tiny UNet: the goldens were made by the official code on
# another machine, whose conv/matmul kernels sum in other orders. The bound is derived from the network's shape
# (tests/numerics.py: 1.5e-4 here); measured: 6.3e-6 to 1.1e-5 on an AVX-512 EPYC (1-2 threads, oneDNN on or
# off, AVX2 or default kernels), 1.7e-5 on an AVX2-only EPYC. The official UNetModel run in the same process
# is checked bitwise (SDPA's math kernel) in tests/test_upstream.py where a clone is available.


@pytest.fixture(scope="module")
def tiny_model(reference_dir: Path) -> UNetModel:
    return load_model(
        reference_dir / "tiny_unet.pt", config=reference_dir / "tiny_unet_config.json"
    )


def _max_abs(a: torch.Tensor, b: np.ndarray) -> float:
    return max_abs(a, torch.from_numpy(b))


# -- numerics against the goldens -------------------------------------------------------------


def test_tiny_forward_matches_golden(tiny_model: UNetModel, sampler_golden: dict) -> None:
    x = torch.from_numpy(sampler_golden["unet_forward/x"])
    t = torch.from_numpy(sampler_golden["unet_forward/t"])
    with torch.no_grad():
        out = tiny_model(x, t)
    golden = torch.from_numpy(sampler_golden["unet_forward/out"])
    dev = max_abs(out, golden)
    atol = float32_network_atol(tiny_model, golden)
    print(f"unet_forward max abs deviation: {dev:.3g} (bound {atol:.3g})")
    assert out.shape == (1, 6, 64, 96) and out.dtype == torch.float32
    assert dev <= atol


def test_tiny_first_ddim_step_matches_golden(tiny_model: UNetModel, sampler_golden: dict) -> None:
    x = torch.from_numpy(sampler_golden["ddim10/x_t"][:1])
    t = torch.tensor([int(sampler_golden["ddim10/model_t"][0])])
    assert t.item() == 999
    with torch.no_grad():
        out = tiny_model(x, t)
    golden = torch.cat([torch.from_numpy(sampler_golden["ddim10/model_eps"][:1]),
                        torch.from_numpy(sampler_golden["ddim10/model_var_values"][:1])], dim=1)
    atol = float32_network_atol(tiny_model, golden)
    dev_eps, dev_var = max_abs(out[:, :3], golden[:, :3]), max_abs(out[:, 3:], golden[:, 3:])
    print(f"ddim10 step 0: eps {dev_eps:.3g}, var_values {dev_var:.3g} (bound {atol:.3g})")
    assert dev_eps <= atol and dev_var <= atol


def test_scalar_timestep_broadcasts(tiny_model: UNetModel) -> None:
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = tiny_model(x, torch.tensor(500))
        b = tiny_model(x, torch.tensor([500, 500]))
        c = tiny_model(x, torch.tensor([500]))
    assert a.shape == (2, 6, 16, 24)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_reduced_precision_returns_input_dtype(reference_dir: Path, sampler_golden: dict) -> None:
    # GroupNorm runs in float32 even in a bf16 model; the output comes back in x's dtype.
    model = load_model(
        reference_dir / "tiny_unet.pt",
        config=reference_dir / "tiny_unet_config.json",
        dtype=torch.bfloat16,
    )
    x = torch.from_numpy(sampler_golden["unet_forward/x"])
    with torch.no_grad():
        out = model(x, torch.tensor([500]))
    assert out.dtype == torch.float32
    # bf16 has 8 mantissa bits; measured 0.15 max abs on outputs up to 2.8 with random weights.
    assert _max_abs(out, sampler_golden["unet_forward/out"]) < 0.5


# -- timestep embedding and attention ---------------------------------------------------------


def test_timestep_embedding_is_cos_then_sin() -> None:
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 32)
    half = 16
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t.numpy()[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    assert emb.dtype == torch.float32 and emb.shape == (3, 32)
    # float32 argument rounding at t=999 (|t f| up to 999) limits agreement to ~1e-4 there.
    np.testing.assert_allclose(emb.numpy(), expected, atol=2e-4)
    assert timestep_embedding(t, 33).shape == (3, 33)  # odd widths are zero-padded


def _explicit_legacy_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The checkpoint's QKVAttentionLegacy written out: heads split first, q and k scaled by ch^-1/4."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    s = ch**-0.25
    logits = torch.einsum("bct,bcs->bts", q * s, k * s)
    # softmax in (at least) float32, as the official code does with .float()
    weights = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    weights = weights.to(qkv.dtype)
    return torch.einsum("bts,bcs->bct", weights, v).reshape(b, heads * ch, t)


@pytest.mark.parametrize(
    ("batch", "heads", "ch", "length"), [(1, 1, 16, 64), (2, 3, 5, 37), (3, 4, 7, 19), (1, 2, 64, 129)]
)
# float32: SDPA's fused CPU kernel (online softmax over key blocks) rounds differently from the explicit
# softmax; with |out| up to ~6 here the gap measured 8.4e-6 (about 10 ulp). A wrong scale or head layout is O(1).
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_sdpa_attention_matches_explicit_legacy(batch, heads, ch, length, dtype, atol) -> None:
    gen = torch.Generator().manual_seed(batch * 100 + heads * 10 + ch)
    qkv = 2 * torch.randn(batch, 3 * heads * ch, length, generator=gen, dtype=dtype)
    got = legacy_qkv_attention(qkv, heads)
    want = _explicit_legacy_attention(qkv, heads)
    assert got.shape == (batch, heads * ch, length)
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


# -- architecture -----------------------------------------------------------------------------


def test_adm256_state_dict_layout_on_meta(reference_dir: Path) -> None:
    ref = json.loads((reference_dir / "adm256_keys.json").read_text())
    assert UNetConfig.from_create_model_args(ref["create_model_args"]) == ADM256_UNCOND_CONFIG
    with torch.device("meta"):
        model = UNetModel(ADM256_UNCOND_CONFIG)
    sd = model.state_dict()
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()]
    want = [(e["key"], e["shape"], e["dtype"]) for e in ref["state_dict"]]
    assert got == want
    assert len(sd) == ref["num_state_dict_entries"] == 566
    assert sum(p.numel() for p in model.parameters()) == ref["total_parameters"] == 552_814_086
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


def test_adm256_resolved_settings(reference_dir: Path) -> None:
    resolved = json.loads((reference_dir / "adm256_keys.json").read_text())["resolved"]
    cfg = ADM256_UNCOND_CONFIG
    assert list(cfg.channel_mult) == resolved["channel_mult"]
    assert list(cfg.attention_resolutions) == resolved["attention_ds"]
    assert (cfg.in_channels, cfg.out_channels, cfg.model_channels) == (3, 6, 256)
    assert cfg.heads_for(256) == 4 and cfg.downsample_factor == 32


def test_tiny_state_dict_layout(reference_dir: Path) -> None:
    cfg = UNetConfig.from_create_model_args(json.loads((reference_dir / "tiny_unet_config.json").read_text()))
    assert cfg.channel_mult == (1, 2, 3, 4) and cfg.attention_resolutions == (4, 8)
    weights = torch.load(reference_dir / "tiny_unet.pt", weights_only=True)
    with torch.device("meta"):
        model = UNetModel(cfg)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [(k, v.shape) for k, v in weights.items()]
    assert len(weights) == 274
    assert sum(p.numel() for p in model.parameters()) == 4_474_662


def test_plain_resampling_variant_builds_and_runs() -> None:
    # resblock_updown=False uses conv Downsample ("op") and Upsample ("conv"), as guided-diffusion names them.
    cfg = UNetConfig.from_create_model_args(
        {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
         "attention_resolutions": "16", "num_heads": 2}
    )
    torch.manual_seed(0)
    model = UNetModel(cfg).eval()
    keys = model.state_dict().keys()
    assert "input_blocks.2.0.op.weight" in keys and "output_blocks.1.2.conv.weight" in keys
    assert model.default_steps == 100 and model.config is cfg
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 24), torch.tensor([3, 7]))
    assert out.shape == (2, 3, 16, 24)


# -- configuration ----------------------------------------------------------------------------


def test_config_defaults_and_parsing() -> None:
    cfg = UNetConfig.from_create_model_args({"image_size": 512, "num_channels": 64, "num_res_blocks": 1})
    assert cfg.channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    assert cfg.attention_resolutions == (32,)  # default "16" px at 512
    assert cfg.out_channels == 3 and cfg.num_heads == 1 and cfg.num_head_channels == -1
    assert not cfg.use_scale_shift_norm and not cfg.resblock_updown and cfg.norm_groups == 32
    cfg = UNetConfig.from_create_model_args(
        {"image_size": 128, "num_channels": 64, "num_res_blocks": 2, "channel_mult": "1,2,2",
         "attention_resolutions": 32, "model_path": "ignored.pt"}
    )
    assert cfg.channel_mult == (1, 2, 2) and cfg.attention_resolutions == (4,)
    assert UNetConfig.from_create_model_args(
        {"image_size": 128, "num_channels": 64, "num_res_blocks": 2}
    ).channel_mult == (1, 1, 2, 3, 4)


def test_config_round_trips_through_json() -> None:
    small = UNetConfig.from_create_model_args({"image_size": 512, "num_channels": 64, "num_res_blocks": 1})
    for cfg in (ADM256_UNCOND_CONFIG, small):
        again = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg and hash(again) == hash(cfg)
    assert dict(ADM256_UNCOND_ARGS)["num_channels"] == 256


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        ({"class_cond": True}, NotImplementedError, "class_cond"),
        ({"use_new_attention_order": True}, NotImplementedError, "attention_order"),
        ({"bogus": 1}, ValueError, "bogus"),
        ({"image_size": 96, "channel_mult": ""}, ValueError, "image_size 96"),
        ({"num_head_channels": 24}, ValueError, "num_head_channels"),
    ],
)
def test_config_rejections(extra, error, match) -> None:
    args = {"image_size": 64, "num_channels": 32, "num_res_blocks": 1, **extra}
    with pytest.raises(error, match=match):
        UNetConfig.from_create_model_args(args)


def test_config_requires_core_args() -> None:
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNetConfig.from_create_model_args({"image_size": 64, "num_channels": 32})


def test_gradient_checkpointing_gives_same_gradients() -> None:
    args = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
            "attention_resolutions": "16", "use_scale_shift_norm": True, "resblock_updown": True}
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = UNetModel(UNetConfig.from_create_model_args({**args, "use_checkpoint": use_checkpoint}))
        for p in model.parameters():  # the zero-initialised output layers would hide most gradients
            torch.nn.init.normal_(p, std=0.05)
        model(x, torch.tensor([5, 900])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
