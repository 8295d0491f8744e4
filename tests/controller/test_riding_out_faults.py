"""The controller rides out faults: fencing in a split brain, agent restarts, jobs that wait.

Real processes throughout: etcd, agents and controllers, and qemu-io as the NBD client
(an interactive session keeps one connection open across the fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time

import grpc
import pytest

import volkin.tls
from tests.agent.conftest import Agent, AgentFactory, wait_until
from tests.controller.conftest import Controller, ControllerFactory, wait_for_log
from tests.controller.test_daemon import qemu_io, status_of, wait_job
from tests.support.tls import nbd_uri, qemu_nbd
from volkin import etcd
from volkin.api.v1 import admin_pb2, admin_pb2_grpc
from volkin.keys import Keys

pytestmark = pytest.mark.integration

MiB = 1 << 20


class QemuIoSession:
    """One NBD connection held open: qemu-io reading its commands from a pipe."""

    def __init__(self, nbd: str, volume: str) -> None:
        self.process = subprocess.Popen(
            ["qemu-io", *qemu_nbd(nbd, volume)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def text(self) -> str:
        return "".join(self.output)

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.text():
                return
            time.sleep(0.05)
        raise AssertionError(f"qemu-io never printed {text!r}:\n{self.text()}")

    def close(self) -> str:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        return self.text()


def leader_epoch(c: Controller) -> int:
    async def read() -> int:
        client = await etcd.connect([c.etcd.endpoint])
        try:
            return int(await client.get(Keys().epoch) or 0)
        finally:
            await client.close()
    return asyncio.run(read())


def placement(c: Controller) -> dict[str, bytes]:
    """The layout records of every memory (`Keys.extent`)."""
    async def read() -> dict[str, bytes]:
        client = await etcd.connect([c.etcd.endpoint])
        try:
            return await client.get_prefix(Keys().extents)
        finally:
            await client.close()
    return asyncio.run(read())


# -- fencing -----------------------------------------------------------------------
def test_a_deposed_controller_acknowledges_nothing_and_changes_no_byte_of_a_new_snapshot(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    """The issue's 20-second split brain: the leader is paused with a write queued on its
    NBD connection; a standby takes over and snapshots V1; the old leader resumes."""
    start_agent("a1"), start_agent("a2")
    first = start_controller("c1")
    first.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V1", size_bytes=4 * MiB))
    qemu_io(first.nbd, "V1", "write -P 0x11 0 4M")
    second = start_controller("c2", standby=True)
    session = QemuIoSession(first.nbd, "V1")
    try:
        session.send("read -P 0x11 0 64k")
        session.wait_for("read 65536/65536")
        first.pause()
        second.wait_serving()
        assert leader_epoch(second) == 2
        second.stub.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V1", name="S1"))
        session.send("write -P 0x22 0 64k")  # queued on the deposed leader's connection
        time.sleep(0.5)
        first.resume()
        wait_for_log(first, "controller.stepped_down")
        output = session.close()
    finally:
        first.resume()
    assert "wrote 65536/65536" not in output, output  # never acknowledged
    qemu_io(second.nbd, "S1", "read -P 0x11 0 4M")  # the snapshot holds V1 as it was
    qemu_io(second.nbd, "V1", "read -P 0x11 0 4M")  # and nothing landed in V1 either
    # The deposed controller is a standby now: it answers, but serves nothing.
    assert status_of(lambda: first.stub.ListVolumes(
        admin_pb2.ListVolumesRequest())) == grpc.StatusCode.UNAVAILABLE


def test_a_standby_refuses_admin_calls_and_nbd_clients_with_a_readable_reason(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    start_controller("c1")
    standby = start_controller("c2", standby=True)
    found = [line for line in standby.log().splitlines() if "controller.listening" in line]
    assert found, standby.log()
    admin = found[0].split("admin=")[1].split()[0]
    nbd = found[0].split("nbd=")[1].split()[0]
    channel = volkin.tls.channel(admin)
    try:
        stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListVolumes(admin_pb2.ListVolumesRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "standby" in (caught.value.details() or "")
    finally:
        channel.close()
    result = subprocess.run(["nbdinfo", nbd_uri(nbd, "V")], capture_output=True, text=True,
                            timeout=30, check=False)
    # NBD_REP_ERR_SHUTDOWN, which libnbd renders as ESHUTDOWN's text (the server's own
    # message, "... is a standby ...", is shown by clients that print it, e.g. nbdinfo -v).
    assert result.returncode != 0 and "shutdown" in result.stderr, result.stderr


def test_a_controller_paused_past_its_lease_steps_down_and_leads_again_later(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    c = start_controller("c1")
    c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V", size_bytes=MiB))
    qemu_io(c.nbd, "V", "write -P 0x33 0 1M")
    c.pause()
    time.sleep(4)  # twice the lease
    c.resume()
    wait_for_log(c, "controller.stepped_down")
    c.wait_serving(times=2)  # nobody else was there: it leads again, at a new epoch
    assert leader_epoch(c) == 2
    qemu_io(c.nbd, "V", "read -P 0x33 0 1M", "write -P 0x34 0 4k")
    qemu_io(c.nbd, "V", "read -P 0x34 0 4k")


# -- agents that restart --------------------------------------------------------------
def test_nbd_io_waits_for_a_restarting_agent_and_then_completes(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agent = start_agent("a1")
    c = start_controller("c1", "--io-wait", "30")
    c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V", size_bytes=4 * MiB))
    qemu_io(c.nbd, "V", "write -P 0x44 0 4M")
    agent.kill()
    writing = subprocess.Popen(
        ["qemu-io", "-c", "write -P 0x45 1M 1M", "-c", "read -P 0x44 0 1M",
         *qemu_nbd(c.nbd, "V")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2.0)
    assert writing.poll() is None  # waiting, not failed
    agent.start()
    output, _ = writing.communicate(timeout=60)
    assert writing.returncode == 0 and "wrote 1048576/1048576" in output, output
    assert "verification failed" not in output and "error" not in output.lower(), output
    qemu_io(c.nbd, "V", "read -P 0x44 0 1M", "read -P 0x45 1M 1M", "read -P 0x44 2M 2M")
    assert "agent.retrying" in c.log() and "agent.reachable" in c.log()


def test_nbd_io_gets_eio_only_past_io_wait(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agent = start_agent("a1")
    c = start_controller("c1", "--io-wait", "2")
    c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V", size_bytes=MiB))
    agent.kill()
    started = time.monotonic()
    result = subprocess.run(["qemu-io", "-c", "write -P 0x46 0 4k", *qemu_nbd(c.nbd, "V")],
                            capture_output=True, text=True, timeout=60, check=False)
    waited = time.monotonic() - started
    assert "Input/output error" in result.stdout + result.stderr, result
    assert waited >= 1.5, waited
    agent.start()
    qemu_io(c.nbd, "V", "write -P 0x47 0 4k")  # and it works again once the agent is back
    qemu_io(c.nbd, "V", "read -P 0x47 0 4k")


def _refresh_with_a_slow_job(c: Controller, rate: int = 2 * MiB) -> admin_pb2.Job:
    admin = c.stub
    for name in ("V1", "V2"):
        admin.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=8 * MiB))
    qemu_io(c.nbd, "V1", "write -P 0x51 0 8M")
    qemu_io(c.nbd, "V2", "write -P 0x52 0 8M")
    admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V2", name="S2"))
    return admin.StartRefresh(admin_pb2.StartRefreshRequest(  # type: ignore[no-any-return]
        target="V2", source="V1", rate_bytes_per_second=rate))


def _agent_of(c: Controller, agents: dict[str, Agent], volume: str) -> Agent:
    nodes = c.stub.GetVolume(admin_pb2.GetVolumeRequest(name=volume)).agents
    return agents[nodes[0]]


def test_a_job_waits_while_its_agent_is_down_and_finishes_when_it_returns(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agents = {name: start_agent(name) for name in ("a1", "a2")}
    c = start_controller("c1")
    job = _refresh_with_a_slow_job(c)
    source = _agent_of(c, agents, "V1")
    source.kill()

    def waiting() -> bool:
        now: admin_pb2.Job = c.stub.GetJob(admin_pb2.GetJobRequest(id=job.id))
        return now.state == admin_pb2.JOB_STATE_WAITING and now.waiting_seconds > 0

    wait_until(waiting, 30, "the job shows it is waiting")
    now = c.stub.GetJob(admin_pb2.GetJobRequest(id=job.id))
    assert source.node_id in now.reason and "\n" not in now.reason, now.reason
    source.start()
    done = wait_job(c, job.id)
    assert done.state == admin_pb2.JOB_STATE_DONE and done.blocks_done == done.blocks_total
    assert done.bytes_copied == done.blocks_total * 65536
    qemu_io(c.nbd, "V2", "read -P 0x51 0 8M")
    qemu_io(c.nbd, "S2", "read -P 0x52 0 8M")


def test_a_job_that_waited_too_long_fails_in_one_line_and_resumes_on_request(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agents = {name: start_agent(name) for name in ("a1", "a2")}
    c = start_controller("c1", "--job-fail-after", "3")
    job = _refresh_with_a_slow_job(c)
    source = _agent_of(c, agents, "V1")
    source.kill()
    failed = wait_job(c, job.id)
    assert failed.state == admin_pb2.JOB_STATE_FAILED
    assert "gave up after waiting" in failed.error and "\n" not in failed.error, failed.error
    source.start()
    resumed = c.stub.ResumeJob(admin_pb2.ResumeJobRequest(id=job.id))
    assert resumed.state == admin_pb2.JOB_STATE_RUNNING
    done = wait_job(c, job.id)
    assert done.state == admin_pb2.JOB_STATE_DONE
    qemu_io(c.nbd, "V2", "read -P 0x51 0 8M")
    qemu_io(c.nbd, "S2", "read -P 0x52 0 8M")


def test_job_progress_is_recomputed_from_the_maps_after_a_failover(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1"), start_agent("a2")
    first = start_controller("c1")
    job = _refresh_with_a_slow_job(first, rate=MiB)
    time.sleep(2.0)
    before = first.stub.GetJob(admin_pb2.GetJobRequest(id=job.id))
    assert 0 < before.blocks_done < before.blocks_total
    second = start_controller("c2", standby=True)
    first.kill()
    second.wait_serving()
    after = second.stub.GetJob(admin_pb2.GetJobRequest(id=job.id))
    assert after.blocks_done >= before.blocks_done
    assert after.bytes_copied == after.blocks_done * 65536
    assert wait_job(second, job.id).state == admin_pb2.JOB_STATE_DONE


# -- flush, delete and connections -------------------------------------------------------
def test_flushing_a_snapshot_never_written_succeeds_and_creates_nothing(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agent = start_agent("a1")
    c = start_controller("c1")
    c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V", size_bytes=MiB))
    c.stub.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V", name="S"))
    before = placement(c)
    qemu_io(c.nbd, "S", "flush", "read -P 0 0 1M")
    assert placement(c) == before  # neither the flush nor the read placed anything
    # The snapshot's layout is its origin's, recorded with it; it has no extent yet.
    assert c.stub.GetVolume(admin_pb2.GetVolumeRequest(name="S")).agents == ["a1"]
    assert len(list(agent.data_dir.rglob("*.extent"))) == 1  # V's alone


def test_deleting_a_volume_in_use_is_refused_unless_forced_which_closes_its_connections(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    c = start_controller("c1")
    c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="vdel", size_bytes=4 * MiB))
    session = QemuIoSession(c.nbd, "vdel")
    try:
        session.send("write -P 0x61 0 4k")
        session.wait_for("wrote 4096/4096")
        assert c.stub.GetVolume(admin_pb2.GetVolumeRequest(name="vdel")).connections == 1
        with pytest.raises(grpc.RpcError) as caught:
            c.stub.DeleteVolume(admin_pb2.DeleteVolumeRequest(name="vdel"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--force" in (caught.value.details() or "")
        c.stub.DeleteVolume(admin_pb2.DeleteVolumeRequest(name="vdel", force=True))
        c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="vdel", size_bytes=4 * MiB))
        session.send("write -P 0x62 0 4k")  # on the old connection: must not reach the new one
        time.sleep(1.0)
    finally:
        output = session.close()
    assert output.count("wrote 4096/4096") == 1, output
    qemu_io(c.nbd, "vdel", "read -P 0 0 4M")  # the new volume is untouched
