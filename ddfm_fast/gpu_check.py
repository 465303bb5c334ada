"""The correctness half of ``ddfm-fast bench --suite gpu``: find the goldens, run the GPU tests, report each one.

A GPU machine may receive only a copy of the checkout, without the ``../shared`` folder beside it where the golden
vectors live. The goldens are then looked for, in this order (:func:`find_reference`):

1. ``--reference DIR`` on the command line;
2. ``$DDFM_REFERENCE``;
3. ``$DDFM_SHARED/reference`` (when ``DDFM_SHARED`` is set), then ``../shared/reference`` beside the checkout;
4. ``.gpu-reference/`` inside the checkout: a folder, ignored by git, that the user copies the goldens into so
   that they travel with the checkout (``cp -r ../shared/reference/. .gpu-reference/``, about 36 MB).

A folder named explicitly (1 or 2) that does not exist is an error, not a reason to look elsewhere. The tests run in
a subprocess (``tests/test_gpu.py``, ``tests/test_kernels.py``) with ``DDFM_REFERENCE`` set to the folder found and
``DDFM_REQUIRE_REFERENCE=1``, under which ``tests/conftest.py`` fails a test whose golden file is missing, naming
the file, instead of skipping it. The plugin :mod:`ddfm_fast.pytest_outcomes` records every test's outcome as it
happens, so the report lists each test as passed / failed / skipped with its reason, also when a time limit
stopped the run. In the gpu suite a skipped test counts as a failure: on a CUDA machine with the goldens nothing
should skip, and a skip means something the suite claims to check was not checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

from ddfm_fast.pytest_outcomes import ENV_OUTCOMES

ENV_REFERENCE = "DDFM_REFERENCE"
ENV_SHARED = "DDFM_SHARED"
ENV_REQUIRE = "DDFM_REQUIRE_REFERENCE"
LOCAL_REFERENCE = ".gpu-reference"

#: The golden files the GPU tests read, and what each holds (the whole folder is about 36 MB; these are 36 MB).
GOLDEN_FILES = {
    "em_onestep.npz": "the official EM step, 6 cases x 3 chained steps",
    "sampler_tiny.npz": "the official 10- and 100-step sampling with the tiny UNet",
    "tiny_unet.pt": "the tiny UNet's weights",
    "tiny_unet_config.json": "the tiny UNet's configuration",
}
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_kernels.py")


class GoldenFolderError(FileNotFoundError):
    """A golden folder named explicitly does not exist; the message names it and where the name came from."""


def repo_root() -> Optional[Path]:
    """The checkout this package was installed from (``pip install -e .``), or None for a wheel install."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "tests" / "conftest.py").is_file() else None


@dataclass
class ReferenceLookup:
    """Where the goldens were looked for, and the folder found (``path`` None when none was)."""

    path: Optional[Path]
    source: Optional[str]  # "--reference", "DDFM_REFERENCE", "../shared/reference", ...
    searched: list[str] = field(default_factory=list)

    def missing(self) -> list[Path]:
        """The golden files absent from the folder found (every one of them when no folder was found)."""
        if self.path is None:
            return [Path(LOCAL_REFERENCE) / name for name in GOLDEN_FILES]
        return [self.path / name for name in GOLDEN_FILES if not (self.path / name).is_file()]

    def describe(self) -> str:
        if self.path is None:
            return "no golden folder found; looked in " + ", ".join(self.searched)
        return f"goldens from {self.path} ({self.source})"


def find_reference(explicit: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                   repo: Optional[Path] = None) -> ReferenceLookup:
    """The golden folder, in the order of the module docstring. Raises :class:`GoldenFolderError` when a folder
    named by ``explicit`` or ``$DDFM_REFERENCE`` does not exist."""
    env = os.environ if env is None else env
    repo = repo_root() if repo is None else repo
    named = [(Path(explicit), "--reference")] if explicit is not None else []
    if not named and env.get(ENV_REFERENCE):
        named = [(Path(env[ENV_REFERENCE]), ENV_REFERENCE)]
    for path, source in named:
        if not path.is_dir():
            raise GoldenFolderError(f"{source} {path}: no such folder (it should hold {', '.join(GOLDEN_FILES)})")
        return ReferenceLookup(path.resolve(), source, [f"{path} ({source})"])
    candidates: list[tuple[Path, str]] = []
    if env.get(ENV_SHARED):
        candidates.append((Path(env[ENV_SHARED]) / "reference", f"{ENV_SHARED}/reference"))
    if repo is not None:
        candidates += [(repo.parent / "shared" / "reference", "../shared/reference"),
                       (repo / LOCAL_REFERENCE, LOCAL_REFERENCE)]
    searched = [str(p) for p, _ in candidates]
    for path, source in candidates:
        if path.is_dir():
            return ReferenceLookup(path.resolve(), source, searched)
    return ReferenceLookup(None, None, searched)


# ------------------------------------------------------------------------------------------------ outcomes


@dataclass
class TestOutcome:
    """One test: ``outcome`` is passed, failed, skipped, xfailed, xpassed, interrupted or not run."""

    test: str
    outcome: str
    seconds: float = 0.0
    reason: Optional[str] = None


def read_outcomes(path: Path) -> list[TestOutcome]:
    """The per-test outcomes from a :mod:`ddfm_fast.pytest_outcomes` file, in the order the tests ran.

    A test that failed in any phase (setup, call, teardown) failed; one that started but has no final report was
    interrupted (the run was stopped while it ran); one collected but never started was not run. A module that
    failed to import or skipped itself whole is one entry named by its file.
    """
    collected: list[str] = []
    order: list[str] = []
    phases: dict[str, list[dict]] = {}
    modules: list[TestOutcome] = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            if rec["event"] == "collected":
                collected = rec["nodeids"]
            elif rec["event"] == "collect":
                modules.append(TestOutcome(rec["nodeid"], rec["outcome"], 0.0, rec.get("reason")))
            elif rec["event"] == "start":
                order.append(rec["nodeid"])
                phases.setdefault(rec["nodeid"], [])
            elif rec["event"] == "report":
                phases.setdefault(rec["nodeid"], []).append(rec)
    out = list(modules)
    for nodeid in order:
        reps = phases.get(nodeid, [])
        seconds = round(sum(r["seconds"] for r in reps), 3)
        failed = [r for r in reps if r["outcome"] == "failed"]
        skipped = [r for r in reps if r["outcome"] in ("skipped", "xfailed")]
        if failed:
            r = failed[0]
            where = "" if r["when"] == "call" else f"{r['when']}: "
            out.append(TestOutcome(nodeid, "failed", seconds, where + (r.get("reason") or "")))
        elif skipped:
            out.append(TestOutcome(nodeid, skipped[0]["outcome"], seconds, skipped[0].get("reason")))
        elif not any(r["when"] == "teardown" for r in reps):
            out.append(TestOutcome(nodeid, "interrupted", seconds, "the run was stopped while this test ran"))
        else:
            call = [r for r in reps if r["when"] == "call"]
            out.append(TestOutcome(nodeid, call[0]["outcome"] if call else "passed", seconds, None))
    started = set(order)
    out += [TestOutcome(n, "not run", 0.0, "not reached before the run stopped") for n in collected
            if n not in started]
    return out


def count(outcomes: list[TestOutcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.outcome] = counts.get(o.outcome, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------------- runner


def run_tests(log: Callable[[str], None], *, timeout_s: float, reference: ReferenceLookup,
              collect_only: bool = False, files: tuple[str, ...] = GPU_TEST_FILES,
              repo: Optional[Path] = None) -> dict:
    """Run (or, with ``collect_only``, only collect) the GPU tests in a subprocess; a JSON-able summary.

    The tests compile the Triton kernels for the GPU (``TRITON_INTERPRET=0``) and read the goldens from
    ``reference``. A run past ``timeout_s`` is stopped with its whole process group (inductor's compile workers
    too) and counts as failed (exit code 124); the outcomes recorded until then are kept. ``ok`` is true only
    when pytest exited 0 and every test passed (a skip is a failure here, see the module docstring).
    """
    repo = repo_root() if repo is None else repo
    missing = [str(p) for p in reference.missing()]
    summary: dict = {"ran": False, "collect_only": collect_only, "reference": reference.describe(),
                     "missing_goldens": missing}
    if repo is None:
        summary.update(ok=False, reason="tests/ not found: run from a checkout installed with pip install -e .")
        return summary
    for name in missing:
        log(f"tests: missing golden file {name}: the tests that need it will fail")
    with tempfile.TemporaryDirectory(prefix="ddfm-tests-") as tmp:
        outcomes_file = Path(tmp) / "outcomes.jsonl"
        env = {**os.environ, ENV_OUTCOMES: str(outcomes_file), ENV_REQUIRE: "1",
               # On a GPU the kernels are compiled for it; a CPU-only collection (the dry run) needs the interpreter
               # for tests/test_kernels.py to collect at all.
               "TRITON_INTERPRET": "1" if collect_only else "0"}
        if reference.path is not None:
            env[ENV_REFERENCE] = str(reference.path)
        else:
            env.pop(ENV_REFERENCE, None)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "ddfm_fast.pytest_outcomes",
               *(["--collect-only"] if collect_only else []), *files]
        t0 = time.perf_counter()
        # Its own session, so that a timeout stops pytest and whatever it started (inductor's compile workers).
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            code = 124
            text = (text or "") + f"\nddfm-fast bench: the GPU tests ran past {timeout_s:g} s and were stopped"
        outcomes = read_outcomes(outcomes_file)
    seconds = round(time.perf_counter() - t0, 1)
    tail = (text or "").strip().splitlines()[-25:]
    counts = count(outcomes)
    if collect_only:
        collected = [o for o in outcomes if o.outcome == "not run"]
        problems = [o for o in outcomes if o.outcome != "not run"]
        ok = code == 0 and bool(collected) and not problems and not missing
        for o in collected:
            o.outcome, o.reason = "collected", "dry run: collected, not run"
        counts = count(outcomes)
    else:
        ok = code == 0 and bool(outcomes) and all(o.outcome == "passed" for o in outcomes) and not missing
    summary.update(ran=True, ok=ok, exit_code=code, seconds=seconds, command=" ".join(cmd), counts=counts,
                   tests=[asdict(o) for o in outcomes], tail=tail)
    for o in outcomes:
        if o.outcome not in ("passed", "collected"):
            log(f"  {o.outcome:<11} {o.test}" + (f": {o.reason}" if o.reason else ""))
    log("tests: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f" ({seconds} s, exit code {code})"
        + ("" if ok else " -> FAILED" + (" (in the gpu suite a skip is a failure)"
                                          if counts.get("skipped") else "")))
    return summary
