"""A pytest plugin that writes every test's outcome, as it happens, to a JSON-lines file.

``ddfm-fast bench --suite gpu`` runs the GPU tests in a subprocess with ``-p ddfm_fast.pytest_outcomes`` and
``DDFM_TEST_OUTCOMES=FILE``. Each line is written and flushed when pytest reports it, so a run stopped by a time
limit still leaves the outcomes of the tests that finished and names the one that was running
(:func:`ddfm_fast.gpu_check.read_outcomes` reads the file back). Without the variable the plugin does nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

ENV_OUTCOMES = "DDFM_TEST_OUTCOMES"
_REASON_CHARS = 400


def _write(record: dict[str, Any]) -> None:
    path = os.environ.get(ENV_OUTCOMES)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _reason(report: Any) -> Optional[str]:
    """A skip's reason, or a failure's one-line cause (pytest's crash message), shortened."""
    longrepr = getattr(report, "longrepr", None)
    if longrepr is None:
        return None
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, "Skipped: why")
        text = str(longrepr[2])
        return text[len("Skipped: "):] if text.startswith("Skipped: ") else text
    crash = getattr(longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) or str(longrepr).strip().splitlines()[-1]
    return text.strip()[:_REASON_CHARS]


def pytest_collection_finish(session: Any) -> None:
    _write({"event": "collected", "nodeids": [item.nodeid for item in session.items]})


def pytest_collectreport(report: Any) -> None:
    if report.outcome in ("failed", "skipped"):  # a module that fails to import, or skips itself whole
        _write({"event": "collect", "nodeid": report.nodeid, "outcome": report.outcome, "reason": _reason(report)})


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _write({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report: Any) -> None:
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    _write({"event": "report", "nodeid": report.nodeid, "when": report.when, "outcome": outcome,
            "seconds": round(float(report.duration), 3), "reason": _reason(report)})
