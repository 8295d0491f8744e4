"""volkin.streams over real loopback sockets: every byte arrives, in order, whatever the
sizes of the reads and the chunks the sender cuts them into; large reads are received in
place; a peer gone mid-payload is an IncompleteReadError; a reader that stops reading
stops the socket, not the memory."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from volkin import streams


async def _pair() -> tuple[streams.Stream, socket.socket, asyncio.Server]:
    accepted: asyncio.Future[streams.Stream] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(stream: streams.Stream) -> None:
        accepted.set_result(stream)
        await done.wait()

    server = await streams.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    client.setblocking(False)
    stream = await accepted
    return stream, client, server


async def _send(client: socket.socket, data: bytes, rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        n = rng.choice((1, 7, 4096, 65536, 1 << 20))
        await loop.sock_sendall(client, view[:n])
        view = view[n:]
        if rng.random() < 0.3:
            await asyncio.sleep(0)


def test_reads_of_every_size_get_every_byte_in_order_however_the_sender_cuts_them() -> None:
    async def main() -> None:
        rng = random.Random(20261126)
        sizes = [rng.choice((1, 4, 20, 36, 4096, streams.DIRECT - 1, streams.DIRECT,
                             65536, 1 << 20, 4 << 20)) for _ in range(120)]
        data = rng.randbytes(sum(sizes))
        stream, client, server = await _pair()
        sender = asyncio.create_task(_send(client, data, rng))
        position = 0
        for size in sizes:
            got = await (stream.read_payload(size) if size > 100 else stream.readexactly(size))
            assert len(got) == size
            assert got == data[position:position + size], f"read of {size} at {position}"
            position += size
        await sender
        large = sum(size for size in sizes if size >= streams.DIRECT)
        assert stream.in_place > large // 2, "large reads were not received in place"
        client.close()
        with pytest.raises(asyncio.IncompleteReadError) as gone:
            await stream.readexactly(1)
        assert gone.value.partial == b""
        server.close()

    asyncio.run(main())


@pytest.mark.parametrize("size", [100, 1 << 20], ids=["staged", "in place"])
def test_a_peer_gone_mid_read_is_an_incomplete_read_with_what_arrived(size: int) -> None:
    async def main() -> None:
        stream, client, server = await _pair()
        client.sendall(b"x" * (size // 2))
        client.close()
        with pytest.raises(asyncio.IncompleteReadError) as gone:
            await stream.readexactly(size)
        assert gone.value.partial == b"x" * (size // 2)
        assert gone.value.expected == size
        server.close()

    asyncio.run(main())


def test_a_reader_that_does_not_read_pauses_the_socket_and_loses_nothing() -> None:
    async def main() -> None:
        rng = random.Random(7)
        data = rng.randbytes(24 << 20)  # far more than the socket buffers and PAUSE_ABOVE
        stream, client, server = await _pair()
        sender = asyncio.create_task(asyncio.get_running_loop().sock_sendall(client, data))
        await asyncio.sleep(0.5)
        assert not sender.done(), "the sender was never held back"
        assert stream._end - stream._start <= 2 * streams.PAUSE_ABOVE + streams.STAGING
        got = bytearray()
        while len(got) < len(data):
            got += await stream.readexactly(min(100, len(data) - len(got)))
        await sender
        assert got == data
        client.close()
        server.close()

    asyncio.run(main())


def test_drain_after_the_peer_is_gone_raises_connection_reset() -> None:
    async def main() -> None:
        stream, client, server = await _pair()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # linger 0: a reset
        with pytest.raises(ConnectionError):
            for _ in range(100):
                stream.write(b"y" * 65536)
                await stream.drain()
                await asyncio.sleep(0.01)
        server.close()

    asyncio.run(main())


def test_a_connection_made_by_open_connection_reads_and_writes_both_ways() -> None:
    async def main() -> None:
        async def echo(stream: streams.Stream) -> None:
            while True:
                try:
                    header = await stream.readexactly(4)
                except asyncio.IncompleteReadError:
                    return
                body = await stream.readexactly(int.from_bytes(header, "big"))
                stream.write(header)
                stream.write(body)
                await stream.drain()

        server = await streams.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = await streams.open_connection("127.0.0.1", port)
        for size in (0, 5, 1 << 16, 3 << 20):
            body = random.Random(size).randbytes(size)
            client.write(len(body).to_bytes(4, "big") + body)
            assert await client.readexactly(4) == len(body).to_bytes(4, "big")
            assert await client.readexactly(size) == body
        client.close()
        await client.wait_closed()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
