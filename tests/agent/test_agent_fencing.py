"""Node-wide fencing through real agent processes and a real etcd.

A deposed controller must not change a byte after a newer one took over, whatever
extent it touches; an agent learns the newer epoch from a Fence call or from etcd,
and admits mutations only while it can prove it would have learnt it.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from tests.agent.conftest import (
    LEASE_TTL,
    AgentFactory,
    MiB,
    create,
    etcd_agents,
    expect_status,
    fence,
    read,
    set_controller_epoch,
    wait_until,
    write,
)
from tests.support.etcd import EtcdServer
from volkin.api.v1 import agent_pb2

pytestmark = pytest.mark.integration
S = grpc.StatusCode
CANNOT_PROVE = ("so it cannot prove that no newer controller took over; refusing writes until "
                "it does")


def test_fence_raises_the_epoch_for_every_extent_and_survives_kill_9(
        start_agent: AgentFactory) -> None:
    a1 = start_agent("a1")
    for extent in ("v1", "v2"):
        create(a1, extent, 4 * MiB, epoch=1)
        write(a1, extent, 0, b"o" * MiB, epoch=1)
    assert fence(a1, 3) == 3
    for extent in ("v1", "v2"):
        message = expect_status(S.FAILED_PRECONDITION,
                                functools.partial(write, a1, extent, 0, b"s" * MiB, epoch=2))
        assert "epoch 2 is older than epoch 3" in message

    a1.kill()
    a1.start()
    for extent in ("v1", "v2"):
        expect_status(S.FAILED_PRECONDITION,
                      functools.partial(write, a1, extent, 0, b"s" * MiB, epoch=2))
        assert read(a1, extent, 0, MiB) == b"o" * MiB
        assert a1.stub.StatExtent(agent_pb2.StatExtentRequest(extent_id=extent)).epoch == 3
    assert fence(a1, 3) == 3  # equal: a no-op
    expect_status(S.FAILED_PRECONDITION, lambda: fence(a1, 2))
    write(a1, "v2", 0, b"n" * MiB, epoch=3)
    assert read(a1, "v2", 0, MiB) == b"n" * MiB


def test_an_agent_started_while_etcd_holds_epoch_7_refuses_6_and_accepts_7(
        start_agent: AgentFactory, etcd_server: EtcdServer) -> None:
    set_controller_epoch(etcd_server, 7)
    etcd_server.stop()
    a1 = start_agent("a1", "--fence-wait", "1")
    # A fresh data directory: the node's epoch is 0 until the agent reads etcd, and it
    # accepts nothing before that, not even epoch 6.
    message = expect_status(S.UNAVAILABLE, lambda: create(a1, "v1", 4 * MiB, epoch=6))
    assert message.startswith("agent a1 has not reached etcd since it started ")
    assert message.endswith(CANNOT_PROVE)
    assert list(a1.stub.ListExtents(agent_pb2.ListExtentsRequest()).extents) == []

    etcd_server.restart()

    def epoch_6_is_fenced_out() -> bool:
        try:
            create(a1, "v1", 4 * MiB, epoch=6)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            assert exc.code() in (S.UNAVAILABLE, S.FAILED_PRECONDITION), exc.details()
            return exc.code() == S.FAILED_PRECONDITION
        raise AssertionError("epoch 6 was accepted though etcd holds 7")

    wait_until(epoch_6_is_fenced_out, 15, "a1 read epoch 7 from etcd")
    assert create(a1, "v1", 4 * MiB, epoch=7).epoch == 7
    write(a1, "v1", 0, b"7" * MiB, epoch=7)
    assert read(a1, "v1", 0, MiB) == b"7" * MiB


def test_an_agent_learns_a_newer_epoch_from_etcd_while_it_runs(
        start_agent: AgentFactory, etcd_server: EtcdServer) -> None:
    a1 = start_agent("a1")
    create(a1, "v1", 4 * MiB, epoch=1)
    set_controller_epoch(etcd_server, 2)  # a new leader that has not called a1 yet
    wait_until(lambda: a1.stub.StatExtent(agent_pb2.StatExtentRequest(
        extent_id="v1")).epoch == 2, 3 * LEASE_TTL, "a1 reads epoch 2 at a renewal")
    expect_status(S.FAILED_PRECONDITION, lambda: write(a1, "v1", 0, b"s" * MiB, epoch=1))
    assert "event=agent.epoch_raised" in a1.log() and "by=etcd" in a1.log()


@contextmanager
def _paused(etcd: EtcdServer) -> Iterator[None]:
    """etcd stops answering (SIGSTOP) without closing a connection, like a partition."""
    assert etcd.process is not None
    os.kill(etcd.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(etcd.process.pid, signal.SIGCONT)


@pytest.mark.slow
def test_an_agent_cut_off_from_etcd_refuses_mutations_until_it_reaches_it_again(
        start_agent: AgentFactory, etcd_server: EtcdServer) -> None:
    a1 = start_agent("a1", "--fence-wait", "0.5")
    create(a1, "v1", 4 * MiB, epoch=1)
    write(a1, "v1", 0, b"a" * MiB, epoch=1)
    with _paused(etcd_server):
        cut_at = time.monotonic()
        last_ok = cut_at
        deadline = cut_at + 15
        while True:
            assert time.monotonic() < deadline, "mutations were still accepted after 15 s"
            try:
                write(a1, "v1", 0, b"b" * MiB, epoch=1)
                last_ok = time.monotonic()
            except grpc.RpcError as exc:
                assert isinstance(exc, grpc.Call)
                assert exc.code() == S.UNAVAILABLE, exc.details()
                message = exc.details() or ""
                break
        # No write was accepted once its lease could have expired in etcd.
        assert last_ok - cut_at < LEASE_TTL
        assert message.startswith("agent a1 has not reached etcd for ")
        assert message.endswith(CANNOT_PROVE)
        assert read(a1, "v1", 0, MiB) == b"b" * MiB  # reads are served throughout
        expect_status(S.UNAVAILABLE, lambda: a1.stub.Flush(
            agent_pb2.FlushRequest(extent_id="v1", epoch=1), timeout=10))
        assert fence(a1, 2) == 2  # raising the epoch needs no proof

    def accepted() -> bool:
        try:
            write(a1, "v1", 0, b"c" * MiB, epoch=2)
            return True
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            assert exc.code() == S.UNAVAILABLE, exc.details()
            return False

    wait_until(accepted, 20, "a1 accepts mutations once etcd answers again")
    assert read(a1, "v1", 0, MiB) == b"c" * MiB


def test_an_agent_on_a_data_dir_without_node_file_starts_at_its_highest_epoch(
        start_agent: AgentFactory) -> None:
    a1 = start_agent("a1")
    create(a1, "v1", 4 * MiB, epoch=2)
    create(a1, "v2", 4 * MiB, epoch=5)
    create(a1, "gone", 4 * MiB, epoch=6)
    a1.stub.DeleteExtent(agent_pb2.DeleteExtentRequest(extent_id="gone", epoch=6))
    assert a1.stop() == 0
    # As an agent with per-extent epochs left it: metas and tombstones, no node file.
    (a1.data_dir / "node.json").unlink()
    a1.start()
    assert json.loads((a1.data_dir / "node.json").read_bytes()) == {"format": 1, "epoch": 6}
    expect_status(S.FAILED_PRECONDITION, lambda: write(a1, "v1", 0, b"x" * MiB, epoch=5))
    write(a1, "v1", 0, b"x" * MiB, epoch=6)
    assert "event=agent.node_epoch_initialised" in a1.log()


def test_the_registration_record_shows_the_node_epoch_and_the_lease_ttl(
        start_agent: AgentFactory, etcd_server: EtcdServer) -> None:
    a1 = start_agent("a1")

    def record() -> dict[str, object]:
        raw = etcd_agents(etcd_server).get("/volkin/agents/a1")
        return dict(json.loads(raw)) if raw else {}

    wait_until(lambda: record().get("epoch") == 0, 5, "a1 registers")
    assert record()["lease_ttl"] == LEASE_TTL
    set_controller_epoch(etcd_server, 4)
    wait_until(lambda: record().get("epoch") == 4, 3 * LEASE_TTL,
               "the record shows the epoch read from etcd")
    assert fence(a1, 9) == 9
    wait_until(lambda: record().get("epoch") == 9, 3 * LEASE_TTL,
               "the record shows the epoch a Fence raised")
    assert record()["address"] == a1.address
