"""The correctness half of ``bench --suite gpu`` on a CPU: finding the goldens, running tests in a subprocess and
reporting each one, the interpreter default of conftest, and the TF32 switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ddfm_fast import gpu_check, precision
from ddfm_fast.gpu_check import GOLDEN_FILES, GoldenFolderError, ReferenceLookup, find_reference, read_outcomes

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ goldens


def _goldens(folder: Path, names=tuple(GOLDEN_FILES)) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_reference_order_explicit_env_shared_sibling_local(tmp_path):
    repo = tmp_path / "work" / "repo"
    repo.mkdir(parents=True)
    local = _goldens(repo / ".gpu-reference")
    assert find_reference(env={}, repo=repo).path == local.resolve()  # only the copy inside the checkout
    sibling = _goldens(tmp_path / "work" / "shared" / "reference")
    assert find_reference(env={}, repo=repo).source == "../shared/reference"
    shared = _goldens(tmp_path / "elsewhere" / "reference")
    lookup = find_reference(env={"DDFM_SHARED": str(shared.parent)}, repo=repo)
    assert lookup.path == shared.resolve() and lookup.source == "DDFM_SHARED/reference"
    env_dir = _goldens(tmp_path / "env")
    assert find_reference(env={"DDFM_REFERENCE": str(env_dir), "DDFM_SHARED": str(shared.parent)},
                          repo=repo).path == env_dir.resolve()
    explicit = _goldens(tmp_path / "explicit")
    lookup = find_reference(explicit, env={"DDFM_REFERENCE": str(env_dir)}, repo=repo)
    assert lookup.path == explicit.resolve() and lookup.source == "--reference"
    assert sibling.is_dir()


def test_a_named_folder_that_is_absent_is_an_error_not_a_fallback(tmp_path):
    repo = tmp_path / "repo"
    _goldens(repo / ".gpu-reference")
    with pytest.raises(GoldenFolderError, match=r"--reference .*nope: no such folder"):
        find_reference(tmp_path / "nope", env={}, repo=repo)
    with pytest.raises(GoldenFolderError, match="DDFM_REFERENCE"):
        find_reference(env={"DDFM_REFERENCE": str(tmp_path / "nope")}, repo=repo)


def test_missing_golden_files_are_named(tmp_path):
    lookup = find_reference(_goldens(tmp_path / "ref", names=("tiny_unet.pt",)), env={}, repo=tmp_path)
    assert sorted(p.name for p in lookup.missing()) == sorted(set(GOLDEN_FILES) - {"tiny_unet.pt"})
    nothing = find_reference(env={}, repo=tmp_path / "bare")
    assert nothing.path is None and len(nothing.missing()) == len(GOLDEN_FILES)
    assert "no golden folder found; looked in" in nothing.describe()


def test_the_real_goldens_hold_every_file_the_gpu_tests_read(reference_dir):
    assert find_reference(reference_dir, env={}).missing() == []


# ----------------------------------------------------------------------------------------------- outcomes


def test_outcomes_are_aggregated_per_test(tmp_path):
    lines = [
        {"event": "collected", "nodeids": ["t.py::a", "t.py::b", "t.py::c", "t.py::d", "t.py::e", "t.py::f"]},
        {"event": "collect", "nodeid": "u.py", "outcome": "skipped", "reason": "no CUDA"},
    ]

    def test(nodeid, *phases):
        lines.append({"event": "start", "nodeid": nodeid})
        for when, outcome, reason in phases:
            lines.append({"event": "report", "nodeid": nodeid, "when": when, "outcome": outcome, "seconds": 0.5,
                          "reason": reason})

    test("t.py::a", ("setup", "passed", None), ("call", "passed", None), ("teardown", "passed", None))
    test("t.py::b", ("setup", "passed", None), ("call", "failed", "assert 1 == 2"), ("teardown", "passed", None))
    test("t.py::c", ("setup", "skipped", "needs a CUDA device"), ("teardown", "passed", None))
    test("t.py::d", ("setup", "failed", "golden file x.npz is absent"), ("teardown", "passed", None))
    test("t.py::e", ("setup", "passed", None))  # the run was killed here
    path = tmp_path / "o.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"event": "rep')  # a cut last line is ignored
    got = {o.test: (o.outcome, o.reason) for o in read_outcomes(path)}
    assert got == {
        "u.py": ("skipped", "no CUDA"),
        "t.py::a": ("passed", None),
        "t.py::b": ("failed", "assert 1 == 2"),
        "t.py::c": ("skipped", "needs a CUDA device"),
        "t.py::d": ("failed", "setup: golden file x.npz is absent"),
        "t.py::e": ("interrupted", "the run was stopped while this test ran"),
        "t.py::f": ("not run", "not reached before the run stopped"),
    }


def _suite(tmp_path: Path, body: str) -> Path:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(textwrap.dedent(body))
    return tmp_path


def test_run_tests_lists_every_test_and_a_skip_fails_the_suite(tmp_path):
    repo = _suite(tmp_path, """
        import pytest

        def test_ok():
            pass

        def test_bad():
            assert 1 == 2, "one is not two"

        def test_skip():
            pytest.skip("nothing to check here")
    """)
    lines: list[str] = []
    report = gpu_check.run_tests(lines.append, timeout_s=120, reference=ReferenceLookup(tmp_path, "test"),
                                 files=("tests/test_x.py",), repo=repo)
    outcomes = {t["test"]: t for t in report["tests"]}
    assert outcomes["tests/test_x.py::test_ok"]["outcome"] == "passed"
    assert outcomes["tests/test_x.py::test_bad"]["outcome"] == "failed"
    assert "one is not two" in outcomes["tests/test_x.py::test_bad"]["reason"]
    assert outcomes["tests/test_x.py::test_skip"] | {"seconds": 0} == {
        "test": "tests/test_x.py::test_skip", "outcome": "skipped", "reason": "nothing to check here", "seconds": 0}
    assert report["ok"] is False and report["exit_code"] == 1 and report["counts"] == {
        "passed": 1, "failed": 1, "skipped": 1}
    assert any("skipped     tests/test_x.py::test_skip: nothing to check here" in line for line in lines)


def test_run_tests_stopped_by_its_timeout_keeps_what_finished(tmp_path):
    repo = _suite(tmp_path, """
        import time

        def test_quick():
            pass

        def test_slow():
            time.sleep(120)

        def test_after():
            pass
    """)
    # 20 s: pytest's start and the first test on this loaded 2-core machine take a few seconds; the slow test
    # sleeps far longer than the timeout.
    report = gpu_check.run_tests(lambda _: None, timeout_s=20, reference=ReferenceLookup(tmp_path, "test"),
                                 files=("tests/test_x.py",), repo=repo)
    got = {t["test"].split("::")[1]: t["outcome"] for t in report["tests"]}
    assert got == {"test_quick": "passed", "test_slow": "interrupted", "test_after": "not run"}
    assert report["exit_code"] == 124 and report["ok"] is False
    assert report["tail"][-1] == "ddfm-fast bench: the GPU tests ran past 20 s and were stopped"


def test_a_missing_golden_fails_naming_the_file_when_required(tmp_path):
    """What the gpu suite sets up: DDFM_REFERENCE at a folder without the goldens, DDFM_REQUIRE_REFERENCE=1."""
    empty = tmp_path / "empty"
    empty.mkdir()
    report = gpu_check.run_tests(lambda _: None, timeout_s=240, reference=ReferenceLookup(empty, "test"),
                                 files=("tests/test_em.py::test_state_is_updated_in_place",))
    [test] = report["tests"]
    assert test["outcome"] == "failed", test
    assert str(empty / "em_onestep.npz") in test["reason"] and "a missing golden is a failure" in test["reason"]
    assert report["missing_goldens"] == [str(empty / name) for name in GOLDEN_FILES]
    assert report["ok"] is False


# ---------------------------------------------------------------------------------- conftest and precision


@pytest.mark.parametrize("preset, cuda, expected", [
    (None, False, "1"),  # no GPU: the interpreter
    (None, True, None),  # a GPU: the kernels are compiled for it
    ("1", True, "1"),  # asked for on a GPU
    ("0", False, "0"),  # asked not to, on a CPU
])
def test_the_interpreter_default_applies_only_without_a_gpu(preset, cuda, expected):
    code = textwrap.dedent(f"""
        import os, runpy, sys, torch
        torch.cuda.is_available = lambda: {cuda}
        runpy.run_path({str(REPO / 'tests' / 'conftest.py')!r})
        assert "triton" not in sys.modules, "conftest imported triton before deciding"
        print(repr(os.environ.get("TRITON_INTERPRET")))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if preset is not None:
        env["TRITON_INTERPRET"] = preset
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO / "tests", capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(expected)


def test_tests_run_in_true_fp32():
    flags = precision.tf32_flags()
    assert flags == {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False,
                     "float32_matmul_precision": "highest", "tf32": False}


def test_tf32_switch_sets_and_restores_every_flag():
    before = precision.tf32_flags()
    with precision.tf32(True) as on:
        assert on["tf32"] and on["cudnn.allow_tf32"] and on["cuda.matmul.allow_tf32"]
        assert on["float32_matmul_precision"] == "high" and torch.backends.cudnn.allow_tf32
        with precision.tf32(False) as off:
            assert off == {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False,
                           "float32_matmul_precision": "highest", "tf32": False}
        assert precision.tf32_flags() == on
    assert precision.tf32_flags() == before
