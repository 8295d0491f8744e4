"""The Admin gRPC servicer: converts protobuf to calls on the core and the jobs, and back.

Domain errors become gRPC statuses through `volkin.rpc_status`, in one place
(`_answer`); nothing here decides anything about volumes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from controller.core import Core
from controller.jobs import JobRecord, Jobs, JobState
from volkin.api.v1 import admin_pb2, admin_pb2_grpc
from volkin.engine import Kind, VolumeInfo
from volkin.errors import InvalidArgument, VolkinError
from volkin.log import event
from volkin.rpc_status import status_of

_log = logging.getLogger("controller.service")
Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

_KIND = {Kind.PRIMARY: admin_pb2.VOLUME_KIND_PRIMARY, Kind.SNAPSHOT: admin_pb2.VOLUME_KIND_SNAPSHOT}
_STATE = {JobState.RUNNING: admin_pb2.JOB_STATE_RUNNING,
          JobState.PAUSED: admin_pb2.JOB_STATE_PAUSED,
          JobState.DONE: admin_pb2.JOB_STATE_DONE,
          JobState.FAILED: admin_pb2.JOB_STATE_FAILED}
_JOB_KIND = {"refresh": admin_pb2.JOB_KIND_REFRESH, "materialize": admin_pb2.JOB_KIND_MATERIALIZE}
WATCH_INTERVAL = 0.2


async def _answer(context: Context, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except VolkinError as exc:
        event(_log, "admin.refused", code=status_of(exc).name, error=exc.message)
        await context.abort(status_of(exc), exc.message)
        raise  # abort raises; this keeps type checkers sure nothing returns


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, core: Core, jobs: Jobs, default_block_size: int) -> None:
        self._core = core
        self._jobs = jobs
        self._default_block_size = default_block_size

    # -- conversions -------------------------------------------------------------
    def _volume(self, info: VolumeInfo) -> admin_pb2.Volume:
        return admin_pb2.Volume(
            name=info.name, size_bytes=info.size_blocks * info.block_size,
            block_size=info.block_size, kind=_KIND[info.kind], source=info.source or "",
            valid_blocks=info.valid_blocks, total_blocks=info.size_blocks,
            agents=self._core.placement.nodes_of(info.memory))

    def _job(self, record: JobRecord) -> admin_pb2.Job:
        return admin_pb2.Job(
            id=record.id, kind=_JOB_KIND[record.kind], state=_STATE[record.state],
            target=record.target, source=record.source, blocks_total=record.blocks_total,
            blocks_done=self._jobs.blocks_done(record), bytes_copied=record.bytes_copied,
            rate_bytes_per_second=record.rate, error=record.error)

    # -- volumes -------------------------------------------------------------------
    async def CreateVolume(self, request: admin_pb2.CreateVolumeRequest,
                           context: Context) -> admin_pb2.Volume:
        async def call() -> admin_pb2.Volume:
            if request.size_bytes == 0:
                raise InvalidArgument("a volume needs a size (for example 1GiB)")
            block_size = request.block_size or self._default_block_size
            info = await self._core.create_volume(request.name, request.size_bytes, block_size)
            event(_log, "volume.created", volume=info.name, size=request.size_bytes,
                  block_size=block_size)
            return self._volume(info)
        return await _answer(context, call)

    async def GetVolume(self, request: admin_pb2.GetVolumeRequest,
                        context: Context) -> admin_pb2.Volume:
        async def call() -> admin_pb2.Volume:
            return self._volume(self._core.engine.info(request.name))
        return await _answer(context, call)

    async def ListVolumes(self, request: admin_pb2.ListVolumesRequest,
                          context: Context) -> admin_pb2.ListVolumesResponse:
        return admin_pb2.ListVolumesResponse(
            volumes=[self._volume(info) for info in self._core.engine.volumes()])

    async def DeleteVolume(self, request: admin_pb2.DeleteVolumeRequest,
                           context: Context) -> admin_pb2.DeleteVolumeResponse:
        async def call() -> admin_pb2.DeleteVolumeResponse:
            await self._core.delete_volume(request.name)
            event(_log, "volume.deleted", volume=request.name)
            return admin_pb2.DeleteVolumeResponse()
        return await _answer(context, call)

    async def CreateSnapshot(self, request: admin_pb2.CreateSnapshotRequest,
                             context: Context) -> admin_pb2.Volume:
        async def call() -> admin_pb2.Volume:
            info = await self._core.create_snapshot(request.source, request.name)
            event(_log, "snapshot.created", volume=info.name, source=request.source)
            return self._volume(info)
        return await _answer(context, call)

    # -- refresh and jobs ------------------------------------------------------------
    async def StartRefresh(self, request: admin_pb2.StartRefreshRequest,
                           context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            record = await self._jobs.start_refresh(request.target, request.source,
                                                    request.rate_bytes_per_second)
            event(_log, "refresh.started", job=record.id, target=request.target,
                  source=request.source, blocks=record.blocks_total)
            return self._job(record)
        return await _answer(context, call)

    async def StartMaterialize(self, request: admin_pb2.StartMaterializeRequest,
                               context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            record = await self._jobs.start_materialize(request.name,
                                                        request.rate_bytes_per_second)
            event(_log, "materialize.started", job=record.id, volume=request.name,
                  blocks=record.blocks_total)
            return self._job(record)
        return await _answer(context, call)

    async def GetJob(self, request: admin_pb2.GetJobRequest, context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            return self._job(self._jobs.get(request.id))
        return await _answer(context, call)

    async def ListJobs(self, request: admin_pb2.ListJobsRequest,
                       context: Context) -> admin_pb2.ListJobsResponse:
        return admin_pb2.ListJobsResponse(jobs=[self._job(r) for r in self._jobs.list()])

    async def PauseJob(self, request: admin_pb2.PauseJobRequest,
                       context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            return self._job(await self._jobs.pause(request.id))
        return await _answer(context, call)

    async def ResumeJob(self, request: admin_pb2.ResumeJobRequest,
                        context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            return self._job(await self._jobs.resume(request.id))
        return await _answer(context, call)

    async def WatchJob(self, request: admin_pb2.GetJobRequest,
                       context: Context) -> AsyncIterator[admin_pb2.Job]:
        async def first() -> admin_pb2.Job:
            return self._job(self._jobs.get(request.id))
        last = await _answer(context, first)
        yield last
        while last.state not in (admin_pb2.JOB_STATE_DONE, admin_pb2.JOB_STATE_FAILED):
            await asyncio.sleep(WATCH_INTERVAL)
            current = self._job(self._jobs.get(request.id))
            if current != last:
                yield current
                last = current
