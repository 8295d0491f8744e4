"""The controller's core in one event loop: volumes, their byte I/O and background copies.

`Core` ties the engine, the etcd map store, the plan executor and the block
locks together. Topology operations change the engine and store it (one
transaction); byte I/O splits a request into blocks and runs one plan per block
under that block's lock; a background copy walks the blocks a volume still
reads through another, one plan each, then detaches the volume.

Writes that cover part of a block are passed on as they are when they are in
whole 512-byte sectors; anything finer is read-modify-write of the block under
its lock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from controller.executor import EXTENT_BLOCK, BlockLocks, PlanExecutor
from controller.mapstore import GroupCommit, MapStore
from controller.placement import Placement
from volkin.engine import MapEngine, RefreshStarted, VolumeInfo
from volkin.errors import InvalidArgument, OutOfRange


class Core:
    def __init__(self, engine: MapEngine, store: MapStore, placement: Placement, epoch: int,
                 persist_placement: Callable[[Placement], Awaitable[None]] | None = None,
                 discover_agents: Callable[[], Awaitable[dict[str, str]]] | None = None,
                 ) -> None:
        self.engine = engine
        self.store = store
        self.placement = placement
        self.executor = PlanExecutor(engine, GroupCommit(store, engine), placement, epoch,
                                     persist_placement)
        self.locks = BlockLocks()
        self._discover_agents = discover_agents

    async def refresh_agents(self) -> None:
        """Learns the agents registered now (before placing a new memory)."""
        if self._discover_agents is not None:
            self.placement.update_agents(await self._discover_agents())

    async def close(self) -> None:
        await self.executor.close()

    # -- topology ------------------------------------------------------------------
    async def create_volume(self, name: str, size_bytes: int, block_size: int) -> VolumeInfo:
        if block_size % EXTENT_BLOCK or size_bytes % block_size:
            raise InvalidArgument(
                f"size {size_bytes} must be a multiple of the block size {block_size}, "
                f"itself a multiple of {EXTENT_BLOCK}")
        await self.refresh_agents()
        info = self.engine.create_volume(name, size_bytes // block_size, block_size)
        try:
            await self.executor.create_memory(info.memory, size_bytes)
        except Exception:
            self.engine.delete_volume(name)  # nothing was stored: forget it again
            raise
        await self.store.save(self.engine)
        return info

    async def create_snapshot(self, source: str, name: str) -> VolumeInfo:
        # No agent call: the snapshot's extent is created by the first copy or
        # write into it, so a snapshot costs one etcd transaction and nothing else.
        await self.refresh_agents()
        info = self.engine.create_snapshot(source, name)
        await self.store.save(self.engine)
        return info

    async def start_refresh(self, target: str, source: str) -> RefreshStarted:
        started = self.engine.start_refresh(target, source)
        await self.store.save(self.engine)
        return started

    async def delete_volume(self, name: str) -> None:
        deleted = self.engine.delete_volume(name)
        await self.store.save(self.engine)
        await self.executor.release(list(deleted.freed_memories))

    async def copy_in_background(self, name: str,
                                 progress: Callable[[int, int], None] | None = None) -> None:
        """Makes `name` real block by block (Fig 7), then detaches it from its source."""
        total = self.engine.info(name)
        todo = total.size_blocks - total.valid_blocks if total.source is not None else 0
        for done, block in enumerate(self.engine.blocks_to_copy(name), 1):
            async with self.locks.hold(block):
                await self.executor.run(self.engine.plan_background(name, block))
            if progress is not None:
                progress(done, todo)
        self.engine.detach_if_real(name)
        await self.store.save(self.engine)
        await self.executor.release(self.engine.take_released())

    # -- byte I/O ------------------------------------------------------------------
    def size(self, name: str) -> int:
        volume = self.engine.volume(name)
        return volume.size_blocks * volume.block_size

    def _spans(self, name: str, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(block, offset in block, length) for each block the byte range touches."""
        volume = self.engine.volume(name)
        if offset < 0 or length < 0 or offset + length > self.size(name):
            raise OutOfRange(f"{length} bytes at {offset} reach past the end of {name!r} "
                             f"({self.size(name)} bytes)")
        spans = []
        position, end = offset, offset + length
        while position < end:
            block, inside = divmod(position, volume.block_size)
            take = min(volume.block_size - inside, end - position)
            spans.append((block, inside, take))
            position += take
        return spans

    async def read(self, name: str, offset: int, length: int) -> bytes:
        out = []
        for block, inside, take in self._spans(name, offset, length):
            async with self.locks.hold(block):
                data = await self.executor.run(self.engine.plan_read(name, block))
            assert data is not None
            out.append(data[inside:inside + take])
        return b"".join(out)

    async def write(self, name: str, offset: int, data: bytes, fua: bool = False) -> None:
        block_size = self.engine.volume(name).block_size
        position = 0
        for block, inside, take in self._spans(name, offset, len(data)):
            piece = data[position:position + take]
            position += take
            async with self.locks.hold(block):
                if take == block_size:
                    plan = self.engine.plan_write(name, block, whole_block=True)
                    await self.executor.run(plan, piece, 0, fua)
                elif inside % EXTENT_BLOCK == 0 and take % EXTENT_BLOCK == 0:
                    plan = self.engine.plan_write(name, block)
                    await self.executor.run(plan, piece, inside, fua)
                else:
                    current = await self.executor.run(self.engine.plan_read(name, block))
                    assert current is not None
                    merged = current[:inside] + piece + current[inside + take:]
                    plan = self.engine.plan_write(name, block, whole_block=True)
                    await self.executor.run(plan, merged, 0, fua)

    async def flush(self, name: str) -> None:
        """Every write acknowledged so far reaches stable storage (copies already did)."""
        await self.executor.flush(self.engine.volume(name).memory)
