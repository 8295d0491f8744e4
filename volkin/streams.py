"""A TCP connection for framed protocols: large payloads land in their own buffer.

asyncio's `StreamReader` appends every received chunk to one bytearray, then
copies each `readexactly` out of it and shifts what is left to the front: a 1 MiB
payload is copied three times on its way in, and the profiles of the NBD server
and the agent's data port showed `feed_data` and `readexactly` as the largest
costs of 1 MiB writes (docs/performance.md). `Stream` is an
`asyncio.BufferedProtocol` instead: headers and other small reads come from a
staging buffer, and a read of at least `DIRECT` bytes hands the socket a
buffer of exactly that size, so the kernel copies the payload straight into the
object the caller gets (a `bytearray`).

Writes go to the transport as they are, with `drain()` for flow control; reading
pauses while more than `PAUSE_ABOVE` unread bytes wait in the staging buffer.
One task reads a stream at a time (as with `StreamReader`).

`start_tls` upgrades a connection in place (NBD's STARTTLS): asyncio's TLS
layer takes the socket and decrypts into the same buffers, so nothing above the
stream changes, and a stream that never upgrades has no extra layer at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import Any

# Reads at least this large are received in place, into a buffer of their own.
DIRECT = 32 << 10
STAGING = 256 << 10
PAUSE_ABOVE = 1 << 20


class Stream(asyncio.BufferedProtocol):
    def __init__(self, on_connect: Callable[[Stream], Awaitable[None]] | None = None) -> None:
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None  # the server's handler of this connection
        self._buffer = bytearray(STAGING)
        self._start = 0  # unread bytes are self._buffer[_start:_end]
        self._end = 0
        self._target_view: memoryview | None = None  # a large read being received in place
        self.in_place = 0  # bytes the socket wrote straight into a payload's buffer
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._lost: BaseException | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- the protocol's side ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._on_connect is not None:
            self.task = asyncio.get_running_loop().create_task(self._handle(self._on_connect))

    async def _handle(self, handler: Callable[[Stream], Awaitable[None]]) -> None:
        try:
            await handler(self)
        finally:
            self.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target_view is not None:
            return self._target_view[self._filled:]
        if self._end == len(self._buffer):
            unread = self._end - self._start
            if unread > len(self._buffer) // 2:  # mostly unread: make room by growing
                grown = bytearray(2 * len(self._buffer))
                grown[:unread] = self._buffer[self._start:self._end]
                self._buffer = grown
            else:  # mostly read: move the rest to the front
                self._buffer[:unread] = self._buffer[self._start:self._end]
            self._start, self._end = 0, unread
        return memoryview(self._buffer)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target_view is not None:
            self._filled += nbytes
            self.in_place += nbytes
            if self._filled == len(self._target_view):
                # Complete: what arrives before the reader runs goes to the staging buffer.
                self._target_view = None
                self._wake()
            return
        self._end += nbytes
        if self._end - self._start > PAUSE_ABOVE and not self._reading_paused:
            assert self.transport is not None
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc or ConnectionResetError("connection lost")
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(self._lost)
        self._drain_waiters.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        if self._reading_paused:
            assert self.transport is not None
            self._reading_paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    # -- the reader's side --------------------------------------------------------------
    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes, for headers and other small reads (`read_payload` is for
        data). `asyncio.IncompleteReadError` if the peer closes first."""
        if n >= DIRECT:
            return bytes(await self.read_payload(n))
        await self._staged(n)
        return bytes(self._take(n))

    async def read_payload(self, n: int) -> bytearray:
        """Exactly `n` bytes in a buffer of their own: for `n` >= `DIRECT` one the socket
        fills in place (unless they had already arrived)."""
        if n >= DIRECT and self._end - self._start < n:
            return await self._read_in_place(n)
        await self._staged(n)
        return bytearray(self._take(n))

    def _take(self, n: int) -> memoryview:
        """The next `n` staged bytes, consumed; copy them before the next await."""
        start = self._start
        self._consumed(start + n)
        return memoryview(self._buffer)[start:start + n]

    async def _staged(self, n: int) -> None:
        while self._end - self._start < n:
            if self._eof:
                raise self._incomplete(n)
            await self._wait()

    async def _read_in_place(self, n: int) -> bytearray:
        target = bytearray(n)
        have = self._end - self._start
        target[:have] = memoryview(self._buffer)[self._start:self._end]
        self._consumed(self._end)
        self._target_view, self._filled = memoryview(target), have
        try:
            while self._filled < n:
                if self._eof:
                    raise asyncio.IncompleteReadError(bytes(target[:self._filled]), n)
                await self._wait()
        finally:
            self._target_view = None
        return target

    def _consumed(self, upto: int) -> None:
        self._start = upto
        if self._start == self._end:
            self._start = self._end = 0
        if self._reading_paused and self._end - self._start <= PAUSE_ABOVE // 2:
            assert self.transport is not None
            self._reading_paused = False
            self.transport.resume_reading()

    def _incomplete(self, n: int) -> asyncio.IncompleteReadError:
        partial = bytes(self._buffer[self._start:self._end])
        self._consumed(self._end)
        return asyncio.IncompleteReadError(partial, n)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return self._end - self._start

    async def start_tls(self, context: SSLContext, server_side: bool,
                        server_hostname: str | None = None,
                        timeout: float | None = None) -> None:
        """Upgrades the connection to TLS where it stands: the handshake runs now, and
        every read and write after it is encrypted. Nothing may have been received past
        the request to upgrade (the protocol's peer waits for the answer first): such
        bytes would be plaintext the handshake never covered, so that is a
        `ConnectionError`. A handshake that fails, or is not done within `timeout`
        seconds, closes the connection and raises (`ssl.SSLError` or `ConnectionError`)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection lost")
        if self.buffered:
            raise ConnectionError(f"{self.buffered} bytes arrived before the TLS handshake")
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport, self, context, server_side=server_side,
                server_hostname=server_hostname, ssl_handshake_timeout=timeout)
        except BaseException as exc:
            # asyncio closed the socket; this protocol is told nothing of it.
            self.connection_lost(exc if isinstance(exc, Exception) else None)
            raise
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    # -- the writer's side --------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # as StreamWriter: drain() reports the lost connection
        self.transport.write(data)

    async def drain(self) -> None:
        """Waits while the transport holds more than its limit; raises the connection's
        error if it is gone."""
        if self._lost is not None:
            raise ConnectionResetError(str(self._lost) or "connection lost")
        if self.transport is not None and self.transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost run
            if self._lost is not None:
                raise ConnectionResetError(str(self._lost) or "connection lost")
        if not self._writing_paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await self._closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)


async def open_connection(host: str, port: int, ssl: SSLContext | None = None) -> Stream:
    """A connection to host:port; with `ssl`, over TLS, checking the server is `host`."""
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(Stream, host, port, ssl=ssl,
                                             server_hostname=host if ssl else None)
    return stream


async def start_server(handler: Callable[[Stream], Awaitable[None]], host: str | None,
                       port: int, ssl: SSLContext | None = None) -> asyncio.Server:
    """Serves each connection with `handler(stream)` in a task of its own; the
    connection is closed when the handler returns. With `ssl`, connections are TLS
    (the handler starts after the handshake)."""
    return await asyncio.get_running_loop().create_server(lambda: Stream(handler), host, port,
                                                          ssl=ssl)

