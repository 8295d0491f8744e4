"""The CSI driver's client of the controller's admin API.

Every call has a deadline; a refused call raises the domain error the controller meant
(`volkin.rpc_status.error_from_rpc`), which the servicers answer with the same code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

import volkin.tls
from volkin.api.v1 import admin_pb2, admin_pb2_grpc
from volkin.errors import InvalidArgument, NotFound
from volkin.rpc_status import error_from_rpc

CALL_TIMEOUT = 30.0
T = TypeVar("T")
Volume = admin_pb2.Volume
Job = admin_pb2.Job
PRIMARY = admin_pb2.VOLUME_KIND_PRIMARY
SNAPSHOT = admin_pb2.VOLUME_KIND_SNAPSHOT
REFRESH = admin_pb2.JOB_KIND_REFRESH
FAILED = admin_pb2.JOB_STATE_FAILED
CANCELLED = admin_pb2.JOB_STATE_CANCELLED
ENDED = (admin_pb2.JOB_STATE_DONE, admin_pb2.JOB_STATE_FAILED, CANCELLED)


class Admin:
    """One channel to the controller's admin API."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = volkin.tls.aio_channel(address)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any,
                    timeout: float = CALL_TIMEOUT) -> T:
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc.code(), exc.details() or "") from None

    async def volume(self, name: str) -> Volume | None:
        """The volume (snapshots too), or None if there is none of that name."""
        try:
            return await self._call(self._stub.GetVolume, admin_pb2.GetVolumeRequest(name=name))
        except NotFound:
            return None

    async def ping(self, timeout: float) -> None:
        """Raises Unavailable unless the active controller answers within `timeout`: it
        answers a look-up of a volume no one can name (O(1)) with NOT_FOUND."""
        try:
            await self._call(self._stub.GetVolume, admin_pb2.GetVolumeRequest(name=""), timeout)
        except (NotFound, InvalidArgument):
            return

    async def volumes(self) -> list[Volume]:
        listed = await self._call(self._stub.ListVolumes, admin_pb2.ListVolumesRequest())
        return list(listed.volumes)

    async def create_volume(self, name: str, size: int, block_size: int) -> Volume:
        return await self._call(self._stub.CreateVolume, admin_pb2.CreateVolumeRequest(
            name=name, size_bytes=size, block_size=block_size))

    async def resize_volume(self, name: str, size: int) -> Volume:
        return await self._call(self._stub.ResizeVolume, admin_pb2.ResizeVolumeRequest(
            name=name, size_bytes=size))

    async def delete_volume(self, name: str) -> None:
        await self._call(self._stub.DeleteVolume, admin_pb2.DeleteVolumeRequest(name=name))

    async def create_snapshot(self, source: str, name: str) -> Volume:
        return await self._call(self._stub.CreateSnapshot,
                                admin_pb2.CreateSnapshotRequest(source=source, name=name))

    async def start_refresh(self, target: str, source: str) -> Job:
        return await self._call(self._stub.StartRefresh,
                                admin_pb2.StartRefreshRequest(target=target, source=source))

    async def start_materialize(self, name: str) -> Job:
        return await self._call(self._stub.StartMaterialize,
                                admin_pb2.StartMaterializeRequest(name=name))

    async def job(self, job_id: str) -> Job:
        return await self._call(self._stub.GetJob, admin_pb2.GetJobRequest(id=job_id))

    async def jobs(self) -> list[Job]:
        listed = await self._call(self._stub.ListJobs, admin_pb2.ListJobsRequest())
        return list(listed.jobs)
