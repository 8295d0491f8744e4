"""The CSI Node service: stage (attach, make the file system once, mount), publish (bind),
and undo both; volume stats; the node's identity and topology."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from volkin.api.csi.v1 import csi_pb2, csi_pb2_grpc
from volkin.csi import TOPOLOGY_KEY, attach, mounts, names, requests
from volkin.csi.admin import PRIMARY, Admin
from volkin.csi.attach import Attacher, attacher_for
from volkin.csi.locks import KeyedLocks
from volkin.csi.rpc import Context, answer
from volkin.csi.state import Staged, StateDir
from volkin.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from volkin.log import event

RPC = csi_pb2.NodeServiceCapability.RPC
# EXPAND_VOLUME: NodeExpandVolume grows the file system on the staged device
# (resize2fs / xfs_growfs) once the device shows the size the controller gave the volume.
CAPABILITIES = (RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME)
Usage = csi_pb2.VolumeUsage
_log = logging.getLogger("volkin.csi.node")


def _required(**fields: str) -> None:
    for name, value in fields.items():
        if not value:
            raise InvalidArgument(f"{name} is required")


def _capability(request: csi_pb2.NodeStageVolumeRequest | csi_pb2.NodePublishVolumeRequest
                ) -> csi_pb2.VolumeCapability:
    if not request.HasField("volume_capability"):
        raise InvalidArgument("volume_capability is required")
    problem = requests.capability_problem(request.volume_capability)
    if problem:
        raise InvalidArgument(problem)
    return request.volume_capability


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, admin: Admin, nbd: str, attacher: Attacher,
                 state: StateDir) -> None:
        self._node_id = node_id
        self._admin = admin
        self._nbd = nbd
        self._attacher = attacher
        self._state = state
        self._locks = KeyedLocks()

    @answer
    async def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest,
                                  context: Context) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES])

    @answer
    async def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest,
                          context: Context) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._node_id,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: self._node_id}))

    # -- stage -----------------------------------------------------------------------
    @answer
    async def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest,
                              context: Context) -> csi_pb2.NodeStageVolumeResponse:
        _required(volume_id=request.volume_id, staging_target_path=request.staging_target_path)
        cap = _capability(request)
        volume_id, path = request.volume_id, request.staging_target_path
        access = "block" if cap.WhichOneof("access_type") == "block" else "mount"
        async with self._locks.hold(volume_id):
            staged = self._state.load(volume_id) if names.is_volkin_name(volume_id) else None
            if staged is None:
                volume = await self._admin.volume(volume_id)
                if volume is None or volume.kind != PRIMARY:
                    raise NotFound(f"volume {volume_id!r} does not exist")
                attachment = await self._attacher.attach(volume_id,
                                                         self._state.workdir(volume_id))
                staged = Staged(volume_id, path, access, attachment)
                self._state.save(staged)  # before the device is used: unstage can undo it
                event(_log, "csi.attached", volume=volume_id, method=attachment.method,
                      device=attachment.device)
            elif (staged.staging_path, staged.access) != (path, access):
                raise AlreadyExists(f"volume {volume_id!r} is staged at {staged.staging_path} "
                                    f"as a {staged.access} volume already")
            if access == "mount" and not mounts.is_mounted(path):
                fs = await mounts.ensure_fs(staged.attachment.device,
                                            cap.mount.fs_type or requests.DEFAULT_FS)
                # Expanded while not staged (OFFLINE expansion): ext4 grows here, before
                # it is mounted; xfs grows in NodeExpandVolume, which the CO calls next.
                if await mounts.grow_unmounted_ext4(staged.attachment.device):
                    event(_log, "csi.expanded", volume=volume_id,
                          device=staged.attachment.device, fs=fs)
                await mounts.mount(staged.attachment.device, path, fs, list(cap.mount.mount_flags))
                event(_log, "csi.staged", volume=volume_id, path=path, fs=fs)
        return csi_pb2.NodeStageVolumeResponse()

    @answer
    async def NodeUnstageVolume(self, request: csi_pb2.NodeUnstageVolumeRequest,
                                context: Context) -> csi_pb2.NodeUnstageVolumeResponse:
        _required(volume_id=request.volume_id, staging_target_path=request.staging_target_path)
        volume_id = request.volume_id
        async with self._locks.hold(volume_id):
            await mounts.unmount(request.staging_target_path)
            staged = self._state.load(volume_id) if names.is_volkin_name(volume_id) else None
            if staged is not None:
                await attacher_for(staged.attachment.method, self._nbd).detach(
                    staged.attachment)
                self._state.remove(volume_id)
                event(_log, "csi.detached", volume=volume_id, method=staged.attachment.method,
                      device=staged.attachment.device)
        return csi_pb2.NodeUnstageVolumeResponse()

    # -- publish -----------------------------------------------------------------------
    @answer
    async def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                                context: Context) -> csi_pb2.NodePublishVolumeResponse:
        _required(volume_id=request.volume_id, staging_target_path=request.staging_target_path,
                  target_path=request.target_path)
        cap = _capability(request)
        volume_id, target = request.volume_id, request.target_path
        async with self._locks.hold(volume_id):
            staged = self._state.load(volume_id) if names.is_volkin_name(volume_id) else None
            if staged is None:
                raise FailedPrecondition(f"volume {volume_id!r} is not staged on this node; "
                                         "NodeStageVolume comes first")
            access = "block" if cap.WhichOneof("access_type") == "block" else "mount"
            if access != staged.access:
                raise FailedPrecondition(f"volume {volume_id!r} is staged as a {staged.access} "
                                         f"volume, not {access}")
            if mounts.is_mounted(target):
                return csi_pb2.NodePublishVolumeResponse()
            if access == "block":
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                Path(target).touch()
                device = staged.attachment.device
                if request.readonly:
                    # A read-only mount does not stop writes to a device file on it: the
                    # pod gets a read-only loop device over the staged one instead.
                    device = await attach.readonly_loop(device)
                    self._state.save_readonly_device(target, device)
                await mounts.bind(device, target, request.readonly)
            else:
                Path(target).mkdir(parents=True, exist_ok=True)
                await mounts.bind(staged.staging_path, target, request.readonly)
            event(_log, "csi.published", volume=volume_id, target=target,
                  readonly=request.readonly)
        return csi_pb2.NodePublishVolumeResponse()

    @answer
    async def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest,
                                  context: Context) -> csi_pb2.NodeUnpublishVolumeResponse:
        _required(volume_id=request.volume_id, target_path=request.target_path)
        target = request.target_path
        async with self._locks.hold(request.volume_id):
            await mounts.unmount(target)
            readonly_device = self._state.readonly_device(target)
            if readonly_device:
                await attach.detach_loop(readonly_device)
                self._state.forget_readonly_device(target)
            if os.path.isdir(target):
                os.rmdir(target)
            elif os.path.lexists(target):
                os.unlink(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- expansion ---------------------------------------------------------------------
    @answer
    async def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest,
                               context: Context) -> csi_pb2.NodeExpandVolumeResponse:
        """Grows the file system of a staged mount volume to its device's size (a block
        volume has nothing to grow). The device must show the new size already: an NBD
        connection keeps the size it was opened with (kernel nbd and qemu-storage-daemon
        alike, and the loop device over the latter), so a volume grown while it was
        attached keeps its old size here until it is unstaged and staged again. That is
        why the plugin says expansion is OFFLINE: the CO grows a volume that is not
        staged, stages it (a new connection, the new size) and then calls this."""
        _required(volume_id=request.volume_id, volume_path=request.volume_path)
        volume_id = request.volume_id
        async with self._locks.hold(volume_id):
            staged = self._state.load(volume_id) if names.is_volkin_name(volume_id) else None
            if staged is None:
                raise NotFound(f"volume {volume_id!r} is not staged on this node")
            if not os.path.exists(request.volume_path):
                raise NotFound(f"volume path {request.volume_path!r} does not exist")
            device = staged.attachment.device
            size = mounts.device_size(device)
            wanted = request.capacity_range.required_bytes if request.HasField(
                "capacity_range") else 0
            if size < wanted:
                raise FailedPrecondition(
                    f"device {device} of volume {volume_id!r} still has {size} bytes, not "
                    f"{wanted}: its NBD connection keeps the size it was opened with; "
                    f"unstage the volume and stage it again (volkin-csi expands offline)")
            if staged.access == "mount":
                fs = await mounts.grow_fs(device, staged.staging_path)
                event(_log, "csi.expanded", volume=volume_id, device=device, size=size, fs=fs)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    # -- stats -------------------------------------------------------------------------
    @answer
    async def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest,
                                 context: Context) -> csi_pb2.NodeGetVolumeStatsResponse:
        _required(volume_id=request.volume_id, volume_path=request.volume_path)
        staged = (self._state.load(request.volume_id)
                  if names.is_volkin_name(request.volume_id) else None)
        if staged is None:
            raise NotFound(f"volume {request.volume_id!r} is not staged on this node")
        path = request.volume_path
        if not os.path.exists(path):
            raise NotFound(f"volume path {path!r} does not exist")
        if staged.access == "block":
            return csi_pb2.NodeGetVolumeStatsResponse(
                usage=[Usage(unit=Usage.BYTES, total=mounts.device_size(path))])
        fs = os.statvfs(path)
        return csi_pb2.NodeGetVolumeStatsResponse(usage=[
            Usage(unit=Usage.BYTES, total=fs.f_blocks * fs.f_frsize,
                  available=fs.f_bavail * fs.f_frsize,
                  used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize),
            Usage(unit=Usage.INODES, total=fs.f_files, available=fs.f_favail,
                  used=fs.f_files - fs.f_ffree)])
