"""Carries out the engine's plans against real agents and etcd: the imperative shell.

Each step of a `Plan` becomes one call:

    Copy    -> Copy on the target's agent, pulling from the source's agent when the
               two differ (agent to agent, never through the controller), durable
    Commit  -> the group commit to etcd, then the engine applies it
    Write   -> Write on the target's agent (FUA when the plan asks for durability)
    Read    -> Read on the source's agent

Steps run strictly in order, which keeps the durability order of the plan: a
copy is durable (the agent fsyncs before it answers) before the commit that
validates it, and that commit is in etcd before the write that overwrites what
it preserved. `BlockLocks` serialises plans per block (`Plan.unit`).

Extents are created when a memory is first used: a primary volume's when it is
created, a snapshot's or a spill memory's by the first copy or write into it. Data offsets are byte
offsets inside the volume's block; the agents' extents use 512-byte blocks, so
partial writes must be 512-byte aligned (finer ones are the NBD layer's
read-modify-write).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

import grpc

from controller.batching import Batcher
from controller.mapstore import GroupCommit
from controller.placement import ExtentRef, Placement
from volkin.api.v1 import agent_pb2, agent_pb2_grpc
from volkin.engine import Commit, Copy, MapEngine, Plan, Read, Write
from volkin.errors import InvalidArgument

EXTENT_BLOCK = 512
MAX_WRITE = 4 << 20  # the agent's largest Write message


class BlockLocks:
    """One lock per block index, and a gate between block plans and topology changes.

    Plans of the same unit never overlap; plans of different units run at once.
    A topology operation (snapshot, refresh, delete, detach) changes the graph
    every plan was computed from, so it runs `exclusive()`: it waits until no plan
    is in flight, and plans that arrive meanwhile wait for it (it is never starved).

    A lock exists only while someone holds or waits for it, so a job over a 1 TiB
    volume does not leave 16 million locks behind. Several blocks are always taken
    in ascending order, so two holders of several blocks cannot deadlock.
    """

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}
        self._gate = asyncio.Condition()
        self._plans = 0  # holders of block locks
        self._topology_waiting = 0
        self._topology = False

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._gate:
            self._topology_waiting += 1
            try:
                await self._gate.wait_for(lambda: self._plans == 0 and not self._topology)
            finally:
                self._topology_waiting -= 1
            self._topology = True
        try:
            yield
        finally:
            async with self._gate:
                self._topology = False
                self._gate.notify_all()

    async def _enter_plans(self) -> None:
        async with self._gate:
            await self._gate.wait_for(
                lambda: not self._topology and not self._topology_waiting)
            self._plans += 1

    async def _leave_plans(self) -> None:
        async with self._gate:
            self._plans -= 1
            self._gate.notify_all()

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, unit: int) -> AsyncIterator[None]:
        async with self.hold_many([unit]):
            yield

    @asynccontextmanager
    async def hold_many(self, units: Iterable[int]) -> AsyncIterator[None]:
        await self._enter_plans()
        held: list[int] = []
        try:
            for unit in sorted(set(units)):
                lock = self._ref(unit)
                try:
                    await lock.acquire()
                except BaseException:
                    self._unref(unit)
                    raise
                held.append(unit)
            yield
        finally:
            for unit in reversed(held):
                self._locks[unit][0].release()
                self._unref(unit)
            await self._leave_plans()

    def _ref(self, unit: int) -> asyncio.Lock:
        lock, users = self._locks.get(unit) or (asyncio.Lock(), 0)
        self._locks[unit] = (lock, users + 1)
        return lock

    def _unref(self, unit: int) -> None:
        lock, users = self._locks[unit]
        if users == 1:
            del self._locks[unit]
        else:
            self._locks[unit] = (lock, users - 1)


_CopyKey = tuple[str, str, str, str]  # target agent, target extent, source extent, source agent


class PlanExecutor:
    def __init__(self, engine: MapEngine, group: GroupCommit, placement: Placement,
                 epoch: int,
                 persist_placement: Callable[[Placement], Awaitable[None]] | None = None) -> None:
        self.engine = engine
        self._group = group
        self._placement = placement
        self._epoch = epoch
        # Called after a new memory is placed and before its extent is created.
        self._persist_placement = persist_placement
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._created: set[str] = set()
        # Concurrent copies between the same two extents share one agent call and one fsync.
        self._copies: Batcher[_CopyKey, agent_pb2.CopyRange] = Batcher(self._send_copy)

    def _stub(self, agent: str) -> agent_pb2_grpc.BlockStoreStub:
        if agent not in self._channels:
            self._channels[agent] = grpc.aio.insecure_channel(agent, options=[
                ("grpc.max_send_message_length", 8 << 20),
                ("grpc.max_receive_message_length", 8 << 20)])
        return agent_pb2_grpc.BlockStoreStub(self._channels[agent])  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)

    async def create_memory(self, memory: str, size_bytes: int) -> ExtentRef:
        new = self._placement.extent_of(memory) is None
        ref = self._placement.place(memory)
        if new and self._persist_placement is not None:
            await self._persist_placement(self._placement)
        if memory not in self._created:
            await self._stub(ref.agent).CreateExtent(agent_pb2.CreateExtentRequest(
                extent_id=ref.extent_id, size_bytes=size_bytes, block_size=EXTENT_BLOCK,
                epoch=self._epoch))
            self._created.add(memory)
        return ref

    async def release(self, memories: list[str]) -> None:
        """Deletes the extents of memories no volume uses any more."""
        for memory in memories:
            ref = self._placement.forget(memory)
            if ref is not None:
                try:
                    await self._stub(ref.agent).DeleteExtent(agent_pb2.DeleteExtentRequest(
                        extent_id=ref.extent_id, epoch=self._epoch))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:  # never created: fine
                        raise
                self._created.discard(memory)
        if memories and self._persist_placement is not None:
            await self._persist_placement(self._placement)

    async def run(self, plan: Plan, data: bytes = b"", offset: int = 0,
                  fua: bool = False) -> bytes | None:
        """Carries out `plan`; returns the block a Read step read. With `fua` the
        caller's write is durable before this returns."""
        result = None
        for step in plan.steps:
            if isinstance(step, Copy):
                await self._copy(step)
            elif isinstance(step, Commit):
                await self._group.commit(step)
            elif isinstance(step, Write):
                await self._write(step, data, offset, fua)
            elif isinstance(step, Read):
                result = await self._read(step)
        return result

    def _volume_geometry(self, memory: str) -> tuple[int, int]:
        volume = self.engine.volume_of_memory(memory)
        return volume.block_size, volume.size_blocks * volume.block_size

    async def _copy(self, step: Copy) -> None:
        block_size, size = self._volume_geometry(step.target.memory)
        source = self._placement.place(step.source.memory)
        target = await self.create_memory(step.target.memory, size)
        key = (target.agent, target.extent_id, source.extent_id,
               "" if source.agent == target.agent else source.agent)
        await self._copies.submit(key, agent_pb2.CopyRange(
            source_offset=step.source.block * block_size,
            target_offset=step.target.block * block_size, length=block_size))

    async def _send_copy(self, key: _CopyKey, ranges: list[agent_pb2.CopyRange]) -> None:
        agent, target_extent, source_extent, source_agent = key
        await self._stub(agent).Copy(agent_pb2.CopyRequest(
            target_extent_id=target_extent, source_extent_id=source_extent,
            source_agent=source_agent, ranges=ranges, durable=True, epoch=self._epoch))

    async def flush(self, memory: str) -> None:
        ref = self._placement.place(memory)
        await self._stub(ref.agent).Flush(agent_pb2.FlushRequest(
            extent_id=ref.extent_id, epoch=self._epoch))

    async def _write(self, step: Write, data: bytes, offset: int, fua: bool) -> None:
        block_size, size = self._volume_geometry(step.target.memory)
        if offset % EXTENT_BLOCK or len(data) % EXTENT_BLOCK or offset + len(data) > block_size:
            raise InvalidArgument(
                f"write of {len(data)} bytes at {offset} is not inside one block in "
                f"{EXTENT_BLOCK}-byte units")
        ref = await self.create_memory(step.target.memory, size)
        await self._stub(ref.agent).Write(agent_pb2.WriteRequest(
            extent_id=ref.extent_id, offset=step.target.block * block_size + offset, data=data,
            fua=fua or step.durable, epoch=self._epoch))

    async def _read(self, step: Read) -> bytes:
        return await self.read_blocks(step.source.memory, step.source.block, 1)

    async def read_blocks(self, memory: str, block: int, count: int) -> bytes:
        """`count` blocks of `memory` from `block` on, in one agent call (no plan: the
        caller holds the blocks' locks and knows they resolve here)."""
        block_size, _ = self._volume_geometry(memory)
        ref = self._placement.place(memory)
        chunks = []
        async for chunk in self._stub(ref.agent).Read(agent_pb2.ReadRequest(
                extent_id=ref.extent_id, offset=block * block_size,
                length=count * block_size)):
            chunks.append(chunk.data)
        return b"".join(chunks)

    async def write_blocks(self, memory: str, block: int, data: bytes, fua: bool) -> None:
        """Whole blocks of `memory` from `block` on, in one agent call (no plan: the caller
        holds the blocks' locks and their plans were a plain write each)."""
        block_size, _ = self._volume_geometry(memory)
        ref = self._placement.place(memory)
        stub = self._stub(ref.agent)
        for start in range(0, len(data), MAX_WRITE):
            await stub.Write(agent_pb2.WriteRequest(
                extent_id=ref.extent_id, offset=block * block_size + start,
                data=data[start:start + MAX_WRITE], fua=fua, epoch=self._epoch))
