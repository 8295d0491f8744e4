"""kill -9 in the middle of a large peer copy: retrying the same copy gives the right bytes."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.agent.conftest import Agent, AgentFactory, MiB, create, pattern, read, wait_until
from volkin.api.v1 import agent_pb2

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SIZE = 160 * MiB


def _copy_request(source: Agent) -> agent_pb2.CopyRequest:
    return agent_pb2.CopyRequest(
        target_extent_id="v", source_extent_id="v", source_agent=source.address, durable=True,
        epoch=1, ranges=[agent_pb2.CopyRange(source_offset=0, target_offset=0, length=SIZE)])


def _kill_mid_copy(target: Agent, source: Agent, victim: Agent) -> None:
    """Starts the copy into `target`, kills `victim` once some bytes landed."""
    call = target.stub.Copy.future(_copy_request(source), timeout=120)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stat = target.stub.StatExtent(agent_pb2.StatExtentRequest(extent_id="v"), timeout=5)
        if stat.allocated_bytes >= 8 * MiB:
            break
        time.sleep(0.005)
    victim.kill()
    with pytest.raises(grpc.RpcError):
        call.result()


def _fill(agent: Agent, data: bytes) -> None:
    requests = (agent_pb2.WriteRequest(extent_id="v", offset=pos, data=data[pos:pos + 4 * MiB],
                                       epoch=1) for pos in range(0, len(data), 4 * MiB))
    agent.stub.WriteStream(requests, timeout=120)


def test_a_peer_copy_killed_midway_is_right_when_retried(start_agent: AgentFactory) -> None:
    source, target = start_agent("source"), start_agent("target")
    data = pattern(SIZE, seed=11)
    old = pattern(SIZE, seed=12)
    create(source, "v", SIZE)
    create(target, "v", SIZE)
    _fill(source, data)
    _fill(target, old)  # the target starts with other data, so a partial copy shows

    _kill_mid_copy(target, source, victim=target)
    target.start()
    got = read(target, "v", 0, SIZE)
    assert got != data, "the kill came too late to interrupt the copy"
    assert target.stub.Copy(_copy_request(source), timeout=120).bytes_copied == SIZE
    assert read(target, "v", 0, SIZE) == data

    _fill(target, old)
    _kill_mid_copy(target, source, victim=source)
    source.start()
    target.stub.Copy(_copy_request(source), timeout=120)
    assert read(target, "v", 0, SIZE) == data


def test_a_peer_copy_rides_out_a_quick_restart_of_its_source(start_agent: AgentFactory) -> None:
    source, target = start_agent("source"), start_agent("target")
    data = pattern(SIZE, seed=13)
    create(source, "v", SIZE)
    create(target, "v", SIZE)
    _fill(source, data)
    call = target.stub.Copy.future(_copy_request(source), timeout=120)
    wait_until(lambda: target.stub.StatExtent(agent_pb2.StatExtentRequest(
        extent_id="v"), timeout=5).allocated_bytes >= 8 * MiB, 30, "the copy is under way")
    source.kill()
    source.start()  # same port; the target's retries find it again
    assert call.result().bytes_copied == SIZE
    assert read(target, "v", 0, SIZE) == data
    assert "event=agent.peer_retry" in target.log()  # the kill did interrupt the copy
    assert "Traceback" not in target.log()
