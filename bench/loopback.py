"""A volkin cluster on loopback for the benchmarks, started with the tests' helpers.

    with Loopback(controller_args=("--compact-every", "10")) as cluster:
        leader = cluster.start()                    # etcd, agents a1 and a2, controller c1
        standby = cluster.controller("c2", standby=True)
        leader.stub.ListVolumes(...)

A real etcd, real agent and controller processes on free ports, everything in a
temporary directory that `stop()` (or leaving the `with`) removes after killing
every process it started (unless `keep`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.agent.conftest import Agent
from tests.controller.conftest import Controller, wait_for_log
from tests.support.etcd import EtcdServer


class Loopback:
    def __init__(self, agents: int = 2, controller_args: Sequence[str] = (),
                 keep: bool = False) -> None:
        self.keep = keep  # leave the directory (logs, data) behind for a post-mortem
        self.work = Path(tempfile.mkdtemp(prefix="volkin-bench-"))
        self.etcd = EtcdServer(self.work / "etcd")
        self.agents: list[Agent] = []
        self.controllers: list[Controller] = []
        self.controller_args = tuple(controller_args)
        self._agent_count = agents

    def start(self) -> Controller:
        """Starts etcd, the agents and controller c1; returns c1 once it serves."""
        self.etcd.start()
        for n in range(1, self._agent_count + 1):
            agent = Agent(f"a{n}", self.work / f"a{n}", self.etcd)
            agent.start()
            self.agents.append(agent)
        return self.controller("c1")

    def controller(self, node_id: str, standby: bool = False) -> Controller:
        """A controller process with `controller_args`: serving, or waiting as a standby."""
        controller = Controller(node_id, self.work, self.etcd, self.controller_args)
        self.controllers.append(controller)
        if not standby:
            return controller.start()
        controller.log_path.unlink(missing_ok=True)
        controller.spawn()
        wait_for_log(controller, "controller.standby")
        return controller

    def stop(self) -> None:
        for controller in self.controllers:
            controller.kill()
        for agent in self.agents:
            agent.kill()
        self.etcd.stop()
        if not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
