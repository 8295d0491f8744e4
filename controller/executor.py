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

A memory lies in stripes over agents (`controller.placement`): each call on a
byte range of a memory goes to the extents that hold its pieces, at once. A
primary volume's extents are all created with it (every block of it reads from
them); a snapshot's or a spill memory's extent is created by the first copy or
write into it. Data offsets are byte offsets inside the volume's block; the
agents' extents use 512-byte blocks, so partial writes must be 512-byte aligned
(finer ones are the NBD layer's read-modify-write).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from controller.agents import AgentClient
from controller.batching import Batcher
from controller.mapstore import GroupCommit
from controller.placement import ExtentRef, ExtentSpec, Layout, Piece, Placement
from volkin import blockwire as w
from volkin.api.v1 import agent_pb2
from volkin.engine import Commit, Copy, CopyRun, MapEngine, Plan, Read, Write
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


@dataclass(frozen=True)
class RunResult:
    """What a background run found: the bytes its source holds in it, and whether it
    was carried out (copied) or left alone (more data than the caller allowed)."""
    data: int
    done: bool


class PlanExecutor:
    def __init__(self, engine: MapEngine, group: GroupCommit, placement: Placement,
                 agents: AgentClient,
                 persist_placement: Callable[[str, Layout], Awaitable[None]] | None = None,
                 ) -> None:
        self.engine = engine
        self._group = group
        self._placement = placement
        self.agents = agents
        # Called after a new memory's layout is chosen and before any of its extents is
        # created: the layout is in etcd before there is anything on an agent to find.
        self._persist_placement = persist_placement
        self._placing = asyncio.Lock()  # new layouts are chosen and stored one at a time
        self._specs: dict[str, ExtentSpec] = {}  # extent id -> what to create
        self._created: set[str] = set()  # extent ids created (or found) in this term
        # Extents written without FUA since their last flush, by memory, with a
        # generation each: a flush syncs them, and forgets those not written again
        # meanwhile. A memory not in `_tracked` (not flushed yet in this term, so
        # written perhaps by the term before) has all its extents flushed.
        self._dirty: dict[str, dict[ExtentRef, int]] = {}
        self._tracked: set[str] = set()
        self._generation = itertools.count()
        # Concurrent copies between the same two extents share one agent call and one fsync.
        self._copies: Batcher[_CopyKey, agent_pb2.CopyRange] = Batcher(
            self._send_copy, in_flight=COPY_SENDS, max_items=COPY_BATCH)

    async def close(self) -> None:
        await self.agents.close()

    # -- layouts and extents ---------------------------------------------------------
    async def place(self, memory: str, unit: int = 0, width: int = 0) -> Layout:
        """The layout of `memory`, choosing and storing one the first time it is used."""
        layout = self._placement.layout_of(memory)
        if layout is not None:
            return layout
        async with self._placing:
            layout = self._placement.layout_of(memory)
            if layout is None:
                block_size, size = self._volume_geometry(memory)
                layout = self._placement.choose(memory, size, block_size, unit, width)
                if self._persist_placement is not None:
                    await self._persist_placement(memory, layout)
                self._placement.place(memory, layout)
        return layout

    async def create_memory(self, memory: str, unit: int = 0, width: int = 0) -> Layout:
        """Places `memory` and creates every extent of it (a primary volume's)."""
        layout = await self.place(memory, unit, width)
        await asyncio.gather(*(self._create(spec) for spec in layout.extents()))
        return layout

    async def grow_memory(self, memory: str, layout: Layout) -> None:
        """Makes the extents of `memory` those of `layout`, its layout grown (`Layout.
        grown`): the last extent of each column grows and new extents are created, all
        before the caller stores the layout (a crash in between leaves larger extents
        than the stored layout says, which is harmless: they hold zeros past it). An
        extent never created (a snapshot's memory, created by its first copy or write) is
        created at its new size now or later, whichever comes first."""
        now = self._placement.layout_of(memory)
        old = {spec.extent_id: spec for spec in now.extents()} if now else {}
        grown = [spec for spec in layout.extents()
                 if spec.extent_id not in old or old[spec.extent_id] != spec]

        async def grow(spec: ExtentSpec) -> None:
            try:
                await self.agents.resize_extent(spec.node_id, spec.extent_id, spec.size_bytes)
            except NotFound:
                await self.agents.create_extent(spec.node_id, spec.extent_id,
                                                spec.size_bytes, EXTENT_BLOCK)
            self._created.add(spec.extent_id)

        await asyncio.gather(*(grow(spec) for spec in grown))
        self._specs.update((spec.extent_id, spec) for spec in layout.extents())

    async def _create(self, spec: ExtentSpec) -> None:
        if spec.extent_id not in self._created:
            await self.agents.create_extent(spec.node_id, spec.extent_id, spec.size_bytes,
                                            EXTENT_BLOCK)
            self._created.add(spec.extent_id)

    async def _target(self, memory: str, offset: int, length: int) -> list[Piece]:
        """The pieces of a range about to be written, their extents created."""
        layout = await self.place(memory)
        pieces = layout.pieces(offset, length)
        for piece in pieces:
            if piece.extent_id not in self._created:
                await self._create_extent_of(layout, piece.extent_id)
        return pieces

    def _written(self, memory: str, pieces: list[Piece], fua: bool) -> None:
        """Notes extents a write changed, once the agents answered (or failed): the next
        flush must sync them. Not before: a flush may only forget what it saw completed."""
        if not fua:
            dirty = self._dirty.setdefault(memory, {})
            generation = next(self._generation)
            for piece in pieces:
                dirty[ExtentRef(piece.node_id, piece.extent_id)] = generation

    async def free(self, memory: str) -> None:
        """Deletes the extents of a memory no volume uses any more (if it has any); the
        caller then deletes its layout record."""
        layout = self._placement.layout_of(memory)
        if layout is not None:
            specs = layout.extents()
            await asyncio.gather(*(self.agents.delete_extent(spec.node_id, spec.extent_id)
                                   for spec in specs))
            self._placement.forget(memory)
            for spec in specs:
                self._created.discard(spec.extent_id)
                self._specs.pop(spec.extent_id, None)
        self._dirty.pop(memory, None)
        self._tracked.discard(memory)

    # -- plans -----------------------------------------------------------------------
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
        block_size, _ = self._volume_geometry(step.target.memory)
        (target,) = await self._target(step.target.memory, step.target.block * block_size,
                                       block_size)
        layout = self._placement.layout_of(step.source.memory)
        if layout is None:  # a memory never placed was never written: it holds zeros
            await self.agents.zero(target.node_id, target.extent_id, target.offset,
                                   block_size, fua=True, punch=True)
            return
        (source,) = layout.pieces(step.source.block * block_size, block_size)
        key = (target.node_id, target.extent_id, source.extent_id, source.node_id,
               BACKGROUND.get())
        await self._copies.submit(key, agent_pb2.CopyRange(
            source_offset=source.offset, target_offset=target.offset, length=block_size))

    async def _send_copy(self, key: _CopyKey, ranges: list[agent_pb2.CopyRange]) -> None:
        node, target_extent, source_extent, source_node, _ = key
        await self.agents.copy(node, target_extent, source_extent, source_node, ranges)

    async def flush(self, memory: str) -> None:
        """Makes every write to `memory` durable; a memory never written has nothing to
        flush (and gets no extent for it)."""
        layout = self._placement.layout_of(memory)
        if layout is None:
            return
        if memory in self._tracked:
            todo = dict(self._dirty.get(memory, {}))
        else:
            now = next(self._generation)  # every write completed so far is older
            todo = {ExtentRef(spec.node_id, spec.extent_id): now for spec in layout.extents()}

        async def flush_one(ref: ExtentRef) -> None:
            with contextlib.suppress(NotFound):  # placed but never created: nothing written
                await self.agents.flush(ref.node_id, ref.extent_id)
        await asyncio.gather(*(flush_one(ref) for ref in todo))
        self._tracked.add(memory)
        dirty = self._dirty.get(memory, {})
        for ref, generation in todo.items():
            if dirty.get(ref, generation) <= generation:
                dirty.pop(ref, None)

    async def _write(self, step: Write, data: w.Data, offset: int, fua: bool) -> None:
        block_size, _ = self._volume_geometry(step.target.memory)
        if offset % EXTENT_BLOCK or len(data) % EXTENT_BLOCK or offset + len(data) > block_size:
            raise InvalidArgument(
                f"write of {len(data)} bytes at {offset} is not inside one block in "
                f"{EXTENT_BLOCK}-byte units")
        await self._write_at(step.target.memory, step.target.block * block_size + offset,
                             data, fua or step.durable)

    async def _zero(self, step: Write, offset: int, length: int, fua: bool,
                    punch: bool) -> None:
        block_size, _ = self._volume_geometry(step.target.memory)
        await self._zero_at(step.target.memory, step.target.block * block_size + offset,
                            length, fua or step.durable, punch)

    async def zero_blocks(self, memory: str, block: int, count: int, fua: bool,
                          punch: bool = False) -> None:
        """Zeroes whole blocks of `memory` from `block` on, one agent call per extent
        touched (no plan: the caller holds the blocks' locks and their plans were a
        plain write each); with `punch` their space is freed."""
        block_size, _ = self._volume_geometry(memory)
        await self._zero_at(memory, block * block_size, count * block_size, fua, punch)

    async def _zero_at(self, memory: str, offset: int, length: int, fua: bool,
                       punch: bool) -> None:
        pieces = await self._target(memory, offset, length)
        try:
            await asyncio.gather(*(self.agents.zero(p.node_id, p.extent_id, p.offset,
                                                    p.length, fua, punch) for p in pieces))
        finally:
            self._written(memory, pieces, fua)

    async def _read(self, step: Read) -> w.Received:
        return await self.read_blocks(step.source.memory, step.source.block, 1)

    async def read_blocks(self, memory: str, block: int, count: int) -> w.Received:
        """`count` blocks of `memory` from `block` on, from all their agents at once (no
        plan: the caller holds the blocks' locks and knows they resolve here). A memory
        that was never placed was never written: it reads as zeros."""
        block_size, _ = self._volume_geometry(memory)
        layout = self._placement.layout_of(memory)
        if layout is None:
            return bytes(count * block_size)
        pieces = layout.pieces(block * block_size, count * block_size)
        if len(pieces) == 1:  # the agent's answer as it came
            (p,) = pieces
            return await self.agents.read(p.node_id, p.extent_id, p.offset, p.length)
        parts = await asyncio.gather(*(self.agents.read(p.node_id, p.extent_id, p.offset,
                                                        p.length) for p in pieces))
        return b"".join(parts)

    async def write_blocks(self, memory: str, block: int, data: w.Data, fua: bool) -> None:
        """Whole blocks of `memory` from `block` on, to all their agents at once (no plan:
        the caller holds the blocks' locks and their plans were a plain write each; the
        agent client cuts what exceeds one request)."""
        block_size, _ = self._volume_geometry(memory)
        await self._write_at(memory, block * block_size, data, fua)

    async def _write_at(self, memory: str, offset: int, data: w.Data, fua: bool) -> None:
        pieces = await self._target(memory, offset, len(data))
        try:
            if len(pieces) == 1:
                (p,) = pieces
                await self.agents.write(p.node_id, p.extent_id, p.offset, data, fua)
            else:
                view = memoryview(data)
                await asyncio.gather(*(self.agents.write(p.node_id, p.extent_id, p.offset,
                                                         view[p.at:p.at + p.length], fua)
                                       for p in pieces))
        finally:
            self._written(memory, pieces, fua)

    async def data_ranges(self, memory: str, offset: int, length: int
                          ) -> list[tuple[int, int]]:
        """Where [offset, offset + length) of `memory` holds data on its agents, as
        (start, length) in the memory's bytes, in order; the rest is holes. A memory
        never placed holds none. One agent question per extent, however long the range."""
        layout = self._placement.layout_of(memory)
        if layout is None or length == 0:
            return []
        spans = layout.spans(offset, length)
        answers = await asyncio.gather(*(self.agents.data_ranges(
            s.node_id, s.extent_id, s.offset, s.length) for s in spans))
        found = []
        for span, ranges in zip(spans, answers, strict=True):
            for start, n in ranges:
                found += layout.memory_ranges(span.column,
                                              span.column_offset + start - span.offset, n)
        merged: list[tuple[int, int]] = []
        for start, n in sorted(found):
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((start, n))
        return merged

    async def copy_run(self, run: CopyRun, max_data: int | None = None) -> RunResult:
        """Carries out the copies of a background run (the caller holds its blocks and
        commits `run.commit` after): what the source holds in the run is copied, agent
        to agent, and the rest of the run's blocks in the target read as zeros and hold
        no space (punched); both durable. Holes are not copied, so the work grows with
        the data, not with the run. If the source holds more than `max_data` bytes in the
        run, nothing changes (the result says not done, and how much data there is)."""
        block_size, _ = self._volume_geometry(run.target.memory)
        offset, length = run.target.block * block_size, run.count * block_size
        data = await self.data_ranges(run.source.memory, run.source.block * block_size,
                                      length)
        copied = sum(n for _, n in data)
        if max_data is not None and copied > max_data:
            return RunResult(copied, False)
        target = await self.place(run.target.memory)
        shift = (run.target.block - run.source.block) * block_size
        holes, at = [], offset
        for start, n in data:  # the rest of the run: its old bytes go, and their space
            if start + shift > at:
                holes.append((at, start + shift - at))
            at = start + shift + n
        if at < offset + length:
            holes.append((at, offset + length - at))
        spans = [span for start, n in holes for span in target.spans(start, n)]
        await asyncio.gather(*(self._create_extent_of(target, span.extent_id)
                               for span in spans))
        await asyncio.gather(*(self.agents.zero(span.node_id, span.extent_id, span.offset,
                                                span.length, fua=True, punch=True)
                               for span in spans))
        source = self._placement.layout_of(run.source.memory)
        if source is None or not data:
            return RunResult(0, True)
        # Cut where either layout moves to another agent or extent: both units are powers
        # of two, so the smaller one's boundaries are all of them.
        cut = min(source.unit, target.unit)
        copies = []
        for start, n in data:
            at, end = start, start + n
            while at < end:
                take = min(end - at, cut - at % cut)
                (src,) = source.pieces(at, take)
                (dst,) = target.pieces(at + shift, take)
                key = (dst.node_id, dst.extent_id, src.extent_id, src.node_id,
                       BACKGROUND.get())
                copies.append(self._copies.submit(key, agent_pb2.CopyRange(
                    source_offset=src.offset, target_offset=dst.offset, length=take)))
                at += take
        await asyncio.gather(*copies)
        return RunResult(copied, True)

    async def _create_extent_of(self, layout: Layout, extent_id: str) -> None:
        if extent_id not in self._created:
            if extent_id not in self._specs:
                self._specs.update((spec.extent_id, spec) for spec in layout.extents())
            await self._create(self._specs[extent_id])

    async def commit(self, commit: Commit) -> None:
        """A commit outside a plan (a background run's), in the group commit's order."""
        await self._group.commit(commit)

    async def allocated_bytes(self, memory: str) -> int:
        """Bytes the extents of `memory` hold on their agents' disks."""
        layout = self._placement.layout_of(memory)
        if layout is None:
            return 0
        sizes = await asyncio.gather(*(self.agents.allocated_bytes(spec.node_id,
                                                                   spec.extent_id)
                                       for spec in layout.extents()))
        return sum(sizes)
