"""Download a checkpoint with resume and verification (standard library ``urllib`` only).

``download_checkpoint`` writes into ``<dest>.part`` beside the destination. An existing ``.part`` is
resumed with an HTTP ``Range`` request; a server that answers ``200`` instead of ``206`` sends the whole
file again, which is then written from the start. When the transfer ends, the size is checked against
the server's length and ``expected_size``, and the file is loaded strictly with
:func:`ddfm_fast.checkpoint.load_model`; only a file that passes both is renamed to ``dest``. Network
errors and short transfers keep the ``.part`` so that the next call resumes it; a file that downloads
completely but does not load is removed.
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ddfm_fast.checkpoint import CheckpointError, ConfigLike, PathLike, load_model, save_safetensors
from ddfm_fast.io import display_name

__all__ = ["DownloadError", "download_checkpoint", "part_path"]

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


class DownloadError(CheckpointError):
    """A download failed (network, HTTP status or size); the message names the URL or file and what to do."""


def part_path(dest: PathLike) -> Path:
    """The partial file ``download_checkpoint`` writes (and resumes) for ``dest``: ``<dest>.part``."""
    dest = Path(dest).expanduser()
    return dest.with_name(dest.name + ".part")


def _user_agent() -> str:
    from ddfm_fast import __version__

    return f"ddfm-fast/{__version__} (+python urllib)"


def _open(url: str, start: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _local_error(path: Path, doing: str, exc: OSError, part: Path | None = None) -> DownloadError:
    """A failure of this machine's file system (not the network), naming the file and what was being done."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    have = part.stat().st_size if part is not None and part.is_file() else 0
    keep = f" {have} bytes are kept in {display_name(part)}; run the download again to resume." if have else ""
    return DownloadError(f"{display_name(path)}: cannot {doing} ({reason}).{keep}")


def _network_error(url: str, part: Path, exc: BaseException) -> DownloadError:
    have = part.stat().st_size if part.exists() else 0
    if isinstance(exc, urllib.error.HTTPError):
        what = f"HTTP {exc.code} {exc.reason}"
    elif isinstance(exc, urllib.error.URLError):
        what = f"cannot connect ({exc.reason})"
    elif isinstance(exc, http.client.IncompleteRead):
        what = "the connection closed before the end of the file"
    else:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    keep = (
        f" {have} bytes are kept in {part}; run the download again to resume."
        if have
        else " Check the URL and the network connection."
    )
    return DownloadError(f"downloading {url} failed: {what}.{keep}")


def _transfer(url: str, part: Path, *, progress: bool, chunk: int, timeout: float, desc: str) -> int | None:
    """Fetch ``url`` into ``part`` (resuming it); returns the file's full size when the server said it."""
    from tqdm import tqdm

    start = part.stat().st_size if part.exists() else 0
    try:
        try:
            resp = _open(url, start, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code != 416 or start == 0:
                raise
            # Range not satisfiable: the part is complete already, or longer than the file (a stale part).
            m = re.search(r"/(\d+)", exc.headers.get("Content-Range", "") if exc.headers else "")
            if m and int(m.group(1)) == start:
                return start
            part.unlink()
            start = 0
            resp = _open(url, 0, timeout)
        with resp:
            total: int | None = None
            if resp.status == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != start:
                    raise DownloadError(
                        f"downloading {url} failed: the server resumed at the wrong offset "
                        f"(asked for byte {start}, got Content-Range {resp.headers.get('Content-Range')!r}). "
                        f"Delete {part} and run again."
                    )
                total = int(m.group(3)) if m.group(3) != "*" else None
                mode = "ab"
            else:  # 200: a full response (the server ignores Range, or nothing was there to resume)
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                start, mode = 0, "wb"
            try:
                fh = part.open(mode)
            except OSError as exc:
                raise _local_error(part, "write the partial download", exc) from exc
            with fh, tqdm(
                total=total,
                initial=start,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                disable=not progress,
                leave=True,
            ) as bar:
                while True:
                    data = resp.read(chunk)
                    if not data:
                        break
                    try:
                        fh.write(data)
                    except OSError as exc:  # a full disk, a quota, a file system gone read-only
                        raise _local_error(part, "write the partial download", exc, part) from exc
                    bar.update(len(data))
            return total
    except DownloadError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # HTTPError is a URLError
        raise _network_error(url, part, exc) from exc


def download_checkpoint(
    url: str,
    dest: PathLike,
    *,
    expected_size: int | None = None,
    config: ConfigLike = None,
    progress: bool = True,
    to_safetensors: bool = False,
    chunk: int = 1 << 20,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``<dest>.part``, and verify it before it takes ``dest``'s name.

    The file must have the server's ``Content-Length`` (and ``expected_size``, when given) and load
    strictly with ``load_model(..., config=config)``. With ``to_safetensors`` a ``.safetensors`` copy
    (weights plus config metadata) is written beside ``dest`` as well. Returns ``dest``.

    Raises :class:`DownloadError` for network, HTTP and size problems (the ``.part`` is kept for a
    resume) and :class:`~ddfm_fast.checkpoint.CheckpointError` when the complete file does not load
    (the ``.part`` is removed).
    """
    dest = Path(dest).expanduser()
    part = part_path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, a read-only file system
        raise _local_error(dest.parent, "create the folder to download into", exc) from exc
    for path, what in ((dest, "the destination"), (part, "the partial download")):
        if path.exists() and not path.is_file():
            raise DownloadError(f"{display_name(path)}: {what} exists and is not a regular file; move it away.")
    if expected_size is not None and part.exists() and part.stat().st_size > expected_size:
        part.unlink()  # longer than the file can be: stale, start again

    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have == expected_size:
        total: int | None = expected_size  # complete already; only the checks are left
    else:
        total = _transfer(url, part, progress=progress, chunk=chunk, timeout=timeout, desc=dest.name)

    size = part.stat().st_size if part.exists() else 0
    for label, want in (("the server's Content-Length", total), ("the expected size", expected_size)):
        if want is not None and size != want:
            if size > want:
                part.unlink()
                keep = f"{part} was removed; run the download again."
            else:
                keep = f"{part} is kept; run the download again to resume."
            raise DownloadError(
                f"{part}: downloaded {size} bytes from {url}, but {label} is {want} bytes. {keep}"
            )

    try:
        model = load_model(part, config=config)
    except CheckpointError as exc:
        part.unlink(missing_ok=True)
        raise CheckpointError(
            f"the file downloaded from {url} for {dest} is not a loadable checkpoint; it was removed. {exc}"
        ) from exc

    if to_safetensors and dest.suffix.lower() != ".safetensors":
        st_path = dest.with_suffix(".safetensors")
        try:
            save_safetensors(model, st_path, metadata={"source_url": url})
        except OSError as exc:
            raise _local_error(st_path, "write the .safetensors copy", exc, part) from exc
    del model  # the .pt may be memory-mapped: release it before the rename
    try:
        os.replace(part, dest)
    except OSError as exc:
        raise _local_error(dest, f"rename the verified download {display_name(part)} to it", exc, part) from exc
    return dest
