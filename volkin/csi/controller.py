"""The CSI Controller service: volumes, snapshots and clones on the admin API.

Snapshots and clones are volkin's instant operations. CreateSnapshot is a PIT snapshot,
ready to use at once. CreateVolume from a snapshot or a volume creates the volume and
starts a refresh of it from the source: it reads as the source at once, while a
background copy makes it independent.

A volume that others still read through (an origin whose snapshots are virtual, a
snapshot that a clone is still copying) cannot be deleted in volkin. Deleting it here
starts the background copies that make those volumes real, waits for them a while
(`delete_wait`), and then deletes it, or answers FAILED_PRECONDITION saying which copies
are still running; the CO retries later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from volkin.api.csi.v1 import csi_pb2, csi_pb2_grpc
from volkin.csi import PARAM_BLOCK_SIZE, names, requests
from volkin.csi.admin import ENDED, FAILED, PRIMARY, REFRESH, SNAPSHOT, Admin, Job, Volume
from volkin.csi.locks import KeyedLocks
from volkin.csi.rpc import Context, answer
from volkin.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)

RPC = csi_pb2.ControllerServiceCapability.RPC
# Adding expansion later: EXPAND_VOLUME here, ControllerExpandVolume below (a resize on
# the admin API), and the node's NodeExpandVolume (grow the file system).
CAPABILITIES = (RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_VOLUME,
                RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.CLONE_VOLUME)
_POLL = 0.2


def _csi_volume(volume: Volume, source: csi_pb2.VolumeContentSource | None = None
                ) -> csi_pb2.Volume:
    return csi_pb2.Volume(volume_id=volume.name, capacity_bytes=volume.size_bytes,
                          volume_context={"blockSize": str(volume.block_size)},
                          content_source=source)


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, admin: Admin, block_size: int, delete_wait: float) -> None:
        self._admin = admin
        self._block_size = block_size
        self._delete_wait = delete_wait
        self._locks = KeyedLocks()
        # volkin keeps no creation time for a snapshot: report when this driver made it
        # (or first saw it, for one made before it started).
        self._seen: dict[str, Timestamp] = {}

    @answer
    async def ControllerGetCapabilities(
            self, request: csi_pb2.ControllerGetCapabilitiesRequest,
            context: Context) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES])

    # -- volumes -------------------------------------------------------------------
    @answer
    async def CreateVolume(self, request: csi_pb2.CreateVolumeRequest,
                           context: Context) -> csi_pb2.CreateVolumeResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        requests.check_capabilities(request.volume_capabilities)
        capacity = requests.Capacity.of(
            request.capacity_range if request.HasField("capacity_range") else None)
        parameters = dict(request.parameters)
        block = requests.block_size(parameters, self._block_size)
        name = names.volkin_name(request.name)
        async with self._locks.hold(name):
            source = await self._content_source(request)
            content = request.volume_content_source if source is not None else None
            existing = await self._admin.volume(name)
            if existing is not None:
                await self._check_same(existing, request.name, capacity, parameters, block,
                                       source)
                return csi_pb2.CreateVolumeResponse(volume=_csi_volume(existing, content))
            if source is None:
                created = await self._admin.create_volume(name, capacity.size(block), block)
                return csi_pb2.CreateVolumeResponse(volume=_csi_volume(created))
            self._check_clone_fits(source, capacity, parameters, block)
            created = await self._admin.create_volume(name, source.size_bytes,
                                                      source.block_size)
            await self._admin.start_refresh(name, source.name)
            return csi_pb2.CreateVolumeResponse(volume=_csi_volume(created, content))

    async def _content_source(self, request: csi_pb2.CreateVolumeRequest) -> Volume | None:
        if not request.HasField("volume_content_source"):
            return None
        content = request.volume_content_source
        kind = content.WhichOneof("type")
        if kind == "snapshot":
            wanted, what, ident = SNAPSHOT, "snapshot", content.snapshot.snapshot_id
        elif kind == "volume":
            wanted, what, ident = PRIMARY, "volume", content.volume.volume_id
        else:
            raise InvalidArgument("volume_content_source names neither a snapshot nor a volume")
        if not ident:
            raise InvalidArgument(f"volume_content_source needs a {what} id")
        found = await self._admin.volume(ident)
        if found is None or found.kind != wanted:
            raise NotFound(f"source {what} {ident!r} does not exist")
        return found

    @staticmethod
    def _check_clone_fits(source: Volume, capacity: requests.Capacity,
                          parameters: dict[str, str], block: int) -> None:
        # A refresh copies between volumes of one size and block size; growing the new
        # volume afterwards needs a resize in the admin API, which volkin has not yet.
        if not capacity.fits(source.size_bytes):
            raise OutOfRange(
                f"a volume made from {source.name!r} has its size, {source.size_bytes} bytes, "
                f"outside the capacity range [{capacity.required}, "
                f"{capacity.limit or 'no limit'}]; volkin cannot grow a volume yet")
        if PARAM_BLOCK_SIZE in parameters and block != source.block_size:
            raise InvalidArgument(
                f"{PARAM_BLOCK_SIZE}={block} differs from the source's block size "
                f"{source.block_size}; a copy keeps its source's block size")

    async def _check_same(self, existing: Volume, csi_name: str, capacity: requests.Capacity,
                          parameters: dict[str, str], block: int,
                          source: Volume | None) -> None:
        """Raises AlreadyExists unless `existing` is what this CreateVolume asks for. A call
        whose first attempt created the volume but not its refresh starts the refresh."""
        def refused(why: str) -> AlreadyExists:
            return AlreadyExists(f"volume {csi_name!r} exists already with {why}")

        if existing.kind != PRIMARY:
            raise refused("a snapshot of that name")
        if not capacity.fits(existing.size_bytes):
            raise refused(f"{existing.size_bytes} bytes, outside the capacity range asked for")
        if PARAM_BLOCK_SIZE in parameters and existing.block_size != block:
            raise refused(f"block size {existing.block_size}")
        refreshes = [j for j in await self._admin.jobs()
                     if j.target == existing.name and j.kind == REFRESH]
        if source is None:
            if refreshes or existing.source:
                raise refused(f"content copied from {existing.source or refreshes[-1].source!r}")
            return
        if existing.source == source.name or any(j.source == source.name for j in refreshes):
            return
        if existing.source or refreshes:
            raise refused(f"content copied from {existing.source or refreshes[-1].source!r}")
        self._check_clone_fits(source, capacity, parameters, block)
        if (existing.size_bytes, existing.block_size) != (source.size_bytes, source.block_size):
            raise refused("a size or block size other than its source's")
        await self._admin.start_refresh(existing.name, source.name)

    @answer
    async def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest,
                           context: Context) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        async with self._locks.hold(request.volume_id):
            found = await self._admin.volume(request.volume_id)
            # A snapshot's id names no CSI volume: nothing to delete under that id.
            if found is not None and found.kind == PRIMARY:
                await self._delete(found.name)
        return csi_pb2.DeleteVolumeResponse()

    async def _delete(self, name: str) -> None:
        """Deletes the volume, first making the volumes that read through it real."""
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
            if not pending or time.monotonic() >= deadline:
                return list(pending.values())
            await asyncio.sleep(_POLL)

    @answer
    async def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest,
                                  context: Context) -> csi_pb2.ControllerGetVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        found = await self._primary(request.volume_id)
        return csi_pb2.ControllerGetVolumeResponse(volume=_csi_volume(found))

    async def _primary(self, volume_id: str) -> Volume:
        found = await self._admin.volume(volume_id)
        if found is None or found.kind != PRIMARY:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return found

    @answer
    async def ListVolumes(self, request: csi_pb2.ListVolumesRequest,
                          context: Context) -> csi_pb2.ListVolumesResponse:
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        volumes = sorted((v for v in await self._admin.volumes() if v.kind == PRIMARY),
                         key=lambda v: v.name)
        chosen, following = names.page(volumes, [v.name for v in volumes],
                                       request.starting_token, request.max_entries)
        return csi_pb2.ListVolumesResponse(
            entries=[csi_pb2.ListVolumesResponse.Entry(volume=_csi_volume(v)) for v in chosen],
            next_token=following)

    @answer
    async def ValidateVolumeCapabilities(
            self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
            context: Context) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        found = await self._primary(request.volume_id)
        problems = [p for p in map(requests.capability_problem, request.volume_capabilities)
                    if p]
        raw_block = request.parameters.get(PARAM_BLOCK_SIZE)
        if raw_block is not None and raw_block != str(found.block_size):
            problems.append(f"the volume's block size is {found.block_size}, not {raw_block}")
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters))

    # -- snapshots -----------------------------------------------------------------
    def _seen_at(self, name: str) -> Timestamp:
        if name not in self._seen:
            stamp = Timestamp()
            stamp.GetCurrentTime()
            self._seen[name] = stamp
        return self._seen[name]

    def _csi_snapshot(self, snapshot: Volume, origin: str) -> csi_pb2.Snapshot:
        # ready_to_use at once: a volkin snapshot is readable (and clonable) the moment it
        # exists, while it is still virtual.
        return csi_pb2.Snapshot(snapshot_id=snapshot.name, source_volume_id=origin,
                                size_bytes=snapshot.size_bytes,
                                creation_time=self._seen_at(snapshot.name), ready_to_use=True)

    @staticmethod
    def _origin(snapshot: Volume, jobs: list[Job]) -> str:
        """The volume a snapshot was taken of: the one it reads through while virtual,
        else the source of the background copy that made it real."""
        if snapshot.source:
            return snapshot.source
        made_real = [j.source for j in jobs if j.target == snapshot.name and j.source]
        return made_real[-1] if made_real else ""

    @answer
    async def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest,
                             context: Context) -> csi_pb2.CreateSnapshotResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        if not request.source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        name = names.volkin_name(request.name)
        async with self._locks.hold(name):
            existing = await self._admin.volume(name)
            if existing is not None:
                origin = self._origin(existing, await self._admin.jobs())
                if existing.kind != SNAPSHOT:
                    raise AlreadyExists(f"{request.name!r} is the name of a volume")
                if origin != request.source_volume_id:
                    raise AlreadyExists(f"snapshot {request.name!r} exists already, of volume "
                                        f"{origin!r}")
                return csi_pb2.CreateSnapshotResponse(
                    snapshot=self._csi_snapshot(existing, origin))
            source = await self._primary(request.source_volume_id)
            created = await self._admin.create_snapshot(source.name, name)
            return csi_pb2.CreateSnapshotResponse(
                snapshot=self._csi_snapshot(created, source.name))

    @answer
    async def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest,
                             context: Context) -> csi_pb2.DeleteSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        async with self._locks.hold(request.snapshot_id):
            found = await self._admin.volume(request.snapshot_id)
            if found is not None and found.kind == SNAPSHOT:
                await self._delete(found.name)
                self._seen.pop(found.name, None)
        return csi_pb2.DeleteSnapshotResponse()

    @answer
    async def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest,
                            context: Context) -> csi_pb2.ListSnapshotsResponse:
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        jobs = await self._admin.jobs()
        if request.snapshot_id:
            found = await self._admin.volume(request.snapshot_id)
            candidates = [found] if found is not None else []
        else:
            candidates = await self._admin.volumes()
        snapshots = sorted(((v, self._origin(v, jobs)) for v in candidates
                            if v.kind == SNAPSHOT), key=lambda pair: pair[0].name)
        if request.source_volume_id:
            snapshots = [s for s in snapshots if s[1] == request.source_volume_id]
        chosen, following = names.page(snapshots, [s[0].name for s in snapshots],
                                       request.starting_token, request.max_entries)
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._csi_snapshot(*s))
                     for s in chosen],
            next_token=following)
