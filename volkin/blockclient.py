"""One long-lived connection to an agent's data port (`volkin.blockwire`).

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

from volkin import blockwire as w
from volkin.coalesce import CoalescingWriter
from volkin.errors import Unavailable, VolkinError
from volkin.rpc_status import error_from_code

CONNECT_TIMEOUT = 3.0


class DataConnection:
    def __init__(self, address: str) -> None:
        self.address = address
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._out: CoalescingWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}
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
                    reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            except (OSError, TimeoutError) as exc:
                raise Unavailable(f"data port {self.address}: {exc or 'connect timed out'}") \
                    from exc
            self._reader, self._writer = reader, writer
            self._out = CoalescingWriter(writer)
            self._reading = asyncio.create_task(self._read_answers(reader, writer))
            return self._out

    async def call(self, op: w.Op, extent_id: str, offset: int = 0, length: int = 0,
                   epoch: int = 0, flags: w.Flag = w.NO_FLAGS, data: bytes = b"",
                   timeout: float | None = None) -> bytes:
        """Sends one request and returns its answer's data (a READ's bytes); raises the
        domain error the agent answered, or `Unavailable` if the answer never came."""
        writer = await self._connected()
        request_id = next(self._ids)
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
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

    async def _read_answers(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        error: VolkinError = Unavailable(f"data port {self.address}: connection closed")
        try:
            while True:
                header = await reader.readexactly(w.RESPONSE_HEADER)
                response, message_length = w.decode_response_header(header)
                message = (await reader.readexactly(message_length)).decode("utf-8", "replace")
                data = await reader.readexactly(response.length) if response.length else b""
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
            writer.close()
            if self._writer is writer:
                self._writer = None
                self._out = None
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(error)

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        self._out = None
        if writer is not None:
            writer.close()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reading
