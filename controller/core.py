"""The controller's core in one event loop: volumes, their byte I/O and background copies.

`Core` ties the engine, the etcd map store, the plan executor and the family
locks together. A topology operation holds the families of the volumes it names
(`controller.locks`), changes the engine, and stores what the engine says it
changed in one transaction before it lets go; byte I/O splits a request into
blocks and runs their plans holding the volume's family shared and those blocks;
a background copy (`controller.jobs`) copies one block at a time with
`copy_block`, then `finish_copy` detaches the volume.

Creating a volume holds no lock at all (it is a family of its own): its extent is
created on the agent while the volume is hidden from NBD, and it is shown once
its records are stored. A change the engine made but etcd did not take means
this controller's view is no longer etcd's: the term ends (the next one reloads).

Memories no volume uses any more are freed on their agents after the change that
released them is stored, and their records deleted after that
(`free_released`), so a crash in between frees them on the next term.

Writes that cover part of a block are passed on as they are when they are in
whole 512-byte sectors; anything finer is read-modify-write of the block under
its lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

from controller.agents import AgentClient
from controller.executor import EXTENT_BLOCK, PlanExecutor, RunResult
from controller.fence import Deposed
from controller.locks import FamilyLocks
from controller.mapstore import GroupCommit, MapStore, Pending
from controller.placement import Layout, Placement
from volkin import blockwire as w
from volkin.config import check_block_size
from volkin.engine import Loc, MapEngine, RefreshStarted, VolumeInfo
from volkin.errors import InvalidArgument, NotFound, OutOfRange
from volkin.etcd import EtcdUnavailable
from volkin.keys import Keys

# Given the refresh as the engine started it: other keys to store with it (a job).
RefreshRecords = Callable[[RefreshStarted], Mapping[str, bytes]]
# A zero of many blocks holds the locks of this many at a time (32 MiB of 64 KiB
# blocks), so that a client's zero of gigabytes does not hold them all for its length.
ZERO_LOCK_BLOCKS = 512
# Blocks a zero looks at in one go for those that read as zeros already (2 GiB of 64 KiB
# blocks; one agent question per extent each).
ZERO_CHECK_BLOCKS = 32768
# Blocks one base:allocation answer looks at (NBD_CMD_BLOCK_STATUS may answer less).
ALLOCATION_BLOCKS = 8192


class Core:
    def __init__(self, engine: MapEngine, store: MapStore, placement: Placement,
                 agents: AgentClient, keys: Keys | None = None) -> None:
        self.engine = engine
        self.store = store
        self.placement = placement
        self.agents = agents
        self.fence = agents.fence
        self.keys = keys or Keys()
        self.executor = PlanExecutor(engine, GroupCommit(store, engine), placement, agents,
                                     self._persist_placement)
        self.locks = FamilyLocks(engine)
        self.hidden: set[str] = set()  # created, not yet stored: not served
        # When a client's read or write last started (monotonic): background copies
        # make room for clients (`controller.jobs`).
        self.foreground_at = 0.0
        self._freeing = asyncio.Lock()

    async def refresh_agents(self) -> None:
        """Learns the agents registered now (before placing a new memory)."""
        with contextlib.suppress(EtcdUnavailable):  # else: among the agents known so far
            await self.agents.directory.refresh()
        self.placement.update_nodes(self.agents.directory.nodes())

    async def close(self) -> None:
        await self.executor.close()

    async def _persist_placement(self, memory: str, layout: Layout) -> None:
        await self.store.put(self.keys.extent(memory), layout.record())

    async def _store(self, pending: Pending, put: Mapping[str, bytes] | None = None,
                     delete: tuple[str, ...] = ()) -> None:
        """Stores a topology change the engine already made; if etcd does not take it,
        this term's view is no longer etcd's, and the term ends."""
        try:
            await self.store.write(pending, put, delete)
        except Deposed:
            raise
        except BaseException as exc:
            reason = getattr(exc, "message", None) or repr(exc)
            self.fence.depose(f"a topology change could not be stored ({reason}); the next "
                              f"term reloads the volumes from etcd")
            raise

    async def _room_in_etcd(self) -> None:
        """Once etcd refused a write for want of space, a topology change waits for a
        probe write to get through: a change etcd refuses after the engine made it would
        leave this view ahead of etcd's and end the term (`_store`), and all I/O with it."""
        if self.store.etcd_full:
            await self.store.probe_space()

    # -- topology ------------------------------------------------------------------
    async def create_volume(self, name: str, size_bytes: int, block_size: int,
                            stripe_unit: int = 0, stripe_width: int = 0) -> VolumeInfo:
        """A new volume striped over `stripe_width` agents in units of `stripe_unit` bytes
        (0: the defaults of `controller.placement`)."""
        check_block_size(block_size)
        if size_bytes % block_size:
            raise InvalidArgument(
                f"size {size_bytes} must be a multiple of the block size {block_size}")
        await self.refresh_agents()
        # Checked before anything changes (a layout is only chosen here, not recorded).
        self.placement.choose(f"{name}#0", size_bytes, block_size, stripe_unit, stripe_width)
        await self._room_in_etcd()
        info = self.engine.create_volume(name, size_bytes // block_size, block_size)
        pending = self.store.take(self.engine)
        self.hidden.add(name)
        try:
            try:
                await self.executor.create_memory(info.memory, stripe_unit, stripe_width)
            except BaseException:
                # Not stored: take it back. Its records were never written; the delete
                # stores the memory as released, so a half-made extent is freed too.
                self.engine.delete_volume(name)
                undo = self.store.take(self.engine)
                await self.store.write(pending, skip=True)
                await self._store(undo)
                raise
            await self._store(pending)
        finally:
            self.hidden.discard(name)
        return info

    async def create_snapshot(self, source: str, name: str) -> VolumeInfo:
        # No agent call: the snapshot's extents are created by the first copy or
        # write into them, so a snapshot costs one etcd transaction and nothing else.
        # Its layout is its origin's, stored in the same transaction: every block the
        # origin preserves into it stays on the agent that holds the block.
        await self.refresh_agents()
        await self._room_in_etcd()
        async with self.locks.topology(source):
            origin = self.engine.volume(source).memory
            info = self.engine.create_snapshot(source, name)
            layout = self.placement.like(info.memory, origin)
            put = {self.keys.extent(info.memory): layout.record()} if layout else None
            await self._store(self.store.take(self.engine), put)
            if layout is not None:
                self.placement.place(info.memory, layout)
        return info

    async def start_refresh(self, target: str, source: str,
                            records: RefreshRecords | None = None) -> RefreshStarted:
        """`target` becomes a PIT copy of `source`; `records` names keys to store in the
        same transaction (the job that copies it)."""
        await self._room_in_etcd()
        async with self.locks.topology(target, source):
            started = self.engine.start_refresh(target, source)
            pending = self.store.take(self.engine)
            await self._store(pending, records(started) if records else None)
        return started

    async def resize_volume(self, name: str, size_bytes: int) -> VolumeInfo:
        """Grows `name` to `size_bytes` (grow only; the same size is a no-op). The rule of
        what may grow is the engine's (`MapEngine.resize_volume`), checked before anything
        changes. The memory's extents grow (and new ones appear) on the agents first;
        then the engine's change and the grown layout record are stored in one
        transaction. A crash in between leaves larger extents than etcd says: harmless,
        and a repeat of the resize finds them grown. NBD connections keep the size they
        negotiated; new ones see the new size."""
        volume = self.engine.volume(name)
        if size_bytes % volume.block_size:
            raise InvalidArgument(
                f"size {size_bytes} must be a multiple of the block size {volume.block_size}")
        await self._room_in_etcd()
        async with self.locks.topology(name):
            size_blocks = size_bytes // volume.block_size
            if not self.engine.check_resize(name, size_blocks):
                return self.engine.info(name)
            memory = self.engine.volume(name).memory
            layout = self.placement.layout_of(memory)
            grown = layout.grown(size_bytes) if layout is not None else None
            if grown is not None:
                await self.executor.grow_memory(memory, grown)
            info = self.engine.resize_volume(name, size_blocks)
            put = {self.keys.extent(memory): grown.record()} if grown is not None else None
            await self._store(self.store.take(self.engine), put)
            if grown is not None:
                self.placement.grow(memory, grown)
        return info

    async def delete_volume(self, name: str) -> None:
        await self._room_in_etcd()
        async with self.locks.topology(name):
            self.engine.delete_volume(name)
            await self._store(self.store.take(self.engine))
        await self.free_released()

    async def copy_block(self, name: str, block: int) -> None:
        """One step of a background copy (Fig 7): block `block` of `name` becomes its own."""
        async with self.locks.plan(name, [block]):
            await self.executor.run(self.engine.plan_background(name, block))

    async def copy_run(self, name: str, first: int, count: int,
                       max_data: int | None = None) -> RunResult | None:
        """Blocks [first, first + count) of `name` become its own in one go, if the engine
        plans them as one run (`MapEngine.plan_background_run`): their copies durable, then
        one commit. Returns what the run found, or None if it is not one (any more); a
        run whose source holds more than `max_data` bytes in it changes nothing."""
        async with self.locks.run(name, first, count):
            run = self.engine.plan_background_run(name, first, count)
            if run is None:
                return None
            result = await self.executor.copy_run(run, max_data)
            if result.done:
                await self.executor.commit(run.commit)
            return result

    async def finish_copy(self, name: str) -> None:
        """Detaches `name` from its source if every block is its own, and frees what
        no volume needs any more."""
        await self._room_in_etcd()
        async with self.locks.topology(name):
            self.engine.detach_if_real(name)
            await self._store(self.store.take(self.engine))
        await self.free_released()

    async def free_released(self) -> None:
        """Deletes the extents of released memories on their agents, then their records.
        A failure leaves the rest for next time (the records say what is left)."""
        async with self._freeing:
            memories = list(self.engine.graph.released)
            freed: list[str] = []
            try:
                for memory in memories:
                    await self.executor.free(memory)
                    freed.append(memory)
            finally:
                if freed:
                    self.engine.take_released(freed)
                    pending = self.store.take(self.engine)
                    await self._store(pending, delete=tuple(self.keys.extent(m) for m in freed))

    # -- byte I/O ------------------------------------------------------------------
    def identity(self, name: str) -> tuple[int, int]:
        """What an NBD connection is bound to: the volume's unique id and its size."""
        volume = self.engine.volume(name)
        return volume.uid, volume.size_blocks * volume.block_size

    def require(self, name: str, uid: int) -> None:
        """Raises NotFound unless `name` is still the volume with unique id `uid` (it may
        have been deleted, and another created under its name)."""
        volume = self.engine.graph.volumes.get(name)
        if volume is None or volume.uid != uid or name in self.hidden:
            raise NotFound(f"volume {name!r} this connection was opened on no longer exists")

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

    async def read(self, name: str, offset: int, length: int) -> w.Data:
        spans = self._spans(name, offset, length)
        block_size = self.engine.volume(name).block_size
        out: list[w.Data] = []
        async with self.locks.plan(name, (block for block, _, _ in spans)):
            # Blocks that resolve to consecutive blocks of one memory are read in one call;
            # its answer is passed on as it came (a view of it if the request starts or
            # ends inside a block), not copied block by block.
            locations = [self.engine.locate(name, block) for block, _, _ in spans]
            for run, (memory, first) in _runs(locations):
                data = await self.executor.read_blocks(memory, first, len(run))
                _, begin, _ = spans[run[0]]
                _, inside, take = spans[run[-1]]
                end = (len(run) - 1) * block_size + inside + take
                out.append(data if (begin, end) == (0, len(data))
                           else memoryview(data)[begin:end])
        return out[0] if len(out) == 1 else b"".join(out)  # none: a read of 0 bytes

    async def write(self, name: str, offset: int, data: w.Data, fua: bool = False) -> None:
        spans = self._spans(name, offset, len(data))
        block_size = self.engine.volume(name).block_size
        view = memoryview(data)  # pieces are views: the payload is not copied on its way
        async with self.locks.plan(name, (block for block, _, _ in spans)):
            plain: list[tuple[Loc, int]] = []  # whole blocks whose plan is only the write
            position = 0
            for block, inside, take in spans:
                piece = view[position:position + take]
                if take == block_size:
                    plan = self.engine.plan_write(name, block, whole_block=True)
                    target = plan.plain_write
                    if target is not None:
                        plain.append((target, position))
                    else:
                        await self.executor.run(plan, piece, 0, fua)
                else:
                    await self._write_part(name, block, inside, piece, fua)
                position += take
            # The fast path, blocks already this volume's and already marked modified:
            # consecutive ones go to the agent in one call, as one view of the payload
            # (a plain write lands at its own block number, so blocks consecutive in the
            # memory are consecutive in the payload too).
            for run, (memory, first) in _runs([target for target, _ in plain]):
                start = plain[run[0]][1]
                await self.executor.write_blocks(
                    memory, first, view[start:start + len(run) * block_size], fua)

    async def _write_part(self, name: str, block: int, inside: int, piece: w.Data,
                          fua: bool) -> None:
        """Writes `piece` at `inside` of one block (the caller holds its lock): in 512-byte
        units as it is, else merged with what the block holds."""
        if inside % EXTENT_BLOCK == 0 and len(piece) % EXTENT_BLOCK == 0:
            plan = self.engine.plan_write(name, block)
            await self.executor.run(plan, piece, inside, fua)
            return
        current = await self.executor.run(self.engine.plan_read(name, block))
        assert current is not None
        merged = bytearray(current)
        merged[inside:inside + len(piece)] = piece
        plan = self.engine.plan_write(name, block, whole_block=True)
        await self.executor.run(plan, merged, 0, fua)

    async def zero(self, name: str, offset: int, length: int, fua: bool = False,
                   fast: bool = False, punch: bool = False) -> bool:
        """Makes a range of any length read as zeros. Whole blocks are zeroed on their
        agents (no payload: fallocate), each after its copy-before-write like any write;
        the parts of blocks at either end are written. With `fast`, a range with such
        parts is refused (False) before anything changes: zeroing them is no faster than
        writing zeros. With `punch` (a trim), whole blocks also give their space back
        and the parts at either end are left as they are. Blocks are locked
        ZERO_LOCK_BLOCKS at a time."""
        spans = self._spans(name, offset, length)
        block_size = self.engine.volume(name).block_size
        if fast and any(take != block_size for _, _, take in spans):
            return False
        whole = [block for block, _, take in spans if take == block_size]
        zeros: set[int] = set()
        for start in range(0, len(whole), ZERO_CHECK_BLOCKS):
            first, count = whole[start], min(ZERO_CHECK_BLOCKS, len(whole) - start)
            async with self.locks.run(name, first, count):
                zeros |= await self._reading_as_zeros(name, whole[start:start + count], fua)
        # The rest, like writes: a block skipped above is one the zero found as zeros; a
        # write racing with this zero is ordered after it, which the client allows.
        spans = [span for span in spans if span[0] not in zeros]
        for start in range(0, len(spans), ZERO_LOCK_BLOCKS):
            some = spans[start:start + ZERO_LOCK_BLOCKS]
            async with self.locks.plan(name, (block for block, _, _ in some)):
                plain: list[Loc] = []
                for block, inside, take in some:
                    if take != block_size:
                        if not punch:
                            await self._write_part(name, block, inside, bytes(take), fua)
                        continue
                    plan = self.engine.plan_write(name, block, whole_block=True)
                    if plan.plain_write is not None:
                        plain.append(plan.plain_write)
                    else:
                        await self.executor.run(plan, fua=fua, zeros=block_size, punch=punch)
                for run, (memory, first) in _runs(plain):
                    await self.executor.zero_blocks(memory, first, len(run), fua, punch)
        return True

    async def _reading_as_zeros(self, name: str, blocks: list[int], fua: bool) -> set[int]:
        """Of `blocks` (consecutive, whole), those that read as zeros because where they
        resolve is a hole (or a memory never written): zeroing or trimming them changes
        no byte, so they need no plan, no M bit and no commit (a client zeroing a sparse
        terabyte must not cost a plan per block). Looked at in ranges that resolve alike
        (`MapEngine.locate_run`), one agent question per extent; a range that does not is
        not skipped. With `fua`, the memories skipped blocks resolve to are flushed, so
        their holes are as durable as a FUA zero's."""
        if not blocks:
            return set()
        block_size = self.engine.volume(name).block_size
        found: set[int] = set()
        first, count = blocks[0], len(blocks)
        where = self.engine.locate_run(name, first, count)
        if where is None:
            return found
        holding = bytearray(count)
        for start, n in await self.executor.data_ranges(where.memory, where.block * block_size,
                                                        count * block_size):
            begin = start // block_size - where.block
            end = (start + n - 1) // block_size - where.block + 1
            holding[begin:end] = b"\x01" * (end - begin)
        found = {first + k for k in range(count) if not holding[k]}
        if found and fua:
            await self.executor.flush(where.memory)
        return found

    async def allocation(self, name: str, offset: int,
                         length: int) -> list[tuple[int, bool]]:
        """What of a byte range holds data, as (length, hole) runs from `offset`: where
        each block resolves, a memory never placed on an agent, or a hole of its extent,
        reads as zeros and holds no space (a hole); the rest is data. At most
        ALLOCATION_BLOCKS blocks are looked at: the runs may end short of the range."""
        volume = self.engine.volume(name)
        block_size = volume.block_size
        if offset < 0 or length <= 0 or offset + length > self.size(name):
            raise OutOfRange(f"{length} bytes at {offset} are not inside {name!r}")
        first = offset // block_size
        last = min((offset + length - 1) // block_size, first + ALLOCATION_BLOCKS - 1)
        end = min(offset + length, (last + 1) * block_size)
        marks: list[tuple[int, int, bool]] = []  # (start, end, hole) in volume bytes
        async with self.locks.plan(name, range(first, last + 1)):
            locations = [self.engine.locate(name, b) for b in range(first, last + 1)]
            for run, (memory, start_block) in _runs(locations):
                base = (first + run[0]) * block_size  # where the run starts in the volume
                size = len(run) * block_size
                at = base
                for data_start, data_length in await self.executor.data_ranges(
                        memory, start_block * block_size, size):
                    begin = base + data_start - start_block * block_size
                    if begin > at:
                        marks.append((at, begin, True))
                    marks.append((begin, begin + data_length, False))
                    at = begin + data_length
                if at < base + size:
                    marks.append((at, base + size, True))
        runs: list[tuple[int, bool]] = []
        for start, stop, hole in marks:
            start, stop = max(start, offset), min(stop, end)
            if stop <= start:
                continue
            if runs and runs[-1][1] == hole:
                runs[-1] = (runs[-1][0] + stop - start, hole)
            else:
                runs.append((stop - start, hole))
        return runs

    async def allocated_bytes(self, name: str) -> int:
        """Bytes the volume's own memory holds on its agents' disks (0 while never placed)."""
        return await self.executor.allocated_bytes(self.engine.volume(name).memory)

    async def flush(self, name: str) -> None:
        """Every write acknowledged so far reaches stable storage (copies already did)."""
        await self.executor.flush(self.engine.volume(name).memory)


def _runs(locations: list[Loc]) -> list[tuple[list[int], tuple[str, int]]]:
    """Indexes of `locations` grouped into runs of consecutive blocks of one memory."""
    runs: list[tuple[list[int], tuple[str, int]]] = []
    for index, loc in enumerate(locations):
        if runs:
            members, (memory, first) = runs[-1]
            if loc.memory == memory and loc.block == first + len(members):
                members.append(index)
                continue
        runs.append(([index], (loc.memory, loc.block)))
    return runs
