"""Agents as real processes on loopback, against a real etcd."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import grpc
import pytest

import volkin.tls
from agent.blockstore import BlockStore
from tests.support.etcd import EtcdServer, etcd_server
from volkin import etcd as volkin_etcd
from volkin.api.v1 import agent_pb2, agent_pb2_grpc
from volkin.keys import Keys

__all__ = ["etcd_server"]

REPO = Path(__file__).resolve().parents[2]
LEASE_TTL = 2
MiB = 1 << 20


class Agent:
    """One `python3 -m agent` process; its data directory outlives restarts."""

    def __init__(self, node_id: str, data_dir: Path, etcd: EtcdServer,
                 args: Sequence[str] = ()) -> None:
        self.node_id = node_id
        self.data_dir = data_dir
        self.etcd = etcd
        self.args = list(args)  # extra flags, e.g. ["--fence-wait", "1"]
        self.log_path = data_dir.parent / f"{node_id}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.data_address = ""  # the block data port (volkin.blockwire)
        self.metrics_address = ""
        self._channel: grpc.Channel | None = None
        self.port = 0  # kept across restarts so peers can find the agent again

    def start(self, timeout: float = 20.0) -> None:
        listen = f"127.0.0.1:{self.port}"
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent", "--node-id", self.node_id,
                 "--data-dir", str(self.data_dir), "--listen", listen,
                 "--metrics-listen", "127.0.0.1:0", "--etcd-endpoints", self.etcd.endpoint,
                 "--lease-ttl", str(LEASE_TTL), "--shutdown-grace", "2", *self.args],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text()[offset:]
            found = re.search(r"event=agent\.serving .*address=(\S+) metrics=(\S+)", text)
            if found:
                self.address, self.metrics_address = found.group(1), found.group(2)
                self.port = int(self.address.rpartition(":")[2])
                data = re.search(r"event=agent\.serving .* data=(\S+)", text)
                self.data_address = data.group(1) if data else ""
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"agent {self.node_id} did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    @property
    def stub(self) -> agent_pb2_grpc.BlockStoreStub:
        if self._channel is None:
            self._channel = volkin.tls.channel(self.address, options=[
                ("grpc.max_send_message_length", 64 * MiB),
                ("grpc.max_receive_message_length", 64 * MiB)])
        return agent_pb2_grpc.BlockStoreStub(self._channel)  # type: ignore[no-untyped-call]

    def _forget_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        self._forget_channel()
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(20)
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL: no shutdown, no deregistration."""
        self._forget_channel()
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class AgentFactory(Protocol):
    def __call__(self, node_id: str, *args: str) -> Agent: ...


@pytest.fixture
def start_agent(tmp_path: Path, etcd_server: EtcdServer) -> Iterator[AgentFactory]:
    """Starts agents on demand: `start_agent("a1")`, or with extra flags
    `start_agent("a1", "--fence-wait", "1")`; all are stopped after the test."""
    agents: list[Agent] = []

    def start(node_id: str, *args: str) -> Agent:
        agent = Agent(node_id, tmp_path / node_id, etcd_server, args)
        agent.start()
        agents.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in agents:
            agent.kill()


def create(agent: Agent, extent_id: str, size: int, block_size: int = 4096,
           epoch: int = 1) -> agent_pb2.Extent:
    return agent.stub.CreateExtent(agent_pb2.CreateExtentRequest(  # type: ignore[no-any-return]
        extent_id=extent_id, size_bytes=size, block_size=block_size, epoch=epoch), timeout=10)


def write(agent: Agent, extent_id: str, offset: int, data: bytes, epoch: int = 1,
          fua: bool = False) -> None:
    for pos in range(0, len(data), 4 * MiB):
        agent.stub.Write(agent_pb2.WriteRequest(
            extent_id=extent_id, offset=offset + pos, data=data[pos:pos + 4 * MiB], fua=fua,
            epoch=epoch), timeout=30)


def read(agent: Agent, extent_id: str, offset: int, length: int) -> bytes:
    chunks = agent.stub.Read(agent_pb2.ReadRequest(
        extent_id=extent_id, offset=offset, length=length), timeout=60)
    return b"".join(c.data for c in chunks)


def pattern(length: int, seed: int) -> bytes:
    """Deterministic bytes that differ at every block for different seeds."""
    block = bytes((seed * 31 + i * 7) % 251 for i in range(4096))
    out = bytearray()
    for n in range(length // 4096):
        out += n.to_bytes(8, "little") + block[8:]
    return bytes(out)


def expect_status(code: grpc.StatusCode, call: Callable[[], object]) -> str:
    """Runs `call`, asserts it fails with `code`, returns the status message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert isinstance(error, grpc.Call)
    assert error.code() == code, f"{error.code()}: {error.details()}"
    return error.details() or ""


def etcd_agents(etcd: EtcdServer) -> dict[str, bytes]:
    """The agent registrations in etcd, by key."""

    async def fetch() -> dict[str, bytes]:
        client = await volkin_etcd.connect([etcd.endpoint])
        try:
            return await client.get_prefix(Keys().agents)
        finally:
            await client.close()

    return asyncio.run(fetch())


def set_controller_epoch(etcd: EtcdServer, epoch: int) -> None:
    """Stores the controller's fencing epoch in etcd, as a new leader would."""

    async def put() -> None:
        client = await volkin_etcd.connect([etcd.endpoint])
        try:
            await client.put(Keys().epoch, str(epoch).encode())
        finally:
            await client.close()

    asyncio.run(put())


def fence(agent: Agent, epoch: int) -> int:
    """The Fence RPC; returns the node's epoch."""
    reply = agent.stub.Fence(agent_pb2.FenceRequest(epoch=epoch), timeout=10)
    return int(reply.epoch)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting until {what}")


def open_store(data_dir: Path, fence_wait: float = 5.0) -> BlockStore:
    """A block store in process, valid for an hour as if etcd had just been reached."""
    store = BlockStore(data_dir, node_id="t1", fence_wait=fence_wait)
    store.fence.validity.proved(time.monotonic(), lease_ttl=3600)
    return store
