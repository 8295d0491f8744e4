"""The node's fencing epoch and the extents are durable: an agent restart forgets neither."""

from __future__ import annotations

import functools

import grpc
import pytest

from tests.agent.conftest import AgentFactory, MiB, create, expect_status, pattern, read, write
from volkin.api.v1 import agent_pb2

pytestmark = pytest.mark.integration


def test_a_stale_controller_is_fenced_out_of_every_extent_also_after_restart(
        start_agent: AgentFactory) -> None:
    a1 = start_agent("a1")
    create(a1, "v1", 4 * MiB, epoch=1)
    create(a1, "v2", 4 * MiB, epoch=1)
    write(a1, "v1", 0, b"o" * MiB, epoch=1)
    write(a1, "v2", 0, b"n" * MiB, epoch=2)  # a newer controller took over, touching v2 only
    message = expect_status(grpc.StatusCode.FAILED_PRECONDITION,
                            lambda: write(a1, "v1", 0, b"s" * MiB, epoch=1))
    assert message == ("agent a1: epoch 1 is older than epoch 2 already seen; a newer "
                       "controller took over")

    a1.kill()  # no chance to flush anything on the way down
    a1.start()
    for extent in ("v1", "v2"):
        expect_status(grpc.StatusCode.FAILED_PRECONDITION,
                      functools.partial(write, a1, extent, 0, b"s" * MiB, epoch=1))
    expect_status(grpc.StatusCode.FAILED_PRECONDITION, lambda: a1.stub.DeleteExtent(
        agent_pb2.DeleteExtentRequest(extent_id="v1", epoch=1)))
    assert read(a1, "v1", 0, MiB) == b"o" * MiB
    assert read(a1, "v2", 0, MiB) == b"n" * MiB
    assert a1.stub.StatExtent(agent_pb2.StatExtentRequest(extent_id="v1")).epoch == 2


def test_a_deleted_extent_cannot_be_recreated_by_a_stale_controller(
        start_agent: AgentFactory) -> None:
    a1 = start_agent("a1")
    create(a1, "v1", 4 * MiB, epoch=4)
    a1.stub.DeleteExtent(agent_pb2.DeleteExtentRequest(extent_id="v1", epoch=4))
    a1.restart()
    expect_status(grpc.StatusCode.FAILED_PRECONDITION, lambda: create(a1, "v1", 4 * MiB, epoch=3))
    assert create(a1, "v1", 4 * MiB, epoch=4).epoch == 4
    assert read(a1, "v1", 0, MiB) == bytes(MiB)


def test_a_restart_keeps_every_extent_and_its_data(start_agent: AgentFactory) -> None:
    a1 = start_agent("a1")
    data = {f"v{n}": pattern(2 * MiB, seed=n) for n in range(3)}
    for n, (extent_id, content) in enumerate(data.items()):
        create(a1, extent_id, 2 * MiB, block_size=512 << n, epoch=n + 1)
        write(a1, extent_id, 0, content, epoch=n + 1, fua=True)
    assert a1.stop() == 0  # SIGTERM: a clean exit
    a1.start()
    extents = a1.stub.ListExtents(agent_pb2.ListExtentsRequest()).extents
    assert [(e.extent_id, e.block_size, e.epoch) for e in extents] == [
        ("v0", 512, 3), ("v1", 1024, 3), ("v2", 2048, 3)]  # the node's epoch
    for extent_id, content in data.items():
        assert read(a1, extent_id, 0, 2 * MiB) == content
