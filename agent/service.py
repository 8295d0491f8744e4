"""The BlockStore gRPC servicer: converts protobuf to domain calls and back, nothing more.

File I/O runs where `agent.dispatch` says (event loop or worker thread); domain
errors become gRPC statuses through `volkin.rpc_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from agent import copying, dispatch, peer
from agent.blockstore import BlockStore, ExtentInfo
from agent.metrics import AgentMetrics
from agent.validation import MAX_IO_BYTES
from volkin.api.v1 import agent_pb2, agent_pb2_grpc
from volkin.errors import FencedOut, InvalidArgument, VolkinError
from volkin.log import event
from volkin.rpc_status import status_of

_log = logging.getLogger("agent.service")
# Read streams send chunks of this size (or of one block, if blocks are larger).
READ_CHUNK_BYTES = 1 << 20

Context = grpc.aio.ServicerContext[Any, Any]


def _extent(info: ExtentInfo) -> agent_pb2.Extent:
    return agent_pb2.Extent(extent_id=info.extent_id, size_bytes=info.size_bytes,
                            block_size=info.block_size, allocated_bytes=info.allocated_bytes,
                            epoch=info.epoch)


class _Call:
    """Times one call and counts its result: ok, or the status its domain error maps to."""

    def __init__(self, metrics: AgentMetrics, op: str) -> None:
        self.metrics = metrics
        self.op = op

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except VolkinError as exc:
            code = status_of(exc)
            self.metrics.operations.labels(self.op, code.name).inc()
            if isinstance(exc, FencedOut):
                self.metrics.epoch_refusals.inc()
            event(_log, "agent.refused", logging.INFO, op=self.op, code=code.name,
                  error=exc.message)
            raise
        else:
            self.metrics.operations.labels(self.op, "ok").inc()
        finally:
            self.metrics.latency.labels(self.op).observe(time.perf_counter() - start)


async def _abort(context: Context, exc: VolkinError) -> None:
    await context.abort(status_of(exc), exc.message)


class BlockStoreService(agent_pb2_grpc.BlockStoreServicer):
    def __init__(self, store: BlockStore, peers: peer.PeerChannels,
                 metrics: AgentMetrics) -> None:
        self._store = store
        self._peers = peers
        self._metrics = metrics

    def _call(self, op: str) -> _Call:
        return _Call(self._metrics, op)

    async def CreateExtent(self, request: agent_pb2.CreateExtentRequest,
                           context: Context) -> agent_pb2.Extent:
        try:
            with self._call("create").measure():
                info = await dispatch.mutate(
                    self._store, request.epoch, self._store.create, request.extent_id,
                    request.size_bytes, request.block_size, request.epoch)
        except VolkinError as exc:
            await _abort(context, exc)
        self._metrics.extents.set(self._store.count())
        return _extent(info)

    async def ResizeExtent(self, request: agent_pb2.ResizeExtentRequest,
                           context: Context) -> agent_pb2.Extent:
        try:
            with self._call("resize").measure():
                info = await dispatch.mutate(
                    self._store, request.epoch, self._store.resize, request.extent_id,
                    request.size_bytes, request.epoch)
        except VolkinError as exc:
            await _abort(context, exc)
        return _extent(info)

    async def DeleteExtent(self, request: agent_pb2.DeleteExtentRequest,
                           context: Context) -> agent_pb2.DeleteExtentResponse:
        try:
            with self._call("delete").measure():
                await dispatch.mutate(self._store, request.epoch, self._store.delete,
                                      request.extent_id, request.epoch)
        except VolkinError as exc:
            await _abort(context, exc)
        self._metrics.extents.set(self._store.count())
        return agent_pb2.DeleteExtentResponse()

    async def StatExtent(self, request: agent_pb2.StatExtentRequest,
                         context: Context) -> agent_pb2.Extent:
        try:
            with self._call("stat").measure():
                info = await asyncio.to_thread(self._store.stat, request.extent_id)
        except VolkinError as exc:
            await _abort(context, exc)
        return _extent(info)

    async def ListExtents(self, request: agent_pb2.ListExtentsRequest,
                          context: Context) -> agent_pb2.ListExtentsResponse:
        with self._call("list").measure():
            infos = await asyncio.to_thread(self._store.list)
        return agent_pb2.ListExtentsResponse(extents=[_extent(i) for i in infos])

    async def Read(self, request: agent_pb2.ReadRequest,
                   context: Context) -> AsyncIterator[agent_pb2.ReadChunk]:
        store, extent_id = self._store, request.extent_id
        try:
            with self._call("read").measure():
                info = store.check_range(extent_id, request.offset, request.length, "read")
                chunk = max(READ_CHUNK_BYTES, info.block_size)
                pos, end = request.offset, request.offset + request.length
                while pos < end:
                    n = min(chunk, end - pos)
                    data = await dispatch.read(store, extent_id, pos, n)
                    self._metrics.read_bytes.inc(n)
                    yield agent_pb2.ReadChunk(offset=pos, data=bytes(data))
                    pos += n
        except VolkinError as exc:
            await _abort(context, exc)

    async def Write(self, request: agent_pb2.WriteRequest,
                    context: Context) -> agent_pb2.WriteResponse:
        try:
            with self._call("write").measure():
                n = await dispatch.write(self._store, request.extent_id, request.offset,
                                         request.data, request.fua, request.epoch)
        except VolkinError as exc:
            await _abort(context, exc)
        self._metrics.written_bytes.inc(n)
        return agent_pb2.WriteResponse(bytes_written=n)

    async def WriteStream(self, request_iterator: AsyncIterator[agent_pb2.WriteRequest],
                          context: Context) -> agent_pb2.WriteResponse:
        # Each chunk is validated before it is written; a refused chunk ends the
        # stream, and the chunks before it stay written.
        total = 0
        try:
            with self._call("write_stream").measure():
                first: agent_pb2.WriteRequest | None = None
                fua = False
                async for chunk in request_iterator:
                    if first is None:
                        first = chunk
                    elif (chunk.extent_id, chunk.epoch) != (first.extent_id, first.epoch):
                        raise InvalidArgument(
                            "every chunk of a WriteStream must name the same extent and epoch")
                    fua = fua or chunk.fua
                    total += await dispatch.write(self._store, chunk.extent_id, chunk.offset,
                                                  chunk.data, False, chunk.epoch)
                    self._metrics.written_bytes.inc(len(chunk.data))
                if first is None:
                    raise InvalidArgument("a WriteStream needs at least one chunk")
                if fua:
                    await dispatch.mutate(self._store, first.epoch, self._store.flush,
                                          first.extent_id, first.epoch)
        except VolkinError as exc:
            await _abort(context, exc)
        return agent_pb2.WriteResponse(bytes_written=total)

    async def Flush(self, request: agent_pb2.FlushRequest,
                    context: Context) -> agent_pb2.FlushResponse:
        try:
            with self._call("flush").measure():
                await dispatch.mutate(self._store, request.epoch, self._store.flush,
                                      request.extent_id, request.epoch)
        except VolkinError as exc:
            await _abort(context, exc)
        return agent_pb2.FlushResponse()

    async def Zero(self, request: agent_pb2.ZeroRequest,
                   context: Context) -> agent_pb2.ZeroResponse:
        try:
            with self._call("zero").measure():
                await dispatch.mutate(self._store, request.epoch, self._store.zero,
                                      request.extent_id, request.offset, request.length,
                                      request.punch_hole, request.fua, request.epoch)
        except VolkinError as exc:
            await _abort(context, exc)
        return agent_pb2.ZeroResponse()

    async def Copy(self, request: agent_pb2.CopyRequest,
                   context: Context) -> agent_pb2.CopyResponse:
        local = not request.source_agent
        try:
            with self._call("copy_local" if local else "copy_peer").measure():
                n = await copying.copy(
                    self._store, self._peers, self._metrics, request.target_extent_id,
                    request.source_extent_id, request.source_agent,
                    request.source_data_address, request.ranges, request.durable,
                    request.epoch)
        except VolkinError as exc:
            await _abort(context, exc)
        return agent_pb2.CopyResponse(bytes_copied=n)

    async def Fence(self, request: agent_pb2.FenceRequest,
                    context: Context) -> agent_pb2.FenceResponse:
        try:
            with self._call("fence").measure():
                epoch = await asyncio.to_thread(self._store.fence.fence, request.epoch)
        except VolkinError as exc:
            await _abort(context, exc)
        return agent_pb2.FenceResponse(epoch=epoch)

    async def StatStore(self, request: agent_pb2.StatStoreRequest,
                        context: Context) -> agent_pb2.StoreStats:
        try:
            with self._call("stat_store").measure():
                capacity, used, available = await asyncio.to_thread(self._store.space)
        except VolkinError as exc:
            await _abort(context, exc)
        return agent_pb2.StoreStats(capacity_bytes=capacity, used_bytes=used,
                                    available_bytes=available, extents=self._store.count(),
                                    epoch=self._store.fence.epoch)


SERVER_OPTIONS = [
    # One Write carries at most MAX_IO_BYTES of data; larger messages are refused by
    # gRPC itself with RESOURCE_EXHAUSTED before they reach the servicer.
    ("grpc.max_receive_message_length", MAX_IO_BYTES + (64 << 10)),
    ("grpc.max_send_message_length", MAX_IO_BYTES + (64 << 10)),
]
