"""Volumes striped over agents, end to end: a real controller process, three real agents,
qemu-io and nbdcopy over NBD, and the agents' files on disk.

The reference for every read is plain arithmetic on patterns: each 1 MiB unit of a
volume is written with its own byte, so a unit read from the wrong agent, the wrong
extent or the wrong offset shows.
"""

from __future__ import annotations

import os
import subprocess
import time

import grpc
import pytest

from tests.agent.conftest import Agent, AgentFactory
from tests.controller.conftest import Controller, ControllerFactory
from tests.support.tls import nbd_uri, qemu_nbd
from volkin.api.v1 import admin_pb2

pytestmark = pytest.mark.integration

MiB, TiB, PiB = 1 << 20, 1 << 40, 1 << 50
BLOCK = 64 * 1024


def qemu_io(c: Controller, volume: str, *commands: str) -> str:
    argv = ["qemu-io"]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, *qemu_nbd(c.nbd, volume)], capture_output=True, text=True,
                            timeout=120, check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "failed" not in out, out
    return out


def write_units(c: Controller, volume: str, units: int, base: int) -> None:
    qemu_io(c, volume, *(f"write -P {(base + u) % 256} {u}M 1M" for u in range(units)))


def read_units(c: Controller, volume: str, units: int, base: int) -> None:
    qemu_io(c, volume, *(f"read -P {(base + u) % 256} {u}M 1M" for u in range(units)))


def extents_on(agent: Agent) -> dict[str, int]:
    """Extent id -> bytes allocated in its file, for the agent's live extents."""
    found = {}
    for path in agent.data_dir.rglob("*.extent"):
        found[path.stem] = os.stat(path).st_blocks * 512
    return found


def wait_done(c: Controller, job_id: str) -> admin_pb2.Job:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job: admin_pb2.Job = c.stub.GetJob(admin_pb2.GetJobRequest(id=job_id))
        if job.state == admin_pb2.JOB_STATE_DONE:
            return job
        assert job.state in (admin_pb2.JOB_STATE_RUNNING, admin_pb2.JOB_STATE_WAITING), job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def test_a_volume_lies_in_stripes_over_every_agent_and_reads_back_through_all(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agents = [start_agent(f"a{i}") for i in (1, 2, 3)]
    # Extents of 4 MiB: a 24 MiB volume is two extents on each agent.
    c = start_controller("c1", "--extent-bytes", "4MiB")
    volume = c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V", size_bytes=24 * MiB))
    assert list(volume.agents) == ["a1", "a2", "a3"]
    assert (volume.stripe_unit_bytes, volume.stripe_width) == (MiB, 3)
    write_units(c, "V", 24, 1)
    read_units(c, "V", 24, 1)
    # One read across every stripe at once, by another client.
    out = subprocess.run(["nbdcopy", nbd_uri(c.nbd, "V"), "-"], capture_output=True,
                         timeout=60, check=True).stdout
    assert out == b"".join(bytes([(1 + u) % 256]) * MiB for u in range(24))
    for agent in agents:
        held = extents_on(agent)
        assert len(held) == 2 and sum(held.values()) == 8 * MiB, (agent.node_id, held)
    assert c.stub.GetVolume(admin_pb2.GetVolumeRequest(name="V")).allocated_bytes == 24 * MiB


def test_snapshot_refresh_and_materialize_of_striped_volumes_keep_every_unit(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agents = [start_agent(f"a{i}") for i in (1, 2, 3)]
    c = start_controller("c1", "--extent-bytes", "4MiB")
    for name in ("V1", "V2"):
        c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=12 * MiB))
    write_units(c, "V1", 12, 10)
    write_units(c, "V2", 12, 100)
    v1 = c.stub.GetVolume(admin_pb2.GetVolumeRequest(name="V1"))
    v2 = c.stub.GetVolume(admin_pb2.GetVolumeRequest(name="V2"))
    assert list(v1.agents) != list(v2.agents)  # unit k of each on another agent
    snap = c.stub.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V2", name="S2"))
    assert list(snap.agents) == list(v2.agents)  # copy-before-write stays on each agent

    job = c.stub.StartRefresh(admin_pb2.StartRefreshRequest(target="V2", source="V1"))
    qemu_io(c, "V2", "write -P 7 5M 1M")  # pushes V2's old unit 5 into S2 first
    qemu_io(c, "V1", "write -P 8 6M 1M")  # after the refresh: not V2's
    wait_done(c, job.id)
    read_units(c, "V1", 6, 10)
    qemu_io(c, "V1", "read -P 8 6M 1M")
    qemu_io(c, "V2", "read -P 7 5M 1M", "read -P 16 6M 1M")  # 10 + 6: V1's unit 6 then
    read_units(c, "S2", 12, 100)

    # The refresh made S2 real (it holds all of V2's old units). A snapshot of V1, made
    # real in the background while V1 changes, lies with V1 the same way.
    c.stub.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V1", name="T1"))
    qemu_io(c, "V1", "write -P 9 0 1M")
    materialize = c.stub.StartMaterialize(admin_pb2.StartMaterializeRequest(name="T1"))
    wait_done(c, materialize.id)
    qemu_io(c, "T1", "read -P 10 0 1M", "read -P 8 6M 1M")
    qemu_io(c, "V1", "read -P 9 0 1M")
    assert c.stub.GetVolume(admin_pb2.GetVolumeRequest(name="T1")).source == ""
    # Each agent holds a third of each of V1, V2, S2 and T1.
    for agent in agents:
        assert sum(extents_on(agent).values()) == 4 * 4 * MiB, agent.node_id


def test_a_pib_volume_is_created_snapshotted_refreshed_and_written_at_its_last_block(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agents = [start_agent(f"a{i}") for i in (1, 2, 3)]
    c = start_controller("c1")
    last = PiB - BLOCK
    for name in ("P1", "P2"):
        volume = c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=PiB))
        assert volume.size_bytes == PiB and volume.stripe_width == 3
    assert all(os.stat(path).st_size <= 8 * TiB
               for agent in agents for path in agent.data_dir.rglob("*.extent"))
    qemu_io(c, "P1", f"write -P 0x11 {last} 64k", "write -P 0x12 0 64k")
    qemu_io(c, "P2", f"write -P 0x21 {last} 64k")
    c.stub.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="P2", name="S2"))
    job = c.stub.StartRefresh(admin_pb2.StartRefreshRequest(target="P2", source="P1"))
    c.stub.PauseJob(admin_pb2.PauseJobRequest(id=job.id))  # a PiB of holes: not now
    qemu_io(c, "P2", f"read -P 0x11 {last} 64k", "read -P 0x12 0 64k")
    qemu_io(c, "S2", f"read -P 0x21 {last} 64k", "read -P 0 0 64k")
    qemu_io(c, "P2", f"write -P 0x22 {last} 64k")
    qemu_io(c, "P2", f"read -P 0x22 {last} 64k")
    qemu_io(c, "S2", f"read -P 0x21 {last} 64k")
    allocated = c.stub.GetVolume(admin_pb2.GetVolumeRequest(name="P1")).allocated_bytes
    assert allocated == 2 * BLOCK  # a PiB of holes and two blocks
    # Deleting them frees every extent on every agent.
    for name in ("S2", "P2", "P1"):
        c.stub.DeleteVolume(admin_pb2.DeleteVolumeRequest(name=name))
    assert not [p for agent in agents for p in agent.data_dir.rglob("*.extent")]


def test_a_width_wider_than_the_cluster_is_refused_and_changes_nothing(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1"), start_agent("a2")
    c = start_controller("c1")
    with pytest.raises(grpc.RpcError) as caught:
        c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="W", size_bytes=8 * MiB,
                                                          stripe_width=3))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs 3 agents; 2 are registered" in str(caught.value.details())
    with pytest.raises(grpc.RpcError) as caught:
        c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(
            name="W", size_bytes=8 * MiB, stripe_unit_bytes=3 * MiB))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not c.stub.ListVolumes(admin_pb2.ListVolumesRequest()).volumes
    narrow = c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(
        name="N", size_bytes=8 * MiB, stripe_width=1, stripe_unit_bytes=4 * MiB))
    assert (len(narrow.agents), narrow.stripe_unit_bytes) == (1, 4 * MiB)
