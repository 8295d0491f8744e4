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
it preserved. The caller holds the plan's (family, block) lock (`controller.locks`).

Extents are created when a memory is first used: a primary volume's when it is
created, a snapshot's or a spill memory's by the first copy or write into it. Data offsets are byte
offsets inside the volume's block; the agents' extents use 512-byte blocks, so
partial writes must be 512-byte aligned (finer ones are the NBD layer's
read-modify-write).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Awaitable, Callable

from controller.agents import AgentClient
from controller.batching import Batcher
from controller.mapstore import GroupCommit
from controller.placement import ExtentRef, Placement
from volkin import blockwire as w
from volkin.api.v1 import agent_pb2
from volkin.engine import Commit, Copy, MapEngine, Plan, Read, Write
from volkin.errors import InvalidArgument, NotFound

EXTENT_BLOCK = 512


# Set in a background job's task: its copies ride in batches of their own, so that a
# client's copy-before-write never waits behind a job's batch (and its fsync).
BACKGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("background", default=False)
# target node, target extent, source extent, source node, background
_CopyKey = tuple[str, str, str, str, bool]
# Copies between two extents: at most COPY_BATCH blocks share one agent call (one
# fsync), and up to COPY_SENDS such calls are in flight, so that a job's next blocks
# cross the network while the ones before them are synced and committed.
COPY_BATCH = 128
COPY_SENDS = 8


class PlanExecutor:
    def __init__(self, engine: MapEngine, group: GroupCommit, placement: Placement,
                 agents: AgentClient,
                 persist_placement: Callable[[str, ExtentRef], Awaitable[None]] | None = None,
                 ) -> None:
        self.engine = engine
        self._group = group
        self._placement = placement
        self.agents = agents
        # Called after a new memory is placed and before its extent is created: the
        # placement is in etcd before there is anything on an agent to find.
        self._persist_placement = persist_placement
        self._created: set[str] = set()
        # Concurrent copies between the same two extents share one agent call and one fsync.
        self._copies: Batcher[_CopyKey, agent_pb2.CopyRange] = Batcher(
            self._send_copy, in_flight=COPY_SENDS, max_items=COPY_BATCH)

    async def close(self) -> None:
        await self.agents.close()

    async def create_memory(self, memory: str, size_bytes: int) -> ExtentRef:
        new = self._placement.extent_of(memory) is None
        ref = self._placement.place(memory)
        if new and self._persist_placement is not None:
            try:
                await self._persist_placement(memory, ref)
            except BaseException:
                self._placement.forget(memory)
                raise
        if memory not in self._created:
            await self.agents.create_extent(ref.node_id, ref.extent_id, size_bytes, EXTENT_BLOCK)
            self._created.add(memory)
        return ref

    async def free(self, memory: str) -> None:
        """Deletes the extent of a memory no volume uses any more (if it has one); the
        caller then deletes its placement record."""
        ref = self._placement.extent_of(memory)
        if ref is not None:
            await self.agents.delete_extent(ref.node_id, ref.extent_id)
            self._placement.forget(memory)
        self._created.discard(memory)

    async def run(self, plan: Plan, data: w.Data = b"", offset: int = 0,
                  fua: bool = False, zeros: int = 0, punch: bool = False
                  ) -> w.Received | None:
        """Carries out `plan`; returns the block a Read step read. With `fua` the
        caller's write is durable before this returns. With `zeros`, the Write step
        zeroes that many bytes at `offset` on the agent instead of writing `data` (and
        frees their space with `punch`)."""
        result = None
        for step in plan.steps:
            if isinstance(step, Copy):
                await self._copy(step)
            elif isinstance(step, Commit):
                await self._group.commit(step)
            elif isinstance(step, Write) and zeros:
                await self._zero(step, offset, zeros, fua, punch)
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
        key = (target.node_id, target.extent_id, source.extent_id, source.node_id,
               BACKGROUND.get())
        await self._copies.submit(key, agent_pb2.CopyRange(
            source_offset=step.source.block * block_size,
            target_offset=step.target.block * block_size, length=block_size))

    async def _send_copy(self, key: _CopyKey, ranges: list[agent_pb2.CopyRange]) -> None:
        node, target_extent, source_extent, source_node, _ = key
        await self.agents.copy(node, target_extent, source_extent, source_node, ranges)

    async def flush(self, memory: str) -> None:
        """Makes every write to `memory` durable; a memory never written has nothing to
        flush (and gets no extent for it)."""
        ref = self._placement.extent_of(memory)
        if ref is None:
            return
        with contextlib.suppress(NotFound):  # placed but never created: nothing written
            await self.agents.flush(ref.node_id, ref.extent_id)

    async def _write(self, step: Write, data: w.Data, offset: int, fua: bool) -> None:
        block_size, size = self._volume_geometry(step.target.memory)
        if offset % EXTENT_BLOCK or len(data) % EXTENT_BLOCK or offset + len(data) > block_size:
            raise InvalidArgument(
                f"write of {len(data)} bytes at {offset} is not inside one block in "
                f"{EXTENT_BLOCK}-byte units")
        ref = await self.create_memory(step.target.memory, size)
        await self.agents.write(ref.node_id, ref.extent_id,
                                step.target.block * block_size + offset, data,
                                fua or step.durable)

    async def _zero(self, step: Write, offset: int, length: int, fua: bool,
                    punch: bool) -> None:
        block_size, size = self._volume_geometry(step.target.memory)
        ref = await self.create_memory(step.target.memory, size)
        await self.agents.zero(ref.node_id, ref.extent_id,
                               step.target.block * block_size + offset, length,
                               fua or step.durable, punch)

    async def zero_blocks(self, memory: str, block: int, count: int, fua: bool,
                          punch: bool = False) -> None:
        """Zeroes whole blocks of `memory` from `block` on, in one agent call (no plan:
        the caller holds the blocks' locks and their plans were a plain write each);
        with `punch` their space is freed."""
        block_size, size = self._volume_geometry(memory)
        ref = await self.create_memory(memory, size)
        await self.agents.zero(ref.node_id, ref.extent_id, block * block_size,
                               count * block_size, fua, punch)

    async def _read(self, step: Read) -> w.Received:
        return await self.read_blocks(step.source.memory, step.source.block, 1)

    async def read_blocks(self, memory: str, block: int, count: int) -> w.Received:
        """`count` blocks of `memory` from `block` on, in one agent call (no plan: the
        caller holds the blocks' locks and knows they resolve here). A memory that was
        never placed was never written: it reads as zeros."""
        block_size, _ = self._volume_geometry(memory)
        ref = self._placement.extent_of(memory)
        if ref is None:
            return bytes(count * block_size)
        return await self.agents.read(ref.node_id, ref.extent_id, block * block_size,
                                      count * block_size)

    async def write_blocks(self, memory: str, block: int, data: w.Data, fua: bool) -> None:
        """Whole blocks of `memory` from `block` on, in one agent call (no plan: the caller
        holds the blocks' locks and their plans were a plain write each; the agent client
        cuts what exceeds one request)."""
        block_size, size = self._volume_geometry(memory)
        ref = await self.create_memory(memory, size)
        await self.agents.write(ref.node_id, ref.extent_id, block * block_size, data, fua)
