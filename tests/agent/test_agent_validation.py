"""Bad input of every kind gets a clear gRPC status and leaves the data as it was."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from tests.agent.conftest import Agent, AgentFactory, MiB, create, expect_status, pattern, read
from tests.support.tmpfs import tiny_tmpfs
from volkin.api.v1 import agent_pb2

pytestmark = pytest.mark.integration
S = grpc.StatusCode
BS = 4096


def _w(offset: int, data: bytes, extent: str = "v1", epoch: int = 5) -> agent_pb2.WriteRequest:
    return agent_pb2.WriteRequest(extent_id=extent, offset=offset, data=data, epoch=epoch)


def _copy(ranges: list[tuple[int, int, int]], source: str = "v2", agent: str = "",
          epoch: int = 5, target: str = "v1") -> agent_pb2.CopyRequest:
    return agent_pb2.CopyRequest(
        target_extent_id=target, source_extent_id=source, source_agent=agent, epoch=epoch,
        ranges=[agent_pb2.CopyRange(source_offset=s, target_offset=t, length=n)
                for s, t, n in ranges])


def bad_calls(a1: Agent, a2: Agent, v2_head: bytes) -> list[tuple[str, S, Callable[[], object]]]:
    st = a1.stub
    return [
        ("misaligned write", S.INVALID_ARGUMENT, lambda: st.Write(_w(100, b"x" * BS))),
        ("odd-sized write", S.INVALID_ARGUMENT, lambda: st.Write(_w(0, b"x" * 100))),
        ("empty write", S.INVALID_ARGUMENT, lambda: st.Write(_w(0, b""))),
        ("write past the end", S.OUT_OF_RANGE, lambda: st.Write(_w(8 * MiB - BS, b"x" * 2 * BS))),
        ("write far past the end", S.OUT_OF_RANGE, lambda: st.Write(_w(2**60, b"x" * BS))),
        ("write to an unknown extent", S.NOT_FOUND, lambda: st.Write(_w(0, b"x" * BS, "nope"))),
        ("write with a bad extent id", S.INVALID_ARGUMENT,
         lambda: st.Write(_w(0, b"x" * BS, "../v1"))),
        ("write without an epoch", S.INVALID_ARGUMENT,
         lambda: st.Write(_w(0, b"x" * BS, epoch=0))),
        ("write with an older epoch", S.FAILED_PRECONDITION,
         lambda: st.Write(_w(0, b"x" * BS, epoch=4))),
        ("write larger than one message may carry", S.INVALID_ARGUMENT,
         lambda: st.Write(_w(0, b"x" * (4 * MiB + BS)))),
        ("oversize gRPC message", S.RESOURCE_EXHAUSTED,
         lambda: st.Write(_w(0, b"x" * (8 * MiB)))),
        ("write stream with a bad chunk first", S.OUT_OF_RANGE,
         lambda: st.WriteStream(iter([_w(8 * MiB, b"x" * BS)]))),
        # A stream's chunks are checked one by one: the first (valid) chunk rewrites
        # v2's own bytes, the second is refused before it is written.
        ("write stream switching extents", S.INVALID_ARGUMENT,
         lambda: st.WriteStream(iter([_w(0, v2_head, "v2"), _w(BS, b"x" * BS, "v1")]))),
        ("misaligned zero", S.INVALID_ARGUMENT, lambda: st.Zero(agent_pb2.ZeroRequest(
            extent_id="v1", offset=0, length=BS + 1, epoch=5))),
        ("trim past the end", S.OUT_OF_RANGE, lambda: st.Zero(agent_pb2.ZeroRequest(
            extent_id="v1", offset=0, length=16 * MiB, punch_hole=True, epoch=5))),
        ("trim with an older epoch", S.FAILED_PRECONDITION, lambda: st.Zero(agent_pb2.ZeroRequest(
            extent_id="v1", offset=0, length=BS, punch_hole=True, epoch=1))),
        ("read past the end", S.OUT_OF_RANGE,
         lambda: read(a1, "v1", 4 * MiB, 8 * MiB)),
        ("misaligned read", S.INVALID_ARGUMENT, lambda: read(a1, "v1", 1, BS)),
        ("read of an unknown extent", S.NOT_FOUND, lambda: read(a1, "nope", 0, BS)),
        ("stat of an unknown extent", S.NOT_FOUND,
         lambda: st.StatExtent(agent_pb2.StatExtentRequest(extent_id="nope"))),
        ("create with a block size not a power of two", S.INVALID_ARGUMENT,
         lambda: create(a1, "v3", 8 * MiB, block_size=3000)),
        ("create with a size not a multiple of the block size", S.INVALID_ARGUMENT,
         lambda: create(a1, "v3", 8 * MiB + 512)),
        ("create of an existing extent with another size", S.ALREADY_EXISTS,
         lambda: create(a1, "v1", 16 * MiB, epoch=5)),
        ("delete with an older epoch", S.FAILED_PRECONDITION,
         lambda: st.DeleteExtent(agent_pb2.DeleteExtentRequest(extent_id="v1", epoch=2))),
        ("flush of an unknown extent", S.NOT_FOUND,
         lambda: st.Flush(agent_pb2.FlushRequest(extent_id="nope", epoch=5))),
        ("copy with no range", S.INVALID_ARGUMENT, lambda: st.Copy(_copy([]))),
        ("copy from past the source's end", S.OUT_OF_RANGE,
         lambda: st.Copy(_copy([(0, 0, BS), (8 * MiB, BS, BS)]))),
        ("copy with overlapping target ranges", S.INVALID_ARGUMENT,
         lambda: st.Copy(_copy([(0, 0, 2 * BS), (4 * BS, BS, BS)]))),
        ("copy within one extent onto itself", S.INVALID_ARGUMENT,
         lambda: st.Copy(_copy([(0, BS, 2 * BS)], source="v1"))),
        ("copy with an older epoch", S.FAILED_PRECONDITION,
         lambda: st.Copy(_copy([(0, 0, BS)], epoch=1))),
        ("copy from an unknown local extent", S.NOT_FOUND,
         lambda: st.Copy(_copy([(0, 0, BS)], source="nope"))),
        ("peer copy from an unknown extent", S.NOT_FOUND,
         lambda: st.Copy(_copy([(0, 0, BS)], source="nope", agent=a2.address))),
        ("peer copy past the peer extent's end", S.OUT_OF_RANGE,
         lambda: st.Copy(_copy([(0, 0, BS), (2 * MiB, BS, BS)], source="small",
                               agent=a2.address))),
        ("peer copy misaligned to the peer's blocks", S.INVALID_ARGUMENT,
         lambda: st.Copy(_copy([(512, 0, BS)], source="small", agent=a2.address))),
        ("peer copy from an agent that is not there", S.UNAVAILABLE,
         lambda: st.Copy(_copy([(0, 0, BS)], source="small", agent="127.0.0.1:1"))),
    ]


@pytest.mark.slow  # the unreachable-peer case waits out the peer retries (~7 s)
def test_every_kind_of_bad_input_is_refused_and_changes_nothing(
        start_agent: AgentFactory) -> None:
    a1, a2 = start_agent("a1"), start_agent("a2")
    create(a1, "v1", 8 * MiB, epoch=5)
    create(a1, "v2", 8 * MiB, epoch=5)
    create(a2, "small", MiB)
    a2.stub.Write(agent_pb2.WriteRequest(extent_id="small", offset=0, data=b"s" * MiB, epoch=1))
    v1, v2 = pattern(8 * MiB, seed=7), pattern(8 * MiB, seed=8)
    for extent, data in (("v1", v1), ("v2", v2)):
        for pos in range(0, 8 * MiB, 4 * MiB):
            a1.stub.Write(_w(pos, data[pos:pos + 4 * MiB], extent))
    before = {e.extent_id: e for e in a1.stub.ListExtents(agent_pb2.ListExtentsRequest()).extents}

    for what, code, call in bad_calls(a1, a2, v2[:BS]):
        try:
            message = expect_status(code, call)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None
        assert message, f"{what}: the status has no message"

    assert read(a1, "v1", 0, 8 * MiB) == v1
    assert read(a1, "v2", 0, 8 * MiB) == v2
    after = {e.extent_id: e for e in a1.stub.ListExtents(agent_pb2.ListExtentsRequest()).extents}
    assert {k: (e.size_bytes, e.epoch) for k, e in after.items()} == {
        k: (e.size_bytes, e.epoch) for k, e in before.items()}
    assert a1.process is not None and a1.process.poll() is None  # still serving


def test_an_agent_on_a_full_disk_says_so_and_keeps_serving(start_agent: AgentFactory,
                                                            tmp_path: object) -> None:
    from pathlib import Path

    with tiny_tmpfs(Path(str(tmp_path)) / "a1", "3m"):
        a1 = start_agent("a1")
        create(a1, "v1", 16 * MiB)
        message = expect_status(S.RESOURCE_EXHAUSTED, lambda: [
            a1.stub.Write(_w(pos, b"f" * MiB, epoch=1)) for pos in range(0, 16 * MiB, MiB)])
        assert "no space" in message
        a1.stub.Zero(agent_pb2.ZeroRequest(extent_id="v1", offset=0, length=16 * MiB,
                                           punch_hole=True, epoch=1))
        a1.stub.Write(_w(0, b"g" * BS, epoch=1))
        assert read(a1, "v1", 0, BS) == b"g" * BS
