"""The agent's data port: read, write, flush and zero over the block data protocol.

`volkin.blockwire` is the protocol (frames, no sockets); this module serves it on
one TCP port. Each connection reads requests one after another. A read the page
cache holds, or a buffered write nothing holds up, is answered at once, in the
connection's own loop; every other request is served in a task of its own, so
many are in flight and complete out of order, as the controller's many blocks
do. Answers are written whole, one at a time. The
I/O itself is the same as the gRPC service's (`agent.dispatch`: page-cache reads
and buffered writes on the event loop, the rest in worker threads), fenced the
same way: a mutation older than the node's epoch is refused, one that the agent
cannot prove valid waits and then is refused (docs/agent.md).

A domain error is answered with its gRPC status code and message; a peer that
breaks the protocol is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from agent import copying, dispatch, peer
from agent.blockstore import BlockStore
from agent.metrics import AgentMetrics
from agent.validation import CopyRange
from volkin import blockwire as w
from volkin import streams
from volkin.coalesce import CoalescingWriter
from volkin.errors import FencedOut, InvalidArgument, VolkinError
from volkin.log import event
from volkin.rpc_status import status_of
from volkin.tls import Tls

_log = logging.getLogger("agent.dataport")
# Requests of one connection being served at once; more wait in the socket.
IN_FLIGHT = 256
_OPS = {w.Op.READ: "read", w.Op.WRITE: "write", w.Op.FLUSH: "flush", w.Op.ZERO: "zero",
        w.Op.COPY: "copy", w.Op.MAP: "map"}


class DataPort:
    def __init__(self, store: BlockStore, metrics: AgentMetrics,
                 peers: peer.PeerChannels | None = None, tls: Tls | None = None) -> None:
        self._store = store
        self._tls = tls
        self._metrics = metrics
        self._peers = peers or peer.PeerChannels()
        # The metric children of each operation, looked up once: `labels()` per request
        # cost as much as decoding the request (profile in docs/performance.md).
        self._ok = {op: metrics.operations.labels(name, "ok") for op, name in _OPS.items()}
        self._latency = {op: metrics.latency.labels(name) for op, name in _OPS.items()}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        self._server = await streams.start_server(
            self._serve, host, port, self._tls.server_context() if self._tls else None)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: streams.Stream) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        slots = asyncio.Semaphore(IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()
        peer = reader.get_extra_info("peername")
        out = CoalescingWriter(reader)
        try:
            while True:
                header = await reader.readexactly(w.REQUEST_HEADER)
                request, name_length = w.decode_request_header(header)
                extent_id = (await reader.readexactly(name_length)).decode("utf-8", "replace")
                data: w.Received = b""
                if request.op in (w.Op.WRITE, w.Op.COPY):
                    data = await reader.read_payload(request.length)
                if self._answer_now(request, extent_id, data, out):
                    await out.drain()
                    continue
                await slots.acquire()
                one = asyncio.create_task(self._answer(request, extent_id, data, out, slots))
                running.add(one)
                one.add_done_callback(running.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the controller went away
        except w.WireError as exc:
            event(_log, "agent.data_protocol_error", logging.WARNING, peer=peer, error=str(exc))
        except asyncio.CancelledError:
            pass
        finally:
            for one in running:
                one.cancel()
            self._connections.discard(task)
            reader.close()

    def _answer_now(self, request: w.Request, extent_id: str, data: w.Received,
                    out: CoalescingWriter) -> bool:
        """Answers a read the page cache holds, or a buffered write that nothing holds
        up, right here in the connection's loop (no task); False if it must wait."""
        start = time.perf_counter()
        payload: w.Received | None
        try:
            if request.op == w.Op.READ and request.length <= w.MAX_DATA:
                payload = self._store.read_nowait(extent_id, request.offset, request.length)
                if payload is None:
                    return False
                self._metrics.read_bytes.inc(len(payload))
            elif request.op == w.Op.WRITE and not request.flags & w.Flag.FUA:
                n = self._store.write_buffered_nowait(extent_id, request.offset, data,
                                                      request.epoch)
                if n is None:
                    return False
                self._metrics.written_bytes.inc(n)
                payload = b""
            else:
                return False
        except VolkinError as exc:
            self._reply(request, None, exc, out, start)
        else:
            self._reply(request, payload, None, out, start)
        return True

    async def _answer(self, request: w.Request, extent_id: str, data: w.Received,
                      out: CoalescingWriter, slots: asyncio.Semaphore) -> None:
        start = time.perf_counter()
        try:
            payload = await self._execute(request, extent_id, data)
        except VolkinError as exc:
            self._reply(request, None, exc, out, start)
        else:
            self._reply(request, payload, None, out, start)
        finally:
            slots.release()
        with contextlib.suppress(ConnectionError):
            await out.drain()  # the controller reads its answers: don't buffer without end

    def _reply(self, request: w.Request, payload: w.Received | None, error: VolkinError | None,
               out: CoalescingWriter, start: float) -> None:
        """Counts and writes one answer: `payload`, or the domain error that refused it."""
        self._latency[request.op].observe(time.perf_counter() - start)
        if error is not None:
            op = _OPS[request.op]
            code = status_of(error)
            self._metrics.operations.labels(op, code.name).inc()
            if isinstance(error, FencedOut):
                self._metrics.epoch_refusals.inc()
            event(_log, "agent.refused", logging.INFO, op=op, code=code.name,
                  error=error.message)
            reply, payload = w.encode_response(request.id, code.value[0], error.message), b""
        else:
            assert payload is not None
            self._ok[request.op].inc()
            reply = w.encode_response(request.id, length=len(payload))
        if out.is_closing():
            return
        # One answer is written whole, with no await in between: answers never interleave;
        # those of one turn of the event loop leave in one send.
        out.write(reply)
        if payload:
            out.write(payload)

    async def _execute(self, request: w.Request, extent_id: str,
                       data: w.Received) -> w.Received:
        store = self._store
        if request.op == w.Op.READ:
            if request.length > w.MAX_DATA:
                raise InvalidArgument(f"read of {request.length} bytes; at most {w.MAX_DATA} "
                                      f"per request")
            payload = await dispatch.read(store, extent_id, request.offset, request.length)
            self._metrics.read_bytes.inc(len(payload))
            return payload
        if request.op == w.Op.WRITE:
            n = await dispatch.write(store, extent_id, request.offset, data,
                                     bool(request.flags & w.Flag.FUA), request.epoch)
            self._metrics.written_bytes.inc(n)
        elif request.op == w.Op.FLUSH:
            await dispatch.mutate(store, request.epoch, store.flush, extent_id, request.epoch)
        elif request.op == w.Op.COPY:
            try:
                spec = w.decode_copy(data)
            except w.WireError as exc:
                raise InvalidArgument(str(exc)) from None
            await copying.copy(store, self._peers, self._metrics, extent_id,
                               spec.source_extent_id, spec.source_agent,
                               spec.source_data_address,
                               [CopyRange(*r) for r in spec.ranges], True, request.epoch)
        elif request.op == w.Op.MAP:
            ranges = await asyncio.to_thread(self._store.data_ranges, extent_id, request.offset,
                                             request.length, w.MAX_MAP_RANGES)
            return w.encode_map(list(ranges))
        elif request.op == w.Op.ZERO:
            await dispatch.mutate(store, request.epoch, store.zero, extent_id, request.offset,
                                  request.length, bool(request.flags & w.Flag.PUNCH_HOLE),
                                  bool(request.flags & w.Flag.FUA), request.epoch)
        return b""
