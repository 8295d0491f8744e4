"""The whole suite runs with mTLS on every channel unless VOLKIN_TEST_TLS=0 (CI runs it
both ways): see tests/support/tls.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import volkin.tls
from tests.support import tls

_made: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    if not tls.enabled() or os.environ.get(volkin.tls.ENV_CA):
        return
    directory = Path(tempfile.mkdtemp(prefix="volkin-test-pki-"))
    _made.append(directory)
    os.environ.update(tls.Pki.make(directory).environment("node"))
    volkin.tls.configure(volkin.tls.from_env())


def pytest_unconfigure(config: pytest.Config) -> None:
    for directory in _made:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(directory.with_name(directory.name + "-fio-home"), ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> str:
    return f"volkin TLS: {'on' if os.environ.get(volkin.tls.ENV_CA) else 'off'}"
