"""Growing a striped volume, end to end: a real controller process, three real agents,
qemu-io over NBD, the agents' files on disk, and a controller restart.

Each 1 MiB unit is written with its own byte (as in `test_striping`), so a unit that a
resize moved to another agent, extent or offset shows; the new units must read zeros.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from tests.agent.conftest import AgentFactory
from tests.controller.conftest import ControllerFactory
from tests.controller.test_striping import extents_on, qemu_io, read_units, write_units
from volkin.api.v1 import admin_pb2, agent_pb2

pytestmark = pytest.mark.integration

MiB = 1 << 20


def sizes_on(agent_dir: Path) -> dict[str, int]:
    """Extent id -> size of its file, for the agent's live extents."""
    return {path.stem: os.stat(path).st_size for path in agent_dir.rglob("*.extent")}


def test_a_grown_striped_volume_keeps_its_units_reads_zeros_after_them_and_survives_a_restart(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agents = [start_agent(f"a{i}") for i in (1, 2, 3)]
    c = start_controller("c1", "--extent-bytes", "4MiB")
    c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V", size_bytes=12 * MiB))
    write_units(c, "V", 12, 1)
    # 12 MiB over 3 agents: one 4 MiB extent each. 40 MiB: 14, 13 and 13 MiB per column,
    # so each first extent stays 4 MiB and the columns gain extents of 4 and the rest.
    volume = c.stub.ResizeVolume(admin_pb2.ResizeVolumeRequest(name="V", size_bytes=40 * MiB))
    assert (volume.size_bytes, volume.total_blocks) == (40 * MiB, 40 * MiB // volume.block_size)
    assert [sorted(sizes_on(a.data_dir).values()) for a in agents] == [
        [2 * MiB, 4 * MiB, 4 * MiB, 4 * MiB], [MiB, 4 * MiB, 4 * MiB, 4 * MiB],
        [MiB, 4 * MiB, 4 * MiB, 4 * MiB]]
    # A new connection sees the new size: the old units, then zeros.
    read_units(c, "V", 12, 1)
    qemu_io(c, "V", "read -P 0 12M 28M")
    qemu_io(c, "V", "write -P 0xee 39M 1M")
    # The same size again changes nothing.
    again = c.stub.ResizeVolume(admin_pb2.ResizeVolumeRequest(name="V", size_bytes=40 * MiB))
    assert again.size_bytes == 40 * MiB
    assert sum(sum(extents_on(a).values()) for a in agents) == 13 * MiB
    c.stop()
    c.start()
    assert c.stub.GetVolume(admin_pb2.GetVolumeRequest(name="V")).size_bytes == 40 * MiB
    read_units(c, "V", 12, 1)
    qemu_io(c, "V", "read -P 0 12M 27M", "read -P 0xee 39M 1M")


def test_shrinking_or_growing_a_volume_something_reads_through_is_refused_and_changes_nothing(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agents = [start_agent(f"a{i}") for i in (1, 2, 3)]
    c = start_controller("c1", "--extent-bytes", "4MiB")
    c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V", size_bytes=12 * MiB))
    write_units(c, "V", 12, 1)
    c.stub.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V", name="S1"))
    before = [sizes_on(a.data_dir) for a in agents]
    refused = [
        (admin_pb2.ResizeVolumeRequest(name="V", size_bytes=8 * MiB),
         grpc.StatusCode.INVALID_ARGUMENT, "volumes only grow"),
        (admin_pb2.ResizeVolumeRequest(name="V", size_bytes=40 * MiB + 1),
         grpc.StatusCode.INVALID_ARGUMENT, "multiple of the block size"),
        (admin_pb2.ResizeVolumeRequest(name="V", size_bytes=40 * MiB),
         grpc.StatusCode.FAILED_PRECONDITION, "materialize S1 first"),
        (admin_pb2.ResizeVolumeRequest(name="S1", size_bytes=40 * MiB),
         grpc.StatusCode.FAILED_PRECONDITION, "volkin snapshot materialize S1"),
        (admin_pb2.ResizeVolumeRequest(name="nope", size_bytes=40 * MiB),
         grpc.StatusCode.NOT_FOUND, "does not exist"),
    ]
    for request, code, message in refused:
        with pytest.raises(grpc.RpcError) as caught:
            c.stub.ResizeVolume(request)
        assert caught.value.code() == code, caught.value
        assert message in str(caught.value.details())
    assert [sizes_on(a.data_dir) for a in agents] == before
    for name in ("V", "S1"):
        assert c.stub.GetVolume(admin_pb2.GetVolumeRequest(name=name)).size_bytes == 12 * MiB
    read_units(c, "S1", 12, 1)
    assert c.log().count("audit.resize_volume") == len(refused)  # refused ones too


def test_a_resize_repeated_after_a_crash_between_the_agents_and_etcd_finds_the_extents_grown(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    agents = [start_agent(f"a{i}") for i in (1, 2, 3)]
    c = start_controller("c1", "--extent-bytes", "4MiB")
    c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V", size_bytes=10 * MiB))
    write_units(c, "V", 10, 50)
    # 10 MiB: columns of 4, 3 and 3 MiB, one extent each. What a controller that died
    # after growing them for 20 MiB (columns of 7, 7 and 6 MiB), before storing the new
    # size, leaves behind: grown extents and new ones that etcd does not know of.
    for agent in agents:
        (extent,) = agent.stub.ListExtents(agent_pb2.ListExtentsRequest()).extents
        epoch = extent.epoch
        column = int(extent.extent_id.split("-c")[1].split("-")[0])
        agent.stub.ResizeExtent(agent_pb2.ResizeExtentRequest(
            extent_id=extent.extent_id, size_bytes=4 * MiB, epoch=epoch))
        agent.stub.CreateExtent(agent_pb2.CreateExtentRequest(
            extent_id=extent.extent_id.replace("-e0", "-e1"),
            size_bytes=(3 if column < 2 else 2) * MiB, block_size=512, epoch=epoch))
    c.stop()
    c.start()
    assert c.stub.GetVolume(admin_pb2.GetVolumeRequest(name="V")).size_bytes == 10 * MiB
    read_units(c, "V", 10, 50)
    c.stub.ResizeVolume(admin_pb2.ResizeVolumeRequest(name="V", size_bytes=20 * MiB))
    read_units(c, "V", 10, 50)
    qemu_io(c, "V", "read -P 0 10M 10M", "write -P 0x77 19M 1M", "read -P 0x77 19M 1M")
