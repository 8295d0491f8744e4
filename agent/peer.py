"""Peer copy: pulling ranges of an extent from another agent straight into a local extent.

The data flows agent to agent over the peer's Read stream, never through the
controller. Large ranges are cut into pieces pulled a few at a time. A piece that
fails with a transient error is retried (tenacity) from the last byte written, and a
whole copy can be retried after any crash: writing the same source bytes to the
same target offsets again gives the same result, so copies are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from agent import dispatch
from agent.blockstore import BlockStore
from agent.validation import MAX_IO_BYTES, CopyRange, coalesce, split
from volkin import blockwire as w
from volkin.api.v1 import agent_pb2, agent_pb2_grpc
from volkin.blockclient import AgentConnections
from volkin.errors import InvalidArgument, OutOfRange, StorageIOError, Unavailable, VolkinError
from volkin.log import event
from volkin.rpc_status import error_from_agent

_log = logging.getLogger("agent.peer")

# Headroom over MAX_IO_BYTES for the protobuf envelope of one chunk.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_IO_BYTES + (64 << 10)),
    ("grpc.max_send_message_length", MAX_IO_BYTES + (64 << 10)),
    # A restarted peer is usually back within a second: reconnect soon after.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
PIECE_BYTES = 32 << 20
PARALLEL_PIECES = 4
# Transient failures (peer unreachable, stream cut) are retried with backoff
# 0.1, 0.2, 0.4, 0.8, 1.6, 2, 2 s: a peer that restarts within about seven
# seconds does not fail the copy.
ATTEMPTS = 8


def _retrying(copy: PeerCopy) -> AsyncRetrying:
    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        event(_log, "agent.peer_retry", logging.WARNING, peer=copy.source_agent,
              extent=copy.target_extent_id, attempt=state.attempt_number,
              error=getattr(error, "message", error))

    return AsyncRetrying(
        retry=retry_if_exception_type(Unavailable), stop=stop_after_attempt(ATTEMPTS),
        wait=wait_exponential(multiplier=0.1, max=2.0), reraise=True, before_sleep=log_retry)


@dataclass(frozen=True)
class PeerCopy:
    target_extent_id: str
    source_extent_id: str
    source_agent: str
    ranges: tuple[CopyRange, ...]
    durable: bool
    epoch: int
    source_data_address: str = ""  # the peer's block data port, if it has one


class PeerChannels(AgentConnections):
    """The connections to peers (`volkin.blockclient.AgentConnections`), and what each
    source extent looked like (size, block size)."""

    def __init__(self) -> None:
        super().__init__(CHANNEL_OPTIONS)
        # (peer, extent) -> (size, block size). An extent never shrinks and its block
        # size never changes, so a range valid once stays valid; one that looks past
        # the end is checked again against the peer before it is refused.
        self.extents: dict[tuple[str, str], tuple[int, int]] = {}


def _pieces(ranges: Sequence[CopyRange]) -> list[CopyRange]:
    return split(coalesce(ranges), PIECE_BYTES)


def _domain_error(exc: grpc.aio.AioRpcError, address: str) -> VolkinError:
    return error_from_agent(exc.code(), f"peer agent {address}: {exc.details()}")


async def _check_source(channels: PeerChannels, copy: PeerCopy) -> None:
    """Validates every source range against the peer's extent before any byte moves."""
    key = (copy.source_agent, copy.source_extent_id)
    known = channels.extents.get(key)
    if known is None or any(r.source_offset + r.length > known[0] for r in copy.ranges):
        stub = channels.stub(copy.source_agent)
        async for attempt in _retrying(copy):
            with attempt:
                try:
                    extent = await stub.StatExtent(
                        agent_pb2.StatExtentRequest(extent_id=copy.source_extent_id), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    raise _domain_error(exc, copy.source_agent) from exc
        known = channels.extents[key] = (int(extent.size_bytes), int(extent.block_size))
    size, block_size = known
    for r in copy.ranges:
        if r.source_offset % block_size or r.length % block_size:
            raise InvalidArgument(
                f"copy from {copy.source_agent}/{copy.source_extent_id}: offset "
                f"{r.source_offset} and length {r.length} must be multiples of its block size "
                f"{block_size}")
        if r.source_offset + r.length > size:
            raise OutOfRange(
                f"copy from {copy.source_agent}/{copy.source_extent_id}: "
                f"[{r.source_offset}, {r.source_offset + r.length}) reaches past its end at "
                f"{size}")


async def _pull_piece_data(channels: PeerChannels, store: BlockStore, copy: PeerCopy,
                           piece: CopyRange, on_bytes: Callable[[int], None]) -> None:
    """A piece through the peer's block data port: where the source holds data (MAP),
    reads of at most MAX_DATA, in flight together, each written as it arrives; where it
    has holes, holes punched in the target."""
    connection = channels.data(copy.source_data_address)

    async def one(offset: int, length: int) -> None:
        async for attempt in _retrying(copy):
            with attempt:
                data = await connection.call(w.Op.READ, copy.source_extent_id,
                                             piece.source_offset + offset, length, timeout=60)
        if len(data) != length:
            raise StorageIOError(f"peer agent {copy.source_data_address} answered a read of "
                                 f"{length} bytes with {len(data)}")
        # In a worker thread: a write of megabytes into the page cache takes long enough
        # (more when the kernel throttles dirty pages) that the event loop should go on
        # receiving the next piece meanwhile.
        await dispatch.mutate(store, copy.epoch, store.write, copy.target_extent_id,
                              piece.target_offset + offset, data, False, copy.epoch)
        on_bytes(length)

    async def hole(offset: int, length: int) -> None:
        # The source reads zeros there and holds no space: the target neither.
        await dispatch.mutate(store, copy.epoch, store.zero, copy.target_extent_id,
                              piece.target_offset + offset, length, True, False, copy.epoch)
        on_bytes(length)

    async for attempt in _retrying(copy):
        with attempt:
            answer = await connection.call(w.Op.MAP, copy.source_extent_id,
                                           piece.source_offset, piece.length, timeout=60)
    try:
        ranges = w.decode_map(answer)
    except w.WireError as exc:
        raise StorageIOError(f"peer agent {copy.source_data_address} answered a map with "
                             f"{exc}") from exc
    async with asyncio.TaskGroup() as group:
        position = 0
        for start, size in [*ranges, (piece.source_offset + piece.length, 0)]:
            begin = start - piece.source_offset
            if begin > position:
                group.create_task(hole(position, begin - position))
            for offset in range(begin, begin + size, w.MAX_DATA):
                group.create_task(one(offset, min(w.MAX_DATA, begin + size - offset)))
            position = begin + size


async def _pull_piece(stub: agent_pb2_grpc.BlockStoreStub, store: BlockStore, copy: PeerCopy,
                      piece: CopyRange, on_bytes: Callable[[int], None]) -> None:
    done = 0
    async for attempt in _retrying(copy):
        with attempt:
            call = stub.Read(agent_pb2.ReadRequest(
                extent_id=copy.source_extent_id, offset=piece.source_offset + done,
                length=piece.length - done))
            try:
                async for chunk in call:
                    n = len(chunk.data)
                    if chunk.offset != piece.source_offset + done or not 0 < n <= (
                            piece.length - done):
                        call.cancel()
                        raise StorageIOError(
                            f"peer agent {copy.source_agent} sent a chunk at {chunk.offset} of "
                            f"{n} bytes; expected offset {piece.source_offset + done}")
                    await dispatch.write(store, copy.target_extent_id,
                                         piece.target_offset + done, chunk.data, False,
                                         copy.epoch)
                    done += n
                    on_bytes(n)
            except grpc.aio.AioRpcError as exc:
                raise _domain_error(exc, copy.source_agent) from exc
            if done != piece.length:
                raise Unavailable(f"peer agent {copy.source_agent} ended the stream early")


async def pull(channels: PeerChannels, store: BlockStore, copy: PeerCopy,
               on_bytes: Callable[[int], None]) -> int:
    """Copies every range of `copy` from the peer; durable before returning if asked."""
    store.check_copy(copy.target_extent_id, None, copy.ranges)  # no I/O: on the loop
    # A stale copy fails before any byte moves (and an agent that cannot prove its
    # validity waits before it asks the peer); each chunk is admitted by the fence
    # again as it is written (`dispatch.write`), so a Fence waits for one chunk at most.
    await store.fence.ready(copy.epoch)
    await _check_source(channels, copy)
    stub = channels.stub(copy.source_agent)
    slots = asyncio.Semaphore(PARALLEL_PIECES)

    async def pull_one(piece: CopyRange) -> None:
        async with slots:
            if copy.source_data_address:
                await _pull_piece_data(channels, store, copy, piece, on_bytes)
            else:
                await _pull_piece(stub, store, copy, piece, on_bytes)

    try:
        async with asyncio.TaskGroup() as group:
            for piece in _pieces(copy.ranges):
                group.create_task(pull_one(piece))
    except BaseExceptionGroup as group_error:
        # Report the first failure; the others are usually the same cause.
        first = group_error.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    if copy.durable:
        await dispatch.mutate(store, copy.epoch, store.flush, copy.target_extent_id, copy.epoch)
    return sum(r.length for r in copy.ranges)
