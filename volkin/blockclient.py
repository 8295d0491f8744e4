"""Long-lived connections to agents: the block data port (`volkin.blockwire`) and gRPC.

The controller reads and writes through it, and an agent pulls a peer copy's data
through it. Requests carry ids and complete out of order: any number of callers
share one connection, each waiting only for its own answer. A reader task
matches answers to requests. When the connection breaks, every request in flight
fails with `Unavailable` — its outcome is unknown, as after a crash, and the
caller (`controller.agents.AgentClient`, `agent.peer`) repeats it, which is safe
because every data request is idempotent under the block lock its plan holds —
and the next request opens a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from ssl import SSLContext

import grpc

import volkin.tls
from volkin import blockwire as w
from volkin import streams
from volkin.api.v1 import agent_pb2_grpc
from volkin.coalesce import CoalescingWriter
from volkin.errors import Unavailable, VolkinError
from volkin.rpc_status import error_from_code
from volkin.tls import CURRENT, Choice

CONNECT_TIMEOUT = 3.0


class DataConnection:
    def __init__(self, address: str, ssl: SSLContext | None = None) -> None:
        self.address = address
        self._ssl = ssl
        self._stream: streams.Stream | None = None
        self._out: CoalescingWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[w.Received]] = {}
        self._ids = itertools.count(1)
        self._connecting: asyncio.Lock | None = None

    async def _connected(self) -> CoalescingWriter:
        if self._out is not None and not self._out.is_closing():
            return self._out
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._out is not None and not self._out.is_closing():
                return self._out
            host, _, port = self.address.rpartition(":")
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    stream = await streams.open_connection(host.strip("[]"), int(port),
                                                           self._ssl)
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                raise Unavailable(f"data port {self.address}: {exc or 'connect timed out'}") \
                    from exc
            self._stream = stream
            self._out = CoalescingWriter(stream)
            self._reading = asyncio.create_task(self._read_answers(stream))
            return self._out

    async def call(self, op: w.Op, extent_id: str, offset: int = 0, length: int = 0,
                   epoch: int = 0, flags: w.Flag = w.NO_FLAGS, data: w.Data = b"",
                   timeout: float | None = None) -> w.Received:
        """Sends one request and returns its answer's data (a READ's bytes); raises the
        domain error the agent answered, or `Unavailable` if the answer never came."""
        writer = await self._connected()
        request_id = next(self._ids)
        answer: asyncio.Future[w.Received] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            header = w.encode_request(op, request_id, extent_id, offset,
                                      len(data) if data else length, epoch, flags)
            # Header and data in one go, no await in between: requests never interleave;
            # those of one turn of the event loop leave in one send.
            writer.write(header)
            if data:
                writer.write(data)
            await writer.drain()
            async with asyncio.timeout(timeout):
                return await answer
        except (ConnectionError, RuntimeError) as exc:
            raise Unavailable(f"data port {self.address}: {exc}") from exc
        except TimeoutError as exc:
            raise Unavailable(f"data port {self.address}: no answer within {timeout:.1f} s") \
                from exc
        finally:
            self._pending.pop(request_id, None)

    async def _read_answers(self, reader: streams.Stream) -> None:
        error: VolkinError = Unavailable(f"data port {self.address}: connection closed")
        try:
            while True:
                header = await reader.readexactly(w.RESPONSE_HEADER)
                response, message_length = w.decode_response_header(header)
                message = (await reader.readexactly(message_length)).decode("utf-8", "replace")
                data = await reader.read_payload(response.length) if response.length else b""
                answer = self._pending.get(response.id)
                if answer is None or answer.done():
                    continue  # its caller gave up (timeout): the answer is dropped
                if response.status:
                    answer.set_exception(error_from_code(response.status, message))
                else:
                    answer.set_result(data)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            error = Unavailable(f"data port {self.address}: connection lost ({exc})")
        except w.WireError as exc:
            error = Unavailable(f"data port {self.address}: protocol error ({exc})")
        finally:
            reader.close()
            if self._stream is reader:
                self._stream = None
                self._out = None
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(error)

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        self._out = None
        if stream is not None:
            stream.close()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reading


class AgentConnections:
    """One gRPC channel per agent address (control calls) and one block data connection
    per data port, each opened on first use and kept: the controller's agent client and
    an agent's peer copies both hold one."""

    def __init__(self, channel_options: Sequence[tuple[str, int]],
                 tls: Choice = CURRENT) -> None:
        self._options = list(channel_options)
        self._tls = volkin.tls.chosen(tls)
        self._ssl = self._tls.client_context() if self._tls is not None else None
        self._generation = self._tls.generation if self._tls is not None else 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []  # opened with files since renewed
        self._data: dict[str, DataConnection] = {}

    def stub(self, address: str) -> agent_pb2_grpc.BlockStoreStub:
        channel = self._channels.get(address)
        if channel is None or self._renewed():
            channel = volkin.tls.aio_channel(address, self._options, self._tls)
            self._channels[address] = channel
        return agent_pb2_grpc.BlockStoreStub(channel)  # type: ignore[no-untyped-call]

    def _renewed(self) -> bool:
        """True once after the TLS files changed: channels are opened again with them
        (the old ones finish their calls and are dropped)."""
        if self._tls is None:
            return False
        self._tls.material()
        if self._tls.generation == self._generation:
            return False
        self._generation = self._tls.generation
        self._retired += self._channels.values()
        self._channels.clear()
        return True

    def data(self, address: str) -> DataConnection:
        connection = self._data.get(address)
        if connection is None:
            connection = self._data[address] = DataConnection(address, self._ssl)
        return connection

    async def close(self) -> None:
        channels, self._channels = [*self._channels.values(), *self._retired], {}
        self._retired = []
        for channel in channels:
            await channel.close(None)
        connections, self._data = list(self._data.values()), {}
        for connection in connections:
            await connection.close()
