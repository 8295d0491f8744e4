"""Start-up failures are one readable line and a non-zero exit, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=30)


def test_the_console_script_is_installed_and_describes_every_setting() -> None:
    script = shutil.which("volkin-agent")
    assert script, "volkin-agent is not on PATH: pip install -e . first"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--node-id", "--data-dir", "--listen", "--etcd-endpoints", "--metrics-listen",
                 "--lease-ttl", "--config"):
        assert flag in result.stdout


def test_a_bad_setting_exits_2_naming_it() -> None:
    result = _run("--data-dir", "/tmp/x", "--lease-ttl", "zero")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "volkin-agent: setting lease_ttl='zero' is invalid: invalid literal for int() with "
        "base 10: 'zero'"]


def test_an_unusable_data_directory_exits_1_with_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _run("--data-dir", str(blocker / "data"), "--listen", "127.0.0.1:0",
                  "--metrics-listen", "")
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreadable_node_file_exits_1_naming_it(tmp_path: Path) -> None:
    (tmp_path / "node.json").write_text('{"format": 99, "epoch": 3}')
    result = _run("--data-dir", str(tmp_path), "--listen", "127.0.0.1:0", "--metrics-listen", "")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"volkin-agent: cannot start: {tmp_path / 'node.json'} is not a node file this agent "
        "understands: format 99, expected 1"]
