"""The CLI as users run it: `python3 -m volkin.cli …` as a real process, and dev clusters
of real etcd, agent and controller processes in a temporary directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import tls
from volkin.devcluster import processes

REPO = Path(__file__).resolve().parents[2]


def volkin(*args: str, env: dict[str, str] | None = None,
           timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Runs `volkin ARGS` and returns what it did; never raises on a non-zero exit."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("VOLKIN_")}
    base["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "volkin.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**base, **(env or {})}, cwd=REPO)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """Asserts the command failed with exactly one readable line on stderr; returns it."""
    assert done.returncode != 0, done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("volkin: "), done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.strip()


class DevCluster:
    """`volkin dev …` on one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env: dict[str, str] = {}

    def up(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """`dev up`, with --tls while the suite runs with TLS."""
        done = volkin("dev", "up", "--dir", str(self.dir), *extra,
                      *(["--tls"] if tls.enabled() else []))
        if done.returncode == 0:
            self.env = dict(line.split("=", 1) for line in done.stdout.splitlines())
        return done

    def status(self) -> dict[str, dict[str, object]]:
        done = volkin("dev", "status", "--dir", str(self.dir), "-o", "json")
        assert done.returncode == 0, done.stderr
        return {c["name"]: c for c in json.loads(done.stdout)["components"]}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return volkin(*args, env=self.env)

    def ok(self, *args: str) -> str:
        done = self.cli(*args)
        assert done.returncode == 0, f"volkin {' '.join(args)}: {done.stderr}"
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "-o", "json"))

    def recorded_pids(self) -> list[tuple[int, list[str]]]:
        path = self.dir / "cluster.json"
        if not path.exists():
            return []
        return [(c["pid"], c["argv"]) for c in json.loads(path.read_text())["components"]]

    def teardown(self) -> None:
        """dev down, and SIGKILL anything it left, so no test leaves a process behind."""
        volkin("dev", "down", "--dir", str(self.dir), "--timeout", "5")
        for pid, argv in self.recorded_pids():
            if processes.is_running(pid, argv):
                os.kill(pid, signal.SIGKILL)
                processes.wait_gone(pid, argv, 5)


@pytest.fixture
def dev_dir(tmp_path: Path) -> Iterator[DevCluster]:
    """A directory for a dev cluster that the test brings up itself; torn down after."""
    cluster = DevCluster(tmp_path / "dev")
    try:
        yield cluster
    finally:
        cluster.teardown()


@pytest.fixture(scope="module")
def dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """A running dev cluster with 2 agents, shared by one test module."""
    cluster = DevCluster(tmp_path_factory.mktemp("cluster") / "dev")
    try:
        done = cluster.up("--agents", "2")
        assert done.returncode == 0, done.stderr
        yield cluster
    finally:
        cluster.teardown()
