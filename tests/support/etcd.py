"""A real etcd server for tests: free loopback ports, data in a temporary directory.

    server = EtcdServer(tmp_path / "etcd"); server.start()
    EtcdServer(path, args=["--quota-backend-bytes", "4194304"])   # more etcd flags
    server.endpoint          # "127.0.0.1:PORT" for clients

With the process's TLS (VOLKIN_TLS_*, set by tests/conftest.py unless
VOLKIN_TEST_TLS=0), etcd serves clients over mTLS with the same CA.
    server.restart()         # same ports, same data: what a real etcd restart looks like
    server.stop()

`etcd_server` is a ready-made pytest fixture; import it into a conftest.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import volkin.tls

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(self, data_dir: Path, args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.args = tuple(args)
        self.client_port = 0
        self.peer_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log = data_dir.parent / f"{data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 15.0) -> None:
        """Starts etcd on new free ports (or the same ones after stop()) and waits for it."""
        for _attempt in range(3):
            if not self.client_port:
                self.client_port, self.peer_port = free_port(), free_port()
            self._spawn()
            if self._wait_healthy(timeout):
                return
            self.stop()
            self.client_port = 0  # maybe a port race: try others
        raise RuntimeError(f"etcd did not become healthy; see {self._log}")

    def _spawn(self) -> None:
        tls = volkin.tls.current()
        client_url = f"{volkin.tls.scheme()}://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self._log, "ab")  # noqa: SIM115 - owned by the child from here on
        self.process = subprocess.Popen(
            [ETCD, "--name", "test", "--data-dir", str(self.data_dir),
             "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"test={peer_url}", "--log-level", "warn",
             "--logger", "zap", *volkin.tls.etcd_server_flags(tls), *self.args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                tls = volkin.tls.current()
                url = f"{volkin.tls.scheme()}://{self.endpoint}/health"
                context = tls.client_context() if tls is not None else None
                with urllib.request.urlopen(url, timeout=1, context=context) as response:
                    if b'"health":"true"' in response.read():
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Stops etcd (SIGTERM, then SIGKILL); keeps the ports and the data."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stops etcd, stays down `down_for` seconds, starts it on the same ports and data."""
        self.stop()
        time.sleep(down_for)
        self._spawn()
        if not self._wait_healthy(15.0):
            raise RuntimeError(f"etcd did not come back; see {self._log}")


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh etcd for one test, stopped afterwards."""
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()
