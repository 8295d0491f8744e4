"""Block I/O and copies through real agent processes: bytes come back exactly as written."""

from __future__ import annotations

import os
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import volkin.tls
from tests.agent.conftest import LEASE_TTL, AgentFactory, MiB, create, pattern, read, write
from volkin.api.v1 import agent_pb2

pytestmark = pytest.mark.integration


def test_written_blocks_read_back_byte_for_byte(start_agent: AgentFactory) -> None:
    a1 = start_agent("a1")
    create(a1, "v1", 32 * MiB)
    data = pattern(9 * MiB, seed=1)  # more than one Read chunk and one Write message
    write(a1, "v1", 4 * MiB, data, fua=True)
    assert read(a1, "v1", 4 * MiB, 9 * MiB) == data
    assert read(a1, "v1", 0, 4 * MiB) == bytes(4 * MiB)
    chunks = list(a1.stub.Read(agent_pb2.ReadRequest(extent_id="v1", offset=0, length=3 * MiB)))
    assert [c.offset for c in chunks] == [0, MiB, 2 * MiB]


def test_write_stream_and_zero_and_trim(start_agent: AgentFactory) -> None:
    a1 = start_agent("a1")
    create(a1, "v1", 16 * MiB)
    data = pattern(12 * MiB, seed=2)
    requests = (agent_pb2.WriteRequest(extent_id="v1", offset=pos, data=data[pos:pos + MiB],
                                       fua=True, epoch=1) for pos in range(0, len(data), MiB))
    assert a1.stub.WriteStream(requests).bytes_written == 12 * MiB
    allocated = a1.stub.StatExtent(agent_pb2.StatExtentRequest(extent_id="v1")).allocated_bytes
    assert allocated >= 12 * MiB
    a1.stub.Zero(agent_pb2.ZeroRequest(extent_id="v1", offset=0, length=4 * MiB,
                                       punch_hole=True, epoch=1))
    a1.stub.Zero(agent_pb2.ZeroRequest(extent_id="v1", offset=4 * MiB, length=MiB, fua=True,
                                       epoch=1))
    a1.stub.Flush(agent_pb2.FlushRequest(extent_id="v1", epoch=1))
    assert read(a1, "v1", 0, 12 * MiB) == bytes(5 * MiB) + data[5 * MiB:]
    after = a1.stub.StatExtent(agent_pb2.StatExtentRequest(extent_id="v1")).allocated_bytes
    assert after <= allocated - 4 * MiB


def test_local_copy_of_several_ranges_is_exact(start_agent: AgentFactory) -> None:
    a1 = start_agent("a1")
    create(a1, "src", 16 * MiB)
    create(a1, "dst", 16 * MiB)
    data = os.urandom(16 * MiB)
    write(a1, "src", 0, data)
    reply = a1.stub.Copy(agent_pb2.CopyRequest(
        target_extent_id="dst", source_extent_id="src", durable=True, epoch=1, ranges=[
            agent_pb2.CopyRange(source_offset=0, target_offset=8 * MiB, length=8 * MiB),
            agent_pb2.CopyRange(source_offset=12 * MiB, target_offset=0, length=4096)]))
    assert reply.bytes_copied == 8 * MiB + 4096
    assert read(a1, "dst", 0, 16 * MiB) == (
        data[12 * MiB:12 * MiB + 4096] + bytes(8 * MiB - 4096) + data[:8 * MiB])


def test_peer_copies_move_data_agent_to_agent_among_three(start_agent: AgentFactory) -> None:
    a1, a2, a3 = start_agent("a1"), start_agent("a2"), start_agent("a3")
    for agent in (a1, a2, a3):
        create(agent, "v", 80 * MiB)
    data = pattern(80 * MiB, seed=3)
    write(a1, "v", 0, data)
    # a2 pulls all of a1 (several pieces in parallel); a3 pulls two ranges from a2.
    whole = a2.stub.Copy(agent_pb2.CopyRequest(
        target_extent_id="v", source_extent_id="v", source_agent=a1.address, durable=True,
        epoch=1, ranges=[agent_pb2.CopyRange(source_offset=0, target_offset=0,
                                             length=80 * MiB)]), timeout=60)
    assert whole.bytes_copied == 80 * MiB
    assert read(a2, "v", 0, 80 * MiB) == data
    a3.stub.Copy(agent_pb2.CopyRequest(
        target_extent_id="v", source_extent_id="v", source_agent=a2.address, epoch=1, ranges=[
            agent_pb2.CopyRange(source_offset=MiB, target_offset=40 * MiB, length=2 * MiB),
            agent_pb2.CopyRange(source_offset=70 * MiB, target_offset=0, length=4096)]))
    got = read(a3, "v", 0, 80 * MiB)
    assert got[40 * MiB:42 * MiB] == data[MiB:3 * MiB]
    assert got[:4096] == data[70 * MiB:70 * MiB + 4096]
    assert got[4096:40 * MiB] == bytes(40 * MiB - 4096)


def test_health_and_metrics_report_the_work_done(start_agent: AgentFactory) -> None:
    a1 = start_agent("a1")
    health = health_pb2_grpc.HealthStub(volkin.tls.channel(a1.address))
    for service in ("", "volkin.api.v1.BlockStore"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    create(a1, "v1", 4 * MiB)
    create(a1, "v2", 4 * MiB)
    write(a1, "v1", 0, b"m" * MiB, epoch=3)
    read(a1, "v1", 0, MiB)
    a1.stub.Copy(agent_pb2.CopyRequest(target_extent_id="v2", source_extent_id="v1", epoch=3,
                                       ranges=[agent_pb2.CopyRange(length=MiB)]))
    with pytest.raises(grpc.RpcError):
        write(a1, "v1", 0, b"m" * 4096, epoch=2)
    with urllib.request.urlopen(f"http://{a1.metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in ("volkin_agent_written_bytes_total 1.048576e+06",
                 "volkin_agent_read_bytes_total 1.048576e+06",
                 'volkin_agent_copied_bytes_total{source="local"} 1.048576e+06',
                 "volkin_agent_extents 2.0",
                 "volkin_agent_epoch_refusals_total 1.0",
                 "volkin_agent_fencing_epoch 3.0",
                 'volkin_agent_operations_total{op="write",result="FAILED_PRECONDITION"} 1.0',
                 'volkin_agent_operation_seconds_count{op="read"} 1.0'):
        assert line in text, line
    validity = [float(line.split()[1]) for line in text.splitlines()
                if line.startswith("volkin_agent_write_validity_seconds ")]
    assert validity and 0 < validity[0] <= LEASE_TTL  # renewed: it admits mutations
