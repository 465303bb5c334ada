"""What a resumed folder run trusts, and what keeps two runs out of one output folder.

Records. Every output a folder run writes has a record that says what made it (``OUT/ddfm_summary.json``,
``outputs``, keyed by the output's file name):

- ``settings``: the digest (:func:`settings_digest`) of the run's output identity
  (:func:`ddfm_fast.runner.output_identity`: every sampler setting, the model, the mode, the output kind and
  format, the resize side, the UNet dtype); the identity itself is kept once under the summary's ``identities``;
- ``inputs_sha256``: the SHA-256 of every byte of each input file (keyed by role, beside the paths);
- ``output_sha256``, ``output_bytes``: the SHA-256 and the size of the output file as it was written.

The record goes to a journal (``OUT/.ddfm-fast-journal.<run>.jsonl``, one JSON object a line) *before* the output
takes its final name (:func:`ddfm_fast.outputs.write_output`'s ``before_commit``), so no output is ever in place
without its record, whenever the run is killed. The summary written at the end (or on Ctrl-C) gathers the
journals, and they are removed once a summary holding them is on disk.

Resume (:func:`classify`). An existing ``OUT/<stem>.<ext>`` counts as done only when a record for it matches all
three: the file's SHA-256 and size (so it is, byte for byte, the file ddfm-fast wrote, which decodes to the
expected size), the settings digest, and the SHA-256 of both inputs as they are now. Otherwise:

=================================================================  ===============================================
what is there                                                      what happens
=================================================================  ===============================================
a file ddfm-fast wrote, from other settings                        the run is refused before anything is written,
                                                                   naming the settings that differ
a file ddfm-fast wrote, from inputs at the same paths whose        fused again (the input changed)
bytes changed since
a file ddfm-fast wrote, from other input files                     the pair fails, naming them (another data set's
                                                                   output is not replaced)
a file that does not open as the output format (0 bytes, text)     fused again, replacing it
any other file (an image without a matching record: not ours, or   the pair fails, naming it; move it away or pass
changed since we wrote it)                                         ``--overwrite``
a folder, a symbolic link, a FIFO or a device                      the pair fails, naming it
=================================================================  ===============================================

With ``--overwrite`` every pair is fused again (a folder or device in the way still fails its pair).

Lock (:class:`FolderLock`): a run holds an exclusive ``flock`` on ``OUT/.ddfm-fast.lock`` while it writes the
folder (under torchrun, rank 0 holds it for all ranks), so a second run into the same folder stops at once with
a one-line error naming the folder and the other run's pid and host. The kernel releases the lock when the
process dies, however it dies, so a stale lock never blocks a later run. Stale temporary files (``.*.part``, left
when a process was killed between writing and renaming) are removed at the start of a run, under the lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

from ddfm_fast import io
from ddfm_fast.outputs import Fingerprint, fingerprint, readable_problem
from ddfm_fast.pairing import InputError

if TYPE_CHECKING:
    import torch

LOCK_NAME = ".ddfm-fast.lock"
JOURNAL_PREFIX = ".ddfm-fast-journal."
JOURNAL_SUFFIX = ".jsonl"
RECORDS_SCHEMA = 3  # the summary schema that carries per-output records
_PART = re.compile(r"^\..+\.part$")  # ddfm_fast.io.atomic_path's temporary names: .<stem>.<random><suffix>.part


def settings_digest(identity: Mapping[str, Any]) -> str:
    """A short, stable digest of an output identity (SHA-256 of its canonical JSON, first 16 hex digits)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def model_digest(model: "torch.nn.Module", *, with_config: bool = True) -> str:
    """What a model computes, as a short digest: its class, its ``extra_repr``, its ``config`` (a UNet's
    architecture) and every byte of its state dict.

    Part of a folder run's output identity, so that outputs made by another model under the same name (a weights
    file replaced at its path, a preset whose file changed, the analytic prior with another contrast) are not
    trusted on resume. Names, dtypes and shapes are hashed with the bytes, in name order; the bytes are the
    tensors' own, so a model digests alike on every device (a cast to fp16 is a different model, as it is a
    different output). Costs one pass over the weights: about 1.5 s for the 552.8 M-parameter ADM on a CPU
    with SHA instructions (1.5 GB/s here), a few times that without them, plus the copy from a GPU.
    """
    import torch  # resume is read by the CLI before torch is imported; only a folder run with a model needs it

    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}({model.extra_repr()})".encode())
    # A UNet's architecture lives in its config (prediction type, heads, norms, ...), not in extra_repr: the same
    # weights under another config compute another output.
    config = getattr(model, "config", None)
    if with_config and callable(getattr(config, "to_dict", None)):  # without: the digest of ddfm-fast <= 0.1.0's
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().reshape(-1).contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()[:16]


# Identity fields present only when they matter (``runner.output_identity``), and what their absence means (an
# identity of an earlier version lacks them too, whatever the value was).
_ABSENT = {"batch_size": "1 (or not recorded by an earlier version)"}


def settings_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """``["lamb 0.5 -> 0.25", "seed 3407 -> 1"]``: the fields that differ, sorted by name."""
    value = lambda d, k: repr(d[k]) if k in d else _ABSENT.get(k, "None")  # noqa: E731
    return [f"{k} {value(before, k)} -> {value(after, k)}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)]


def dumps_line(obj: Any) -> str:
    """One JSON line; ASCII escapes keep names with undecodable bytes (lone surrogates) writable."""
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------------- records


@dataclass
class FolderRecords:
    """What an output folder says about its files: the summary's records and any journal left by a killed run."""

    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> record, from ddfm_summary.json
    journaled: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name -> records only in journals
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)  # settings digest -> identity
    runs: list[dict[str, Any]] = field(default_factory=list)  # earlier runs in this folder, oldest first
    journals: list[Path] = field(default_factory=list)
    problem: Optional[str] = None  # why the summary cannot be used (unreadable, written by an older version)

    def candidates(self, name: str) -> list[dict[str, Any]]:
        """Every record of output ``name``, the summary's first, journals after (newer)."""
        return ([self.outputs[name]] if name in self.outputs else []) + self.journaled.get(name, [])

    def all_records(self) -> dict[str, dict[str, Any]]:
        """name -> the newest record of every output these records know."""
        merged = dict(self.outputs)
        for name, recs in self.journaled.items():
            merged[name] = recs[-1]
        return merged


def journal_paths(out_dir: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(out_dir))
    except OSError:
        return []
    return [Path(out_dir) / n for n in names if n.startswith(JOURNAL_PREFIX) and n.endswith(JOURNAL_SUFFIX)]


def read_journals(paths: list[Path], records: FolderRecords) -> None:
    """Add the records of journal files to ``records`` (a torn last line, from a kill mid-write, is skipped)."""
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if isinstance(obj.get("identity"), dict) and isinstance(obj.get("settings"), str):
                records.identities.setdefault(obj["settings"], obj["identity"])
            rec = obj.get("record")
            if isinstance(rec, dict) and isinstance(rec.get("output"), str):
                records.journaled.setdefault(Path(rec["output"]).name, []).append(rec)


def load_records(out_dir: Path, summary_name: str) -> FolderRecords:
    """The records of ``out_dir``: its summary's ``outputs``, ``identities`` and ``runs``, plus its journals."""
    out_dir = Path(out_dir)
    records = FolderRecords(journals=journal_paths(out_dir))
    path = out_dir / summary_name
    if os.path.lexists(path):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            records.problem = f"{path} cannot be read ({exc})"
            doc = None
        if doc is not None:
            schema = doc.get("schema") if isinstance(doc, dict) else None
            if schema != RECORDS_SCHEMA:
                records.problem = (f"{path} was written by another version of ddfm-fast (schema {schema!r}, this "
                                   f"version writes {RECORDS_SCHEMA}) and does not record what made each output")
            else:
                outputs, identities, runs = doc.get("outputs"), doc.get("identities"), doc.get("runs")
                if not (isinstance(outputs, dict) and isinstance(identities, dict) and isinstance(runs, list)):
                    records.problem = f"{path} lacks its outputs / identities / runs records"
                else:
                    records.outputs = {k: v for k, v in outputs.items() if isinstance(v, dict)}
                    records.identities = {k: v for k, v in identities.items() if isinstance(v, dict)}
                    records.runs = [r for r in runs if isinstance(r, dict)]
    read_journals(records.journals, records)
    return records


class Journal:
    """The records a run appends, one line each, before each output takes its final name (see the module doc)."""

    def __init__(self, out_dir: Path, token: str, identity: Mapping[str, Any], digest: str) -> None:
        self.path = Path(out_dir) / f"{JOURNAL_PREFIX}{token}{JOURNAL_SUFFIX}"
        self.header = {"journal": 1, "settings": digest, "identity": dict(identity), "pid": os.getpid()}
        self._fh: Any = None

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record (and the header first); raises ``OSError`` when it cannot, so the output is not
        committed either."""
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
            self._fh.write(dumps_line(self.header) + "\n")
        self._fh.write(dumps_line({"record": dict(record)}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None


def remove_journals(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------- one output


@dataclass(frozen=True)
class Verdict:
    """What to do with one pair's output path: ``new`` (nothing there), ``done`` (verified: keep it), ``redo``
    (replace it, ``reason`` says why), ``refuse`` (fail the pair, ``reason`` names the file), ``settings`` (a
    verified output of other settings: the run is refused)."""

    status: str
    reason: str = ""
    record: Optional[dict[str, Any]] = None


def _same_file(recorded: Any, path: Path) -> bool:
    if not isinstance(recorded, str):
        return False
    try:
        return Path(recorded).resolve() == Path(path).resolve()
    except OSError:
        return False


def input_fingerprints(inputs: Mapping[str, Path]) -> dict[str, str]:
    """role -> SHA-256 of the input file's bytes. Raises ``io.FileProblem`` / ``OSError`` for unreadable ones."""
    return {role: fingerprint(path).sha256 for role, path in inputs.items()}


def _kind(st: os.stat_result) -> Optional[str]:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (outputs are written as regular files)"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a FIFO, socket or device)"
    return None


def classify(dest: Path, inputs: Mapping[str, Path], candidates: list[dict[str, Any]], digest: str, fmt: str,
             *, overwrite: bool = False, equivalent: Iterable[str] = ()) -> Verdict:
    """The :class:`Verdict` for the existing file (if any) at ``dest``: see the module docstring's table.
    ``equivalent`` are settings digests that an earlier version recorded for what ``digest`` now names."""
    name = io.display_name(dest)
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return Verdict("new")
    except OSError as exc:
        return Verdict("refuse", f"output {name} cannot be checked ({exc.strerror})")
    kind = _kind(st)
    if kind is not None and not (overwrite and stat.S_ISLNK(st.st_mode)):
        return Verdict("refuse", f"output {name} {kind}; remove or rename it")
    if overwrite:
        return Verdict("redo", f"output {name} replaced (--overwrite)")
    try:
        printed: Optional[Fingerprint] = fingerprint(dest)
    except io.FileProblem as exc:  # 0 bytes
        return Verdict("redo", f"output {name} {exc.reason}: not an output, fused again")
    except OSError as exc:
        return Verdict("refuse", f"output {name} cannot be read ({exc.strerror})")
    ours = [r for r in candidates if printed is not None and r.get("output_sha256") == printed.sha256
            and r.get("output_bytes") == printed.bytes]
    if ours:
        rec = ours[-1]
        if rec.get("settings") != digest and rec.get("settings") not in set(equivalent):
            return Verdict("settings", record=rec)
        try:
            now = input_fingerprints(inputs)
        except (io.FileProblem, OSError):  # the pair fails when it is read, naming the file
            return Verdict("redo", f"output {name}: an input cannot be read to check it", rec)
        before = rec.get("inputs_sha256") or {}
        if before == now:
            return Verdict("done", record=rec)
        changed = [role for role in inputs if before.get(role) != now[role]]
        if all(_same_file(rec.get(role), path) for role, path in inputs.items()):
            return Verdict("redo", f"output {name}: its input changed since it was made "
                                   f"({', '.join(changed)} file's bytes differ); fused again", rec)
        made_from = ", ".join(f"{role} {rec.get(role)}" for role in inputs)
        return Verdict("refuse", f"output {name} was made from other input files ({made_from}); write to another "
                                 "folder, or pass --overwrite to replace it", rec)
    problem = readable_problem(dest, fmt)
    if problem is not None:
        return Verdict("redo", f"output {name} {problem}: not an output, fused again")
    why = "it changed since ddfm-fast wrote it" if candidates else "no record in the folder says what made it"
    return Verdict("refuse", f"output {name} exists, but {why}; move it away, or pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------- the folder


def case_insensitive(folder: Path) -> bool:
    """True when ``folder``'s file system treats ``a.png`` and ``A.PNG`` as one file (macOS and Windows by
    default): a probe file is made, looked up with its case swapped, and removed."""
    probe = Path(folder) / f".ddfm-fast-case-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return False
    os.close(fd)
    try:
        return os.path.exists(Path(folder) / probe.name.upper())
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def remove_stale_parts(out_dir: Path) -> list[str]:
    """Remove the ``.*.part`` temporary files a killed write left in ``out_dir``; returns their names.

    Call it holding the folder's lock: a running writer's temporary files look the same.
    """
    removed = []
    try:
        entries = list(os.scandir(out_dir))
    except OSError:
        return removed
    for entry in entries:
        if _PART.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return sorted(removed)


class FolderBusyError(InputError):
    """Another run holds the output folder's lock; the message names the folder and that run's pid and host."""


class FolderLock:
    """An exclusive lock on an output folder for one run (see the module docstring). A context manager.

    ``acquire`` creates the folder when it does not exist (and ``release`` removes it again when the run left it
    empty). Where ``fcntl`` is missing (Windows) or the file system refuses locks (some network file systems),
    ``warning`` says so and the run goes on unlocked.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.warning: Optional[str] = None
        self._fd: Optional[int] = None
        self._created = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:
            fcntl = None  # type: ignore[assignment]
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created = True
        if fcntl is None:
            self.warning = (f"{self.folder} is not locked (no fcntl on {sys.platform}): make sure no other run "
                            "writes this folder at the same time")
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise FolderBusyError(f"output folder {io.display_name(self.folder)} is being written by another "
                                      f"ddfm-fast run ({holder}); wait for it to finish, or write to another folder"
                                      ) from None
            except OSError as exc:  # ENOLCK and friends: the file system has no locks
                os.close(fd)
                self.warning = (f"{self.folder} could not be locked ({exc.strerror}): make sure no other run "
                                "writes this folder at the same time")
                return self
            try:  # the holder before us may have removed the file after we opened it: lock the file that is there
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv[:1] + sys.argv[1:])[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, (dumps_line(info) + "\n").encode("ascii"))
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            info = json.loads(os.read(fd, 4096).decode("ascii", "replace") or "{}")
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "pid unknown: it has only just started"

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no other run locks a file about to vanish) and
        unlock; remove the folder when this run created it and left it empty."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._created:
            try:
                self.folder.rmdir()  # only succeeds when empty
            except OSError:
                pass
            self._created = False

    def __enter__(self) -> "FolderLock":
        return self.acquire() if not self.held else self

    def __exit__(self, *exc: Any) -> None:
        self.release()
