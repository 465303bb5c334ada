"""README's first screen and CI run the same commands."""

from __future__ import annotations

import re

from conftest import REPO


def _code_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    first_screen = text.split("## ", 1)[0]
    return [line for block in re.findall(r"```bash\n(.*?)```", first_screen, re.S) for line in block.splitlines()]


def test_first_screen_has_an_install_and_run_command_and_a_test_command():
    lines = _code_lines()
    assert any("pip install" in line and "ddfm-fast fuse" in line for line in lines), lines
    tests = [line for line in lines if ".venv/bin/python -m pytest" in line]
    assert tests and tests[0].startswith(".venv/bin/pip install") and "torch" not in tests[0], lines


def test_ci_runs_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "grep -m1 -E '^\\.venv/bin/.*\\.venv/bin/python -m pytest' README.md" in ci
    assert "torch==2.13.0" in ci and "TRITON_INTERPRET=1" in ci
