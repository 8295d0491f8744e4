"""Controller tests use real agents, a real etcd and real controller processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

import volkin.tls
from controller.agents import AgentClient, AgentDirectory
from controller.fence import Fence
from controller.guarded import GuardedEtcd
from controller.mapstore import MapStore
from tests.agent.conftest import REPO, Agent, start_agent
from tests.support.etcd import EtcdServer, etcd_server
from volkin import etcd
from volkin.api.v1 import admin_pb2_grpc
from volkin.keys import Keys

__all__ = ["Controller", "agent_client", "etcd_server", "map_store", "start_agent",
           "start_controller"]


def agent_client(*agents: Agent, fence: Fence | None = None) -> AgentClient:
    """A controller's agent client for these agents, with a fence that never expires."""
    directory = AgentDirectory(None, Keys(), {a.node_id: a.address for a in agents})
    for agent in agents:  # reads and writes on the block data port, as a controller does
        directory.records[agent.node_id]["data_address"] = agent.data_address
    return AgentClient(directory, fence or Fence.without_lease(), io_wait=10.0)


def map_store(client: etcd.Etcd, prefix: str = "/t", fence: Fence | None = None) -> MapStore:
    return MapStore(GuardedEtcd(client, fence or Fence.without_lease()), Keys(prefix))


class Controller:
    """One `python3 -m controller` process on free ports."""

    def __init__(self, node_id: str, log_dir: Path, etcd: EtcdServer,
                 extra: tuple[str, ...] = ()) -> None:
        self.node_id = node_id
        self.etcd = etcd
        self.extra = extra
        self.log_path = log_dir / f"{node_id}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.admin = ""
        self.nbd = ""
        self._channel: grpc.Channel | None = None

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "controller", "--node-id", self.node_id,
                 "--etcd-endpoints", self.etcd.endpoint, "--listen", "127.0.0.1:0",
                 "--nbd-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                 "--lease-ttl", "2", "--shutdown-grace", "2", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})

    def wait_serving(self, timeout: float = 30.0, times: int = 1) -> None:
        """Waits until the controller logged that it serves (the `times`-th term)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text() if self.log_path.exists() else ""
            found = list(re.finditer(r"event=controller\.serving .*admin=(\S+) nbd=(\S+)",
                                     text))
            if len(found) >= times:
                self.admin, self.nbd = found[-1].group(1), found[-1].group(2)
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"controller {self.node_id} is not serving:\n{self.log()}")

    def start(self) -> Controller:
        self.log_path.unlink(missing_ok=True)
        self.spawn()
        self.wait_serving()
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    @property
    def stub(self) -> admin_pb2_grpc.AdminStub:
        if self._channel is None:
            self._channel = volkin.tls.channel(self.admin)
        return admin_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]

    def stop(self) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self.process = None
        return code

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


ControllerFactory = Callable[..., Controller]


@pytest.fixture
def start_controller(tmp_path: Path, etcd_server: EtcdServer) -> Iterator[ControllerFactory]:
    """`start_controller("c1", "--io-wait", "5")`: a controller that serves; `standby=True`
    starts one that is expected to wait as a standby."""
    controllers: list[Controller] = []

    def start(node_id: str, *extra: str, standby: bool = False) -> Controller:
        controller = Controller(node_id, tmp_path, etcd_server, extra)
        controllers.append(controller)
        if standby:
            controller.log_path.unlink(missing_ok=True)
            controller.spawn()
            wait_for_log(controller, "controller.standby")
            return controller
        return controller.start()

    yield start
    for controller in controllers:
        controller.kill()


def wait_for_log(controller: Controller, text: str, timeout: float = 30.0,
                 times: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if controller.log().count(text) >= times:
            return
        time.sleep(0.05)
    raise AssertionError(f"controller {controller.node_id} never logged {text!r}:\n"
                         f"{controller.log()[-3000:]}")
