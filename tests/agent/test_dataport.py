"""The block data protocol end to end: the agent's data port and the controller's connection,
over real sockets, on a real block store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.dataport import DataPort
from agent.metrics import AgentMetrics
from tests.agent.conftest import open_store
from volkin import blockwire as w
from volkin.blockclient import DataConnection
from volkin.errors import FencedOut, InvalidArgument, NotFound, OutOfRange, Unavailable

BS = 4096


def run(tmp_path: Path, scenario: Callable[[DataConnection, DataPort], Awaitable[None]]) -> None:
    async def main() -> None:
        store = open_store(tmp_path)
        store.create("e1", 1 << 20, 512, epoch=1)
        port = DataPort(store, AgentMetrics())
        number = await port.start("127.0.0.1", 0)
        connection = DataConnection(f"127.0.0.1:{number}")
        try:
            await scenario(connection, port)
        finally:
            await connection.close()
            await port.stop()
            store.close()

    asyncio.run(main())


def test_writes_and_reads_in_flight_together_complete_out_of_order_and_read_back(
        tmp_path: Path) -> None:
    async def scenario(c: DataConnection, _: DataPort) -> None:
        blocks = {n: bytes([n + 1]) * BS for n in range(64)}
        await asyncio.gather(*(c.call(w.Op.WRITE, "e1", n * BS, epoch=1, data=data)
                               for n, data in blocks.items()))
        read = await asyncio.gather(*(c.call(w.Op.READ, "e1", n * BS, BS) for n in blocks))
        assert read == list(blocks.values())
        big = bytes(range(256)) * 4096  # 1 MiB in one request, past the small-write path
        await c.call(w.Op.WRITE, "e1", 0, epoch=1, data=big, flags=w.Flag.FUA)
        assert await c.call(w.Op.READ, "e1", 0, len(big)) == big
        await c.call(w.Op.FLUSH, "e1", epoch=1)
        await c.call(w.Op.ZERO, "e1", 0, 2 * BS, epoch=1, flags=w.Flag.PUNCH_HOLE)
        assert await c.call(w.Op.READ, "e1", 0, 2 * BS) == bytes(2 * BS)

    run(tmp_path, scenario)


def test_refusals_come_back_as_the_domain_errors_of_the_grpc_service(tmp_path: Path) -> None:
    async def scenario(c: DataConnection, _: DataPort) -> None:
        with pytest.raises(NotFound, match="e9"):
            await c.call(w.Op.READ, "e9", 0, BS)
        with pytest.raises(OutOfRange):
            await c.call(w.Op.READ, "e1", 1 << 20, BS)
        with pytest.raises(InvalidArgument):
            await c.call(w.Op.WRITE, "e1", 100, epoch=1, data=b"x" * BS)  # misaligned
        await c.call(w.Op.WRITE, "e1", 0, epoch=2, data=b"n" * BS)  # a newer controller
        with pytest.raises(FencedOut, match="epoch 1 is older than epoch 2"):
            await c.call(w.Op.WRITE, "e1", 0, epoch=1, data=b"o" * BS)
        with pytest.raises(FencedOut):
            await c.call(w.Op.FLUSH, "e1", epoch=1)
        assert await c.call(w.Op.READ, "e1", 0, BS) == b"n" * BS  # still serving

    run(tmp_path, scenario)


def test_requests_in_flight_when_the_agent_goes_fail_unavailable_and_the_next_reconnects(
        tmp_path: Path) -> None:
    async def scenario(c: DataConnection, port: DataPort) -> None:
        await c.call(w.Op.WRITE, "e1", 0, epoch=1, data=b"a" * BS)
        await port.stop()
        with pytest.raises(Unavailable):
            await c.call(w.Op.READ, "e1", 0, BS, timeout=5)
        number = int(c.address.rpartition(":")[2])
        await port.start("127.0.0.1", number)
        assert await c.call(w.Op.READ, "e1", 0, BS, timeout=5) == b"a" * BS

    run(tmp_path, scenario)


def test_a_peer_that_breaks_the_protocol_is_disconnected_and_the_port_goes_on(
        tmp_path: Path) -> None:
    async def scenario(c: DataConnection, port: DataPort) -> None:
        host, _, number = c.address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(number))
        writer.write(b"NOPE" + bytes(w.REQUEST_HEADER - 4))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on us
        writer.close()
        await c.call(w.Op.WRITE, "e1", 0, epoch=1, data=b"z" * BS)
        assert await c.call(w.Op.READ, "e1", 0, BS) == b"z" * BS

    run(tmp_path, scenario)


def test_frames_round_trip_and_bad_ones_are_protocol_errors() -> None:
    frame = w.encode_request(w.Op.ZERO, 7, "m3-s9", 4096, 8192, 5, w.Flag.FUA | w.Flag.PUNCH_HOLE)
    request, name_length = w.decode_request_header(frame[:w.REQUEST_HEADER])
    assert frame[w.REQUEST_HEADER:].decode() == "m3-s9" and name_length == 5
    assert (request.op, request.id, request.offset, request.length, request.epoch) == (
        w.Op.ZERO, 7, 4096, 8192, 5)
    assert request.flags == w.Flag.FUA | w.Flag.PUNCH_HOLE
    answer, message_length = w.decode_response_header(
        w.encode_response(7, 9, "fenced", 0)[:w.RESPONSE_HEADER])
    assert (answer.id, answer.status, message_length) == (7, 9, 6)
    with pytest.raises(w.WireError):
        w.decode_request_header(b"XXXX" + frame[4:w.REQUEST_HEADER])
    with pytest.raises(w.WireError):  # unknown op
        w.decode_request_header(frame[:4] + bytes([99]) + frame[5:w.REQUEST_HEADER])
    with pytest.raises(w.WireError):  # more data than one request may carry
        w.decode_request_header(w.encode_request(w.Op.WRITE, 1, "e", 0, w.MAX_DATA + 1)
                                [:w.REQUEST_HEADER])


def test_a_copy_between_two_extents_of_the_agent_is_durable_and_a_malformed_one_refused(
        tmp_path: Path) -> None:
    async def scenario(c: DataConnection, port: DataPort) -> None:
        await c.call(w.Op.WRITE, "e1", 0, epoch=1, data=bytes(range(256)) * 64)  # 16 KiB
        port._store.create("e2", 1 << 20, 512, epoch=1)
        spec = w.CopySpec("e1", "", "", ((0, 8192, 8192), (8192, 0, 8192)))
        await c.call(w.Op.COPY, "e2", epoch=1, data=w.encode_copy(spec))
        source = await c.call(w.Op.READ, "e1", 0, 16384)
        assert await c.call(w.Op.READ, "e2", 0, 16384) == source[8192:] + source[:8192]
        with pytest.raises(FencedOut):  # fenced like any mutation
            await c.call(w.Op.WRITE, "e2", 0, epoch=2, data=b"n" * BS)
            await c.call(w.Op.COPY, "e2", epoch=1, data=w.encode_copy(spec))
        with pytest.raises(InvalidArgument, match=r"malformed|does not fit"):
            await c.call(w.Op.COPY, "e2", epoch=2, data=b"\x00\x05short")

    run(tmp_path, scenario)
