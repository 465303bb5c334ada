"""``ddfm-fast serve``: a local web page to fuse two images and watch the diffusion.

The command loads the model once, binds the socket itself (so ``--port 0`` can pick a free port and the start-up
line names the real address), and hands it to uvicorn. Everything heavy (torch, the model, starlette, uvicorn) is
imported inside the command, so ``ddfm-fast --help`` does not pay for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import click

WEB_EXTRA_HINT = "pip install 'ddfm-fast[web]'"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); a one-line error when the address cannot be used."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise click.BadParameter(f"{host!r} is not an address of this computer ({exc.strerror})",
                                 param_hint="--host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host} port {port}: {exc.strerror}") from None
    sock.listen(128)  # connections made as soon as the start-up line is printed wait here until uvicorn accepts
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if sock.family == socket.AF_INET6 else f"http://{host}:{port}/"


def _load_model(checkpoint: Optional[str], model_config: Optional[Path], device: Any) -> Any:
    from ddfm_fast.api import DefaultPriorNotice, resolve_model
    from ddfm_fast.checkpoint import CheckpointError

    if model_config is not None and checkpoint is None:
        raise click.UsageError("--model-config describes a checkpoint's architecture, but no --checkpoint is given "
                               "(the shipped prior has no config)")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DefaultPriorNotice)
            model = resolve_model(checkpoint, model_config=model_config, device=device)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    for w in caught:  # the one-line notice about the shipped prior, without the warnings module's decoration
        if issubclass(w.category, DefaultPriorNotice):
            click.echo(str(w.message), err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model.eval()


@click.command("serve", context_settings={"max_content_width": 100})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Loopback only unless --allow-remote.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port; the start-up line names it).")
@click.option("--checkpoint", default=None,
              help="Checkpoint file or preset name (default: the shipped prior ddfm-shrink; "
                   "'adm256-uncond' is the paper's model).")
@click.option("--model-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The model's create_model arguments (JSON/YAML) when the checkpoint lacks them.")
@click.option("--device", default=None, help="cpu or cuda[:N] (default: CUDA when available).")
@click.option("--allow-remote", is_flag=True,
              help="Allow a --host that is not loopback. The page has no login: anyone who can reach the "
                   "address can use the model and see the images.")
@click.option("--max-upload-mb", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="Largest upload in MiB (the pixel limit is the image reader's, as for 'fuse').")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(1, 1000),
              help="Jobs that may wait behind the running one.")
@click.option("--fast", is_flag=True,
              help="Fuse with AccelConfig.fast(): the fastest path the execution plan knows for the device (on CUDA "
                   "fp16, compile, Triton tail, CUDA graphs; on a CPU fp32 eager, and the start-up line says why). "
                   "Default: the faithful fp32 path.")
def serve_command(host: str, port: int, checkpoint: Optional[str], model_config: Optional[Path],
                  device: Optional[str], allow_remote: bool, max_upload_mb: int, max_queue: int,
                  fast: bool) -> None:
    """Serve a local web page to fuse two images and watch the diffusion.

    \b
    ddfm-fast serve                       # http://127.0.0.1:8000/, the shipped prior
    ddfm-fast serve --checkpoint adm256-uncond --device cuda --fast

    The page takes an infrared + visible pair (or CT / PET / SPECT + MRI), the prior, steps, seed, colour and
    size policy; shows a progress bar with the live x0 estimate; then the fused image beside the sources with a
    before/after slider, the 12 metrics, and PNG / 16-bit PNG downloads. One job runs at a time; others queue;
    Cancel stops the sampler at its next step. Needs the web extra: pip install 'ddfm-fast[web]'.
    """
    try:
        import uvicorn
        import starlette  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"ddfm-fast serve needs the web extra ({exc.name} is not installed): "
                                   f"{WEB_EXTRA_HINT}") from None
    loopback = is_loopback(host)
    if not loopback and not allow_remote:
        raise click.BadParameter(
            f"{host} is not a loopback address; the page has no login, so anyone who can reach it could use "
            "it. Pass --allow-remote to listen there anyway", param_hint="--host")

    from ddfm_fast.api import default_device
    from ddfm_fast.config import AccelConfig
    from ddfm_fast.plan import BackendError, check_device, plan
    from ddfm_fast.web.app import LOOPBACK_HOSTS, create_app
    from ddfm_fast.web.jobs import JobManager, Limits

    try:
        dev = check_device(device) if device is not None else default_device()
    except BackendError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    sock = _bind(host, port)
    model = _load_model(checkpoint, model_config, dev)
    from ddfm_fast.config import DEFAULT_PRIOR

    name = checkpoint or f"{DEFAULT_PRIOR} (shipped)"
    accel = AccelConfig.fast() if fast else AccelConfig()
    manager = JobManager(model, dev, Limits(max_upload_bytes=max_upload_mb * 1024 * 1024, max_queue=max_queue),
                         model_name=name, accel=accel)
    allowed = list(LOOPBACK_HOSTS) + ([host] if host not in LOOPBACK_HOSTS else []) if loopback else None
    app = create_app(manager, allowed_hosts=allowed)
    where = ("loopback only: just this computer can open it" if loopback
             else "NOT loopback: anyone who can reach this address can use it (--allow-remote)")
    # The plan in the start-up line: a fast path not taken says why before the first job runs.
    line = f"ddfm-fast serve: {_url(sock)} ({where}); model {name}, plan {plan(dev, accel).describe()}; Ctrl-C stops"
    try:
        click.echo(line, err=True)
        sys.stderr.flush()
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        _server_class()(config, manager).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C before uvicorn took over the signal: a stop like any other
        pass
    finally:
        manager.close(timeout=5.0)
        sock.close()


def _server_class() -> Any:
    import uvicorn

    class StoppingServer(uvicorn.Server):
        """uvicorn's server, which on Ctrl-C / SIGTERM first cancels the jobs (in the event loop, not inside the
        signal handler, where the manager's lock may be held): the pages following a job get its last state and
        their event streams end, so the graceful shutdown does not wait on them."""

        def __init__(self, config: Any, manager: Any) -> None:
            super().__init__(config)
            self._manager = manager
            self._loop: Optional[asyncio.AbstractEventLoop] = None

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._manager.begin_close)
            super().handle_exit(sig, frame)

    return StoppingServer


if __name__ == "__main__":  # pragma: no cover - ``python -m ddfm_fast.cli_serve`` (the tests start it this way)
    serve_command()
