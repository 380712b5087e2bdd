"""A pytest plugin (``-p bench.pytest_log``): each test's outcome appended to the file named by
``REMOTE_TEST_LOG`` as one JSON line the moment it is known, so a run killed at its time limit
keeps what it finished (a JUnit XML report is written only at the end). Collection errors are
lines too."""

from __future__ import annotations

import json
import os

import pytest

LOG_ENV = "REMOTE_TEST_LOG"


def _write(test: str, outcome: str, seconds: float, message: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = {"test": test, "outcome": outcome, "seconds": round(seconds, 2), "message": message}
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(line) + "\n")
        log.flush()


def _message(report: pytest.BaseReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")[:300]  # (file, line, reason)
    return str(report.longrepr or "")[-300:]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # one line a test: its call's outcome, or a setup that skipped or failed, or a teardown
    # that failed
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = {"passed": "passed", "skipped": "skipped"}.get(report.outcome, "failed")
    elif report.when == "teardown" and report.failed:
        outcome = "failed"
    else:
        return
    _write(report.nodeid, outcome, report.duration, "" if report.passed else _message(report))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _write(report.nodeid, "failed", 0.0, "collection: " + _message(report))
