"""Collects the fault trials of a pytest run: a table at the end, JSON on request.

    VOLKIN_FAULT_JSON=faults.json python3 -m pytest tests/faults
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.results import Results, base_seed

_RESULTS = Results(base_seed())


@pytest.fixture(scope="session")
def fault_results() -> Results:
    return _RESULTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _RESULTS.trials:
        return
    terminalreporter.section("fault trials")
    terminalreporter.write_line(_RESULTS.table())
    target = os.environ.get("VOLKIN_FAULT_JSON")
    if target:
        Path(target).write_text(_RESULTS.to_json())
        terminalreporter.write_line(f"fault trial results written to {target}")
