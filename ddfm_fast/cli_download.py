"""``ddfm-fast download``: fetch a preset's weights into the folder that ``--checkpoint PRESET`` searches.

The checkpoint code (and torch) is imported when the command runs, so ``ddfm-fast download --help`` is fast.
"""

from __future__ import annotations

import posixpath
import urllib.parse
from pathlib import Path

import click

DEFAULT_PRESET_NAME = "adm256-uncond"  # ddfm_fast.checkpoint.DEFAULT_PRESET (tests/test_hostile.py keeps them equal)


def _url_filename(url: str) -> str:
    return posixpath.basename(urllib.parse.urlparse(url).path)


@click.command("download")
@click.argument("preset", default=DEFAULT_PRESET_NAME, metavar="[PRESET]")
@click.option(
    "--to",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder to save into [default: $DDFM_FAST_HOME or ~/.cache/ddfm-fast, where presets are looked up].",
)
@click.option("--url", default=None, help="Download from this URL (a mirror) instead of the preset's URL; "
              "the file is named after the URL's last path component.")
@click.option("--model-config", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="JSON/YAML create_model arguments to verify the file against [default: the preset's].")
@click.option("--safetensors", "to_safetensors", is_flag=True,
              help="Also write a .safetensors copy (weights and config) beside the file.")
@click.option("--force", is_flag=True, help="Download again even if the file is already there.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def download_command(
    preset: str,
    folder: Path | None,
    url: str | None,
    model_config: Path | None,
    to_safetensors: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Download the weights of PRESET (default adm256-uncond), resumable and verified.

    An interrupted download resumes where it stopped when the command is run again. The file is
    checked (size, and a strict load into the model) before it takes its final name.
    """
    from ddfm_fast.checkpoint import PRESETS, CheckpointError, load_model, save_safetensors, weights_home
    from ddfm_fast.download import download_checkpoint

    if preset not in PRESETS:
        raise click.UsageError(f"unknown preset '{preset}' (presets: {', '.join(sorted(PRESETS))})")
    spec = PRESETS[preset]
    if spec.analytic:
        raise click.ClickException(f"preset '{preset}' is built into ddfm-fast (no weights): nothing to download.")
    if url is not None:  # a mirror: checked before any folder is made or any byte is fetched
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise click.BadParameter(f"{url!r} is not a URL ({exc})", param_hint="--url") from exc
        if parts.scheme not in ("http", "https", "file") or not (parts.netloc or parts.scheme == "file"):
            raise click.BadParameter(f"{url!r} is not an http(s) (or file:) URL", param_hint="--url")
    if url is None:
        if not spec.url:
            why = " it ships with ddfm-fast and needs no download" if spec.packaged else ""
            raise click.ClickException(f"preset '{preset}' has no download URL;{why or ' pass one with --url'}.")
        url = spec.url
    filename = spec.filename if url == spec.url else (_url_filename(url) or spec.filename)
    home = weights_home()
    folder = (folder or home).expanduser()
    dest = folder / filename
    config = model_config if model_config is not None else dict(spec.create_model_args)
    st_path = dest.with_suffix(".safetensors")

    try:
        if dest.is_file() and not force:
            click.echo(f"{dest} is already there (use --force to download it again).")
            if to_safetensors and dest.suffix.lower() != ".safetensors" and not st_path.is_file():
                save_safetensors(load_model(dest, config=config), st_path, metadata={"source_url": url})
        else:
            click.echo(f"Downloading {url}\n  to {dest}", err=True)
            download_checkpoint(
                url, dest, config=config, progress=not quiet, to_safetensors=to_safetensors
            )
            click.echo(f"Saved {dest} (verified: complete and loads strictly).")
    except CheckpointError as exc:  # DownloadError is one
        raise click.ClickException(str(exc)) from exc

    if to_safetensors and st_path.is_file():
        click.echo(f"safetensors copy: {st_path}")
    if filename == spec.filename:
        if folder.resolve() == home.resolve():
            click.echo(f"`--checkpoint {preset}` now finds it.")
        else:
            click.echo(
                f"`--checkpoint {preset}` finds it with DDFM_FAST_HOME={folder}; "
                f"or pass `--checkpoint {dest}`."
            )
    else:
        click.echo(f"Use it with `--checkpoint {dest}`.")
