"""The NBD server on a block device in memory: requests of a connection run concurrently and
complete out of order, the orders a client may rely on are kept, multi-conn is advertised.

The server runs in its own thread's event loop; libnbd (Debian's python3-libnbd) is the
client, with its asynchronous API so that several requests are in flight at once.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from controller.nbd.protocol import ExportInfo
from controller.nbd.server import NbdServer
from tests.support.libnbd import load
from volkin.blockwire import Data

nbd: Any = load()

MiB = 1 << 20
SIZE = 4 * MiB


class MemoryVolume:
    """A bytearray, with a delay per operation and offset to force an order of completion."""

    def __init__(self, name: str, size: int) -> None:
        self.export = ExportInfo(name, size, 4096)
        self.data = bytearray(size)
        self.delays: dict[tuple[str, int], float] = {}
        self.events: list[str] = []
        self.flushed_at: list[int] = []  # how many writes had landed at each flush

    def check(self) -> None:
        pass

    async def _delay(self, op: str, offset: int) -> None:
        await asyncio.sleep(self.delays.get((op, offset), 0.0))

    async def read(self, offset: int, length: int) -> bytes:
        await self._delay("read", offset)
        self.events.append(f"read {offset}")
        return bytes(self.data[offset:offset + length])

    async def write(self, offset: int, data: Data, fua: bool) -> None:
        await self._delay("write", offset)
        self.data[offset:offset + len(data)] = data
        self.events.append(f"write {offset} {data[:1].hex()}")

    async def zero(self, offset: int, length: int, fua: bool, fast: bool = False) -> bool:
        await self.write(offset, bytes(length), fua)
        return True

    async def flush(self) -> None:
        self.flushed_at.append(sum(e.startswith("write") for e in self.events))

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        pass  # a hint: this device keeps its bytes

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]
        self.events.append("flush")


class MemoryDevice:
    def __init__(self, *volumes: MemoryVolume) -> None:
        self.volumes = {v.export.name: v for v in volumes}

    def exports(self) -> Mapping[str, ExportInfo]:
        return {name: v.export for name, v in self.volumes.items()}

    def open(self, name: str) -> MemoryVolume:
        return self.volumes[name]

    async def acknowledge(self, timeout: float) -> None:
        pass


@pytest.fixture
def served() -> Iterator[tuple[str, MemoryVolume]]:
    volume = MemoryVolume("mem", SIZE)
    loop = asyncio.new_event_loop()
    server = NbdServer(MemoryDevice(volume), io_wait=10)
    started = threading.Event()
    address: list[str] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        host, port = loop.run_until_complete(server.start("127.0.0.1", 0))
        address.append(f"nbd://{host}:{port}/mem")
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield address[0], volume
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _connect(url: str) -> Any:
    handle = nbd.NBD()
    handle.connect_uri(url)
    return handle


def _complete(handle: Any, cookies: list[int], timeout_s: float = 10) -> list[int]:
    """Waits for every cookie; returns them in the order they completed."""
    order: list[int] = []
    waited = 0.0
    while len(order) < len(cookies):
        handle.poll(100)
        waited += 0.1
        for cookie in cookies:
            if cookie not in order and handle.aio_command_completed(cookie):
                order.append(cookie)
        assert waited < timeout_s, f"{len(order)} of {len(cookies)} completed"
    return order


def test_a_slow_request_does_not_hold_up_the_ones_behind_it(
        served: tuple[str, MemoryVolume]) -> None:
    url, volume = served
    volume.delays[("read", 0)] = 0.5
    handle = _connect(url)
    slow = handle.aio_pread(nbd.Buffer(4096), 0)
    fast = [handle.aio_pread(nbd.Buffer(4096), n * 4096) for n in range(1, 9)]
    order = _complete(handle, [slow, *fast])
    assert order[-1] == slow, "the slow read completes last: answers come out of order"


def test_overlapping_writes_keep_their_order_and_a_read_sees_the_write_before_it(
        served: tuple[str, MemoryVolume]) -> None:
    url, volume = served
    volume.delays[("write", 8192)] = 0.3  # the first write is slow
    handle = _connect(url)
    first = handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"\x01" * 8192)), 8192)
    second = handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"\x02" * 4096)), 12288)
    buffer = nbd.Buffer(8192)
    read = handle.aio_pread(buffer, 8192)
    _complete(handle, [first, second, read])
    assert bytes(volume.data[8192:12288]) == b"\x01" * 4096
    assert bytes(volume.data[12288:16384]) == b"\x02" * 4096  # not overwritten by the first
    assert buffer.to_bytearray() == b"\x01" * 4096 + b"\x02" * 4096


def test_a_flush_waits_for_every_write_before_it_but_not_for_reads(
        served: tuple[str, MemoryVolume]) -> None:
    url, volume = served
    volume.delays[("write", 0)] = 0.3
    volume.delays[("read", MiB)] = 1.0
    handle = _connect(url)
    cookies = [handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"\x05" * 4096)),
                                 n * 4096) for n in range(4)]
    slow_read = handle.aio_pread(nbd.Buffer(4096), MiB)
    flush = handle.aio_flush()
    order = _complete(handle, [*cookies, slow_read, flush])
    assert volume.flushed_at == [4], "the flush came after all four writes"
    assert order.index(flush) < order.index(slow_read), "and did not wait for the read"


def test_multi_conn_is_advertised_and_connections_see_each_others_writes(
        served: tuple[str, MemoryVolume]) -> None:
    url, _ = served
    first, second = _connect(url), _connect(url)
    assert first.can_multi_conn()
    first.pwrite(b"\x07" * 4096, 65536)
    assert second.pread(4096, 65536) == b"\x07" * 4096
    second.flush()


def test_nbdcopy_with_several_connections_moves_every_byte(
        served: tuple[str, MemoryVolume], tmp_path: Any) -> None:
    url, volume = served
    source = tmp_path / "source.raw"
    source.write_bytes(bytes(range(256)) * (SIZE // 256))
    subprocess.run(["nbdcopy", "--connections=4", "--requests=16", str(source), url],
                   check=True, capture_output=True, timeout=60)
    assert bytes(volume.data) == source.read_bytes()
