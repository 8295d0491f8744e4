"""What the CSI controller's calls do to volkin, in admin API terms.

Snapshots and clones are volkin's instant operations. A snapshot is a PIT snapshot, ready
at once. A volume made from a snapshot or a volume is created with its source's size and
block size and refreshed from it: it reads as the source at once, while a background copy
makes it independent.

A volume that others still read through (an origin whose snapshots are virtual, a
snapshot that a clone is still copying) cannot be deleted in volkin. `delete` starts the
background copies that make those volumes real, waits for them up to `delete_wait`
seconds, and then deletes it, or raises FailedPrecondition saying which copies are still
running; the CO retries later. Expanding a volume is the same: volkin grows only a volume
that reads through nothing and that nothing reads through, so `expand_volume` first makes
its virtual snapshots (and, for a clone still copying, the clone itself) real, within the
same wait.

Calls on one name run one at a time (per driver process).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

from volkin.csi import PARAM_BLOCK_SIZE
from volkin.csi.admin import (
    CANCELLED,
    ENDED,
    FAILED,
    PRIMARY,
    REFRESH,
    SNAPSHOT,
    Admin,
    Job,
    Volume,
)
from volkin.csi.locks import KeyedLocks
from volkin.csi.requests import Capacity
from volkin.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, OutOfRange

_POLL = 0.2


@dataclass(frozen=True)
class NewVolume:
    """A CreateVolume, checked: the CO's name and the volkin name it maps to."""

    csi_name: str
    name: str
    capacity: Capacity
    block_size: int
    block_size_asked: bool  # the StorageClass named it (else it is the driver's default)
    source_kind: str = ""  # "snapshot" or "volume" for a copy, else ""
    source_id: str = ""


@dataclass(frozen=True)
class Snapshot:
    volume: Volume
    origin: str  # the volume it was taken of


class Lifecycle:
    def __init__(self, admin: Admin, delete_wait: float) -> None:
        self._admin = admin
        self._delete_wait = delete_wait
        self._locks = KeyedLocks()

    # -- volumes -------------------------------------------------------------------
    async def create_volume(self, new: NewVolume) -> Volume:
        """The volume `new` asks for: made now, or the one an earlier call made."""
        async with self._locks.hold(new.name):
            source = await self._source(new) if new.source_kind else None
            existing = await self._admin.volume(new.name)
            if existing is not None:
                await self._check_same(existing, new, source)
                return existing
            if source is None:
                return await self._admin.create_volume(
                    new.name, new.capacity.size(new.block_size), new.block_size)
            self._check_copy_fits(source, new)
            created = await self._admin.create_volume(new.name, source.size_bytes,
                                                      source.block_size)
            await self._admin.start_refresh(new.name, source.name)
            return created

    async def _source(self, new: NewVolume) -> Volume:
        wanted = SNAPSHOT if new.source_kind == "snapshot" else PRIMARY
        found = await self._admin.volume(new.source_id)
        if found is None or found.kind != wanted:
            raise NotFound(f"source {new.source_kind} {new.source_id!r} does not exist")
        return found

    @staticmethod
    def _check_copy_fits(source: Volume, new: NewVolume) -> None:
        # A refresh copies between volumes of one size and block size; a copy is made at
        # its source's size, and may be expanded (ControllerExpandVolume) once it is.
        if not new.capacity.fits(source.size_bytes):
            raise OutOfRange(
                f"a volume made from {source.name!r} has its size, {source.size_bytes} bytes, "
                f"outside the capacity range [{new.capacity.required}, "
                f"{new.capacity.limit or 'no limit'}]; create it at the source's size and "
                f"expand it afterwards")
        if new.block_size_asked and new.block_size != source.block_size:
            raise InvalidArgument(
                f"{PARAM_BLOCK_SIZE}={new.block_size} differs from the source's block size "
                f"{source.block_size}; a copy keeps its source's block size")

    async def _check_same(self, existing: Volume, new: NewVolume,
                          source: Volume | None) -> None:
        """Raises AlreadyExists unless `existing` is what `new` asks for. A call whose first
        attempt created the volume but not its refresh starts the refresh."""
        def refused(why: str) -> AlreadyExists:
            return AlreadyExists(f"volume {new.csi_name!r} exists already with {why}")

        if existing.kind != PRIMARY:
            raise refused("a snapshot of that name")
        if not new.capacity.fits(existing.size_bytes):
            raise refused(f"{existing.size_bytes} bytes, outside the capacity range asked for")
        if new.block_size_asked and existing.block_size != new.block_size:
            raise refused(f"block size {existing.block_size}")
        # The refreshes into it say what it was copied from, after the copy too.
        copied_from = [j.source for j in await self._admin.jobs()
                       if j.target == existing.name and j.kind == REFRESH]
        if existing.source:
            copied_from.append(existing.source)
        if source is None:
            if copied_from:
                raise refused(f"content copied from {copied_from[-1]!r}")
            return
        if source.name in copied_from:
            return
        if copied_from:
            raise refused(f"content copied from {copied_from[-1]!r}")
        self._check_copy_fits(source, new)
        if (existing.size_bytes, existing.block_size) != (source.size_bytes, source.block_size):
            raise refused("a size or block size other than its source's")
        await self._admin.start_refresh(existing.name, source.name)

    async def primary(self, volume_id: str) -> Volume:
        """The volume of that id; a snapshot's id names no CSI volume."""
        found = await self._admin.volume(volume_id)
        if found is None or found.kind != PRIMARY:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return found

    async def primaries(self) -> list[Volume]:
        return sorted((v for v in await self._admin.volumes() if v.kind == PRIMARY),
                      key=lambda v: v.name)

    async def delete_volume(self, volume_id: str) -> None:
        """Deletes the volume if there is one of that id (a snapshot's id names none)."""
        async with self._locks.hold(volume_id):
            found = await self._admin.volume(volume_id)
            if found is not None and found.kind == PRIMARY:
                await self._delete(found.name)

    async def _delete(self, name: str) -> None:
        """Deletes a volume or snapshot, first making the volumes that read through it real."""
        deadline = time.monotonic() + self._delete_wait
        looked_again = False
        while True:
            try:
                await self._admin.delete_volume(name)
                return
            except NotFound:
                return
            except FailedPrecondition as exc:
                refusal = exc
            readers = [v for v in await self._admin.volumes() if v.source == name]
            if not readers:
                # Either the refusal is about something else (NBD clients still
                # connected), or the last copy finished between the two calls: one more try.
                if looked_again:
                    raise refusal
                looked_again = True
                continue
            jobs = []
            for reader in readers:
                with contextlib.suppress(FailedPrecondition):  # it became real meanwhile
                    jobs.append(await self._admin.start_materialize(reader.name))
            unfinished = await self._wait(jobs, deadline)
            if unfinished or time.monotonic() >= deadline:
                running = ", ".join(j.id for j in unfinished) or "just finished"
                raise FailedPrecondition(
                    f"{name!r} cannot be deleted yet: {', '.join(r.name for r in readers)} "
                    f"still read through it; the background copies making them independent "
                    f"are running (jobs: {running}); retry when they are done")

    async def _wait(self, jobs: Iterable[Job], deadline: float) -> list[Job]:
        """Waits until the jobs end or the deadline passes; returns those still running.
        A failed job is the caller's error."""
        pending = {j.id: j for j in jobs}
        while True:
            for job_id in list(pending):
                job = await self._admin.job(job_id)
                if job.state in ENDED:
                    del pending[job_id]
                    if job.state == FAILED:
                        raise FailedPrecondition(
                            f"the background copy into {job.target!r} (job {job.id}) failed: "
                            f"{job.error}; `volkin job resume {job.id}` retries it")
                    if job.state == CANCELLED:
                        raise FailedPrecondition(
                            f"the background copy into {job.target!r} (job {job.id}) was "
                            f"cancelled; `volkin job resume {job.id}` finishes it")
            if not pending or time.monotonic() >= deadline:
                return list(pending.values())
            await asyncio.sleep(_POLL)

    async def expand_volume(self, volume_id: str, capacity: Capacity) -> Volume:
        """Grows the volume to the capacity asked for (rounded up to whole blocks); one
        as large already is left as it is. Volumes never shrink."""
        async with self._locks.hold(volume_id):
            volume = await self.primary(volume_id)
            if capacity.limit and volume.size_bytes > capacity.limit:
                raise OutOfRange(f"volume {volume_id!r} has {volume.size_bytes} bytes already, "
                                 f"more than the limit {capacity.limit}; volumes never shrink")
            if volume.size_bytes >= capacity.required:
                return volume
            size = capacity.size(volume.block_size)
            deadline = time.monotonic() + self._delete_wait
            while True:
                try:
                    return await self._admin.resize_volume(volume.name, size)
                except FailedPrecondition as exc:
                    refusal = exc
                # Whatever reads through it (virtual snapshots), and itself if it still
                # reads through another (a clone being copied): made real, then again.
                current = await self._admin.volume(volume.name)
                readers = [v for v in await self._admin.volumes() if v.source == volume.name]
                if current is not None and current.source:
                    readers.append(current)
                if not readers:
                    raise refusal
                jobs = []
                for reader in readers:
                    with contextlib.suppress(FailedPrecondition):  # real meanwhile
                        jobs.append(await self._admin.start_materialize(reader.name))
                unfinished = await self._wait(jobs, deadline)
                if unfinished or time.monotonic() >= deadline:
                    running = ", ".join(j.id for j in unfinished) or "just finished"
                    raise FailedPrecondition(
                        f"{volume_id!r} cannot grow yet: {', '.join(r.name for r in readers)} "
                        f"must be independent first; the background copies are running "
                        f"(jobs: {running}); retry when they are done")

    # -- snapshots -----------------------------------------------------------------
    @staticmethod
    def _origin(snapshot: Volume, jobs: list[Job]) -> str:
        """The volume a snapshot was taken of: the one it reads through while virtual,
        else the source of the background copy that made it real."""
        if snapshot.source:
            return snapshot.source
        made_real = [j.source for j in jobs if j.target == snapshot.name and j.source]
        return made_real[-1] if made_real else ""

    async def create_snapshot(self, csi_name: str, name: str, source_id: str) -> Snapshot:
        """The snapshot of `source_id` named `name`: made now, or by an earlier call."""
        async with self._locks.hold(name):
            existing = await self._admin.volume(name)
            if existing is not None:
                if existing.kind != SNAPSHOT:
                    raise AlreadyExists(f"{csi_name!r} is the name of a volume")
                origin = self._origin(existing, await self._admin.jobs())
                if origin != source_id:
                    raise AlreadyExists(f"snapshot {csi_name!r} exists already, of volume "
                                        f"{origin!r}")
                return Snapshot(existing, origin)
            source = await self.primary(source_id)
            return Snapshot(await self._admin.create_snapshot(source.name, name), source.name)

    async def snapshots(self, snapshot_id: str = "", source_id: str = "") -> list[Snapshot]:
        """The snapshots, sorted by name: one by id, those of one volume, or all."""
        if snapshot_id:
            found = await self._admin.volume(snapshot_id)
            candidates = [found] if found is not None else []
        else:
            candidates = await self._admin.volumes()
        jobs = await self._admin.jobs()
        found_snapshots = sorted((Snapshot(v, self._origin(v, jobs)) for v in candidates
                                  if v.kind == SNAPSHOT), key=lambda s: s.volume.name)
        return [s for s in found_snapshots if not source_id or s.origin == source_id]

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        """Deletes the snapshot if there is one of that id; returns whether there was."""
        async with self._locks.hold(snapshot_id):
            found = await self._admin.volume(snapshot_id)
            if found is None or found.kind != SNAPSHOT:
                return False
            await self._delete(found.name)
            return True
