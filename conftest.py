"""Repository-wide pytest hook: a deadline for a lane that must fit in CI's time.

With ``GROMA_TEST_DEADLINE`` set (seconds since the epoch), every test that would start after it is skipped with the
reason "deadline", and the terminal summary says how many were left out. Only the latest lane sets it
(``scripts/test-latest.sh --deadline``), so that the lane, which never fails CI, takes the time CI has left and no more;
the locked lane always runs everything."""

from __future__ import annotations

import os
import time

import pytest

# Under pytest-xdist (scripts/test.sh runs a worker a core) each worker's torch gets one thread: two workers of two
# threads each on CI's two cores fight over them
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

_DEADLINE = os.environ.get("GROMA_TEST_DEADLINE")
_REASON = "deadline: GROMA_TEST_DEADLINE passed before this test started"
_left_out: list[str] = []  # the node ids skipped for the deadline, from the reports


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _DEADLINE and time.time() > float(_DEADLINE):
        pytest.skip(_REASON)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # counted from the reports, which pytest-xdist's workers send to the process that writes the summary
    skipped = report.skipped and report.when == "setup" and isinstance(report.longrepr, tuple)
    if skipped and _REASON in report.longrepr[2]:
        _left_out.append(report.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001 (pytest's signature)
    if _left_out:
        terminalreporter.write_line(
            f"deadline: {len(_left_out)} tests not run (GROMA_TEST_DEADLINE passed), the first {_left_out[0]}"
        )
