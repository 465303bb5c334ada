"""``ddfm_fast.cli_options``: one flag per config field, one settings builder, errors that name the flag."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from ddfm_fast import cli_options as opts
from ddfm_fast.cli_fuse import fuse_command
from ddfm_fast.cli_score import score_command
from ddfm_fast.config import AccelConfig, SamplerConfig
from ddfm_fast.runner import RunConfig


@click.command()
@opts.model_options
@opts.sampler_options
@opts.run_options
@opts.accel_options
@click.pass_context
def probe(ctx: click.Context, **groups) -> None:
    """Builds the RunConfig the flags describe and keeps it (a command with only the shared groups)."""
    probe.built = opts.build_run(ctx, mode="ivf", **groups)  # type: ignore[attr-defined]


def build(*args: str) -> RunConfig:
    res = CliRunner().invoke(probe, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return probe.built  # type: ignore[attr-defined]


def usage(*args: str) -> str:
    res = CliRunner().invoke(probe, list(args))
    assert res.exit_code == 2, res.output
    return res.output


def _flags(command: click.Command) -> set[str]:
    return {o for p in command.params for o in [*p.opts, *p.secondary_opts]}


def test_every_config_field_is_one_flag_on_fuse_and_score() -> None:
    assert set(opts.SAMPLER_OPTIONS) == {f.name for f in dataclasses.fields(SamplerConfig)}
    assert set(opts.ACCEL_OPTIONS) == {f.name for f in dataclasses.fields(AccelConfig)}
    for name, (decls, _) in {**opts.SAMPLER_OPTIONS, **opts.ACCEL_OPTIONS}.items():
        assert decls[0].split("/")[0] == opts.flag(name), name
    for command in (fuse_command, score_command):
        assert {opts.flag(n) for n in [*opts.SAMPLER_OPTIONS, *opts.ACCEL_OPTIONS]} | {"--fast", "--paper"} \
            <= _flags(command), command.name


def test_defaults_are_the_configs_defaults() -> None:
    run = build()
    assert run.sampler == SamplerConfig() and run.accel == AccelConfig() and run.batch_size == 1
    assert build("--fast").accel == AccelConfig.fast()  # the preset, defined once, in config.py
    assert build("--fast", "--dtype", "fp32", "--no-compile").accel == AccelConfig.fast(dtype="fp32", compile=False)
    assert build("--dtype", "auto").accel == AccelConfig(dtype=None)
    assert build("--compile", "--compile-backend", "eager").accel == AccelConfig(compile=True, compile_backend="eager")
    run = build("--steps", "ddim5", "--seed", "7", "--no-clip", "--tau-reduce", "batch", "--train-timesteps", "500")
    assert run.sampler == SamplerConfig(steps="ddim5", seed=7, clip=False, tau_reduce="batch", train_timesteps=500)


def test_config_errors_name_the_flag() -> None:
    assert "--tv-prox soft needs an explicit --tv-threshold" in usage("--tv-prox", "soft")
    assert "--tv-threshold is only used with --tv-prox soft" in usage("--tv-threshold", "0.1")
    assert "Error: --steps 'ddimx'" in usage("--steps", "ddimx")
    assert "--steps with prior 'none' count EM iterations" in usage("--prior", "none", "--steps", "ddim5")
    assert "--checkpoint is not used with --prior none" in usage("--prior", "none", "--checkpoint", "x.pt")
    assert "--lamb" in usage("--lamb", "0")  # click's range check
    assert "--seed" in usage("--seed", "-1")


# A value per sampler field that the paper's protocol does not use (steps may differ: another model's own).
CONTRADICTIONS = {"prior": "none", "seed": "1", "lamb": "0.25", "rho": "0.01", "tau_reduce": "image",
                  "clip": None, "tv_prox": "soft", "tv_threshold": "0.1", "size_policy": "pad",
                  "train_timesteps": "500"}


@pytest.mark.parametrize("field", sorted(CONTRADICTIONS))
def test_paper_rejects_each_contradicting_sampler_flag(field: str) -> None:
    assert set(CONTRADICTIONS) == {f.name for f in dataclasses.fields(SamplerConfig)} - {"steps"}
    value = CONTRADICTIONS[field]
    args = ["--no-clip"] if value is None else [opts.flag(field), value]
    text = usage("--paper", *args)
    paper_value = getattr(SamplerConfig.paper(), field)
    assert "--paper sets the official protocol" in text and f"{' '.join(args)} (the paper uses {paper_value})" in text


def test_paper_is_the_preset_with_its_model() -> None:
    from ddfm_fast.checkpoint import DEFAULT_PRESET

    run = build("--paper", "--seed", "3407", "--size-policy", "crop")  # agreeing flags are fine
    assert run.sampler == SamplerConfig.paper(steps=None) and run.checkpoint == DEFAULT_PRESET
    run = build("--paper", "--steps", "10", "--checkpoint", "ddfm-small", "--fast")
    assert run.sampler == SamplerConfig.paper(steps=10) and run.checkpoint == "ddfm-small"
    assert "--batch-size 2" in usage("--paper", "--batch-size", "2")


def test_usage_error_translation() -> None:
    from ddfm_fast.config import ConfigError

    text = str(opts.usage_error(ConfigError("size_policy must be one of pad, crop, got 'x'")))
    assert text == "--size-policy must be one of pad, crop, got 'x'"
    assert str(opts.usage_error(ConfigError("compile_backend must be one of inductor"))) == \
        "--compile-backend must be one of inductor"
