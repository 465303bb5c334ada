"""download_checkpoint and ``ddfm-fast download`` against a loopback HTTP server (no network needed)."""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ddfm_fast.checkpoint import CheckpointError, load_model
from ddfm_fast.cli_download import download_command
from ddfm_fast.download import DownloadError, download_checkpoint, part_path

CORRUPT = b"this is not a checkpoint\n" * 40000  # ~1 MB, byte 8 is not '{' (not taken for safetensors)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if self.path in ("/tiny_unet.pt", "/256x256_diffusion_uncond.pt"):
            data = srv.payload
        elif self.path == "/corrupt.pt":
            data = CORRUPT
        else:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and srv.honour_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        body = data[start:]
        if srv.cut_after is not None:  # simulate a dropped connection
            body = body[: srv.cut_after]
            srv.cut_after = None
            self.close_connection = True
        self.wfile.write(body)
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, payload: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.payload = payload
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None
        self.honour_range = True

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture(scope="module")
def payload(reference_dir: Path) -> bytes:
    return (reference_dir / "tiny_unet.pt").read_bytes()


@pytest.fixture
def config(reference_dir: Path) -> Path:
    return reference_dir / "tiny_unet_config.json"


@pytest.fixture
def server(payload: bytes):
    srv = _Server(payload)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def test_full_download_is_verified_and_loads(server, payload, config, tmp_path):
    dest = tmp_path / "w" / "tiny_unet.pt"
    out = download_checkpoint(server.url("/tiny_unet.pt"), dest, config=config, progress=False,
                              expected_size=len(payload))
    assert out == dest and dest.read_bytes() == payload
    assert not part_path(dest).exists()
    assert server.requests == [("/tiny_unet.pt", None)]
    load_model(dest, config=config)


def test_interrupted_download_resumes_with_range(server, payload, config, tmp_path):
    dest = tmp_path / "tiny_unet.pt"
    server.cut_after = 5_000_000
    with pytest.raises(DownloadError) as err:
        download_checkpoint(server.url("/tiny_unet.pt"), dest, config=config, progress=False, chunk=1 << 16)
    msg = str(err.value)
    assert server.url("/tiny_unet.pt") in msg and "resume" in msg
    part = part_path(dest)
    assert part.is_file() and 0 < part.stat().st_size < len(payload) and not dest.exists()
    have = part.stat().st_size

    download_checkpoint(server.url("/tiny_unet.pt"), dest, config=config, progress=False)
    assert server.requests[-1] == ("/tiny_unet.pt", f"bytes={have}-")
    assert dest.read_bytes() == payload and not part.exists()


def test_server_ignoring_range_restarts(server, payload, config, tmp_path):
    dest = tmp_path / "tiny_unet.pt"
    part_path(dest).write_bytes(b"garbage that must not survive")
    server.honour_range = False
    download_checkpoint(server.url("/tiny_unet.pt"), dest, config=config, progress=False)
    assert server.requests[-1][1] is not None  # a Range was asked for, and a 200 came back
    assert dest.read_bytes() == payload


def test_short_file_keeps_part_and_names_sizes(server, payload, config, tmp_path):
    dest = tmp_path / "tiny_unet.pt"
    with pytest.raises(DownloadError) as err:
        download_checkpoint(server.url("/tiny_unet.pt"), dest, config=config, progress=False,
                            expected_size=len(payload) + 10)
    msg = str(err.value)
    assert str(part_path(dest)) in msg and str(len(payload)) in msg and str(len(payload) + 10) in msg
    assert part_path(dest).stat().st_size == len(payload) and not dest.exists()


def test_corrupt_file_is_rejected_and_removed(server, config, tmp_path):
    dest = tmp_path / "corrupt.pt"
    with pytest.raises(CheckpointError) as err:
        download_checkpoint(server.url("/corrupt.pt"), dest, config=config, progress=False)
    assert str(dest) in str(err.value) and "not a loadable checkpoint" in str(err.value)
    assert not dest.exists() and not part_path(dest).exists()


def test_http_404_is_a_clear_error(server, config, tmp_path):
    url = server.url("/nothing.pt")
    with pytest.raises(DownloadError, match="404") as err:
        download_checkpoint(url, tmp_path / "x.pt", config=config, progress=False)
    assert url in str(err.value)
    assert not (tmp_path / "x.pt").exists()


def test_connection_refused_is_a_clear_error(config, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/tiny_unet.pt"
    with pytest.raises(DownloadError, match="cannot connect") as err:
        download_checkpoint(url, tmp_path / "x.pt", config=config, progress=False, timeout=5)
    assert url in str(err.value)


def _cli() -> click.Group:
    group = click.Group()
    group.add_command(download_command)
    return group


def test_cli_download_safetensors_and_skip(server, payload, config, tmp_path):
    runner = CliRunner()
    args = ["download", "--url", server.url("/tiny_unet.pt"), "--to", str(tmp_path),
            "--model-config", str(config), "--safetensors", "-q"]
    res = runner.invoke(_cli(), args)
    assert res.exit_code == 0, res.output
    dest, st = tmp_path / "tiny_unet.pt", tmp_path / "tiny_unet.safetensors"
    assert dest.read_bytes() == payload
    assert str(dest) in res.output
    model = load_model(st)  # config comes from the safetensors metadata
    assert model.config == load_model(dest, config=config).config
    n = len(server.requests)

    res = runner.invoke(_cli(), args)
    assert res.exit_code == 0, res.output
    assert "already there" in res.output and len(server.requests) == n

    res = runner.invoke(_cli(), [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert len(server.requests) == n + 1


def test_cli_preset_without_url_and_errors(server, config, tmp_path, monkeypatch):
    monkeypatch.setenv("DDFM_FAST_HOME", str(tmp_path))
    runner = CliRunner()
    res = runner.invoke(_cli(), ["download", "ddfm-small"])
    assert res.exit_code != 0 and "no download URL" in res.output
    res = runner.invoke(_cli(), ["download", "nope"])
    assert res.exit_code != 0 and "unknown preset" in res.output
    res = runner.invoke(_cli(), ["download", "--url", server.url("/missing.pt"), "--model-config", str(config)])
    assert res.exit_code == 1 and "404" in res.output and server.url("/missing.pt") in res.output


def test_cli_default_preset_in_weights_home(server, payload, config, tmp_path, monkeypatch):
    # A mirror with the preset's file name lands where `--checkpoint adm256-uncond` looks for it.
    monkeypatch.setenv("DDFM_FAST_HOME", str(tmp_path))
    url = server.url("/256x256_diffusion_uncond.pt")
    res = CliRunner().invoke(_cli(), ["download", "--url", url, "--model-config", str(config), "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "256x256_diffusion_uncond.pt").read_bytes() == payload
    assert "`--checkpoint adm256-uncond` now finds it" in res.output


# -- this machine's file system failing, not the network ----------------------------------------


def test_destination_under_a_regular_file(server, config, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DownloadError) as err:
        download_checkpoint(server.url("/tiny_unet.pt"), tmp_path / "file" / "w.pt", config=config, progress=False)
    assert str(err.value).startswith(f"{tmp_path / 'file'}: cannot create the folder to download into")
    assert server.requests == []  # nothing was fetched


def test_destination_or_part_that_is_a_folder(server, config, tmp_path):
    for taken in (tmp_path / "a" / "w.pt", part_path(tmp_path / "b" / "w.pt")):
        taken.mkdir(parents=True)
        dest = taken if taken.suffix == ".pt" else taken.with_name("w.pt")
        with pytest.raises(DownloadError, match="exists and is not a regular file") as err:
            download_checkpoint(server.url("/tiny_unet.pt"), dest, config=config, progress=False)
        assert str(taken) in str(err.value)


def test_a_full_disk_keeps_what_was_written(server, payload, config, tmp_path, monkeypatch):
    dest = tmp_path / "tiny_unet.pt"
    real_open = Path.open

    class _FullAfterOneChunk:
        def __init__(self, fh):
            self.fh, self.writes = fh, 0

        def write(self, data):
            self.writes += 1
            if self.writes > 1:
                raise OSError(28, "No space left on device")
            return self.fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def open_part(self, mode="r", *args, **kwargs):
        fh = real_open(self, mode, *args, **kwargs)
        return _FullAfterOneChunk(fh) if self.name.endswith(".part") and mode in ("wb", "ab") else fh

    monkeypatch.setattr(Path, "open", open_part)
    with pytest.raises(DownloadError) as err:
        download_checkpoint(server.url("/tiny_unet.pt"), dest, config=config, progress=False, chunk=1 << 16)
    msg = str(err.value)
    assert msg.startswith(f"{part_path(dest)}: cannot write the partial download (no space left on the device).")
    assert f"{1 << 16} bytes are kept" in msg and "resume" in msg
    monkeypatch.setattr(Path, "open", real_open)
    download_checkpoint(server.url("/tiny_unet.pt"), dest, config=config, progress=False)  # the resume completes
    assert dest.read_bytes() == payload


def test_a_failing_safetensors_copy_is_named(server, config, tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ddfm_fast.download.save_safetensors", no_space)
    dest = tmp_path / "tiny_unet.pt"
    with pytest.raises(DownloadError) as err:
        download_checkpoint(server.url("/tiny_unet.pt"), dest, config=config, progress=False, to_safetensors=True)
    assert str(err.value).startswith(f"{tmp_path / 'tiny_unet.safetensors'}: cannot write the .safetensors copy "
                                     "(no space left on the device).")
    assert part_path(dest).is_file()  # the verified download is kept for the next try


@pytest.mark.parametrize("url, words", [("notaurl", "is not an http(s)"), ("http://[::1", "is not a URL"),
                                        ("http://h:xx/a", "is not a URL")])
def test_a_malformed_url_names_the_option(tmp_path, url, words):
    res = CliRunner().invoke(_cli(), ["download", "--url", url, "--to", str(tmp_path / "w")])
    assert res.exit_code == 2 and "--url" in res.output and words in res.output, res.output
    assert not (tmp_path / "w").exists()
