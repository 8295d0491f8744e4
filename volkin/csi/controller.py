"""The CSI Controller service: converts CSI requests to the volkin lifecycle
(`lifecycle.py`: volumes, snapshots, clones, deletes) and its answers back."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from volkin.api.csi.v1 import csi_pb2, csi_pb2_grpc
from volkin.csi import PARAM_BLOCK_SIZE, names, requests
from volkin.csi.admin import Admin, Volume
from volkin.csi.lifecycle import Lifecycle, NewVolume, Snapshot
from volkin.csi.rpc import Context, answer
from volkin.errors import InvalidArgument

RPC = csi_pb2.ControllerServiceCapability.RPC
# EXPAND_VOLUME: ControllerExpandVolume is a ResizeVolume on the admin API; the plugin
# says OFFLINE (identity.py) and the node grows the file system (NodeExpandVolume).
CAPABILITIES = (RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_VOLUME,
                RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.CLONE_VOLUME,
                RPC.EXPAND_VOLUME)


def _required(**fields: str) -> None:
    for name, value in fields.items():
        if not value:
            raise InvalidArgument(f"{name} is required")


def _csi_volume(volume: Volume, source: csi_pb2.VolumeContentSource | None = None
                ) -> csi_pb2.Volume:
    return csi_pb2.Volume(volume_id=volume.name, capacity_bytes=volume.size_bytes,
                          volume_context={PARAM_BLOCK_SIZE: str(volume.block_size)},
                          content_source=source)


def _new_volume(request: csi_pb2.CreateVolumeRequest, default_block_size: int) -> NewVolume:
    _required(name=request.name)
    requests.check_capabilities(request.volume_capabilities)
    capacity = requests.Capacity.of(
        request.capacity_range if request.HasField("capacity_range") else None)
    parameters = dict(request.parameters)
    block_size = requests.block_size(parameters, default_block_size)
    kind, ident = "", ""
    if request.HasField("volume_content_source"):
        content = request.volume_content_source
        kind = content.WhichOneof("type") or ""
        if kind == "snapshot":
            ident = content.snapshot.snapshot_id
        elif kind == "volume":
            ident = content.volume.volume_id
        else:
            raise InvalidArgument("volume_content_source names neither a snapshot nor a volume")
        if not ident:
            raise InvalidArgument(f"volume_content_source needs a {kind} id")
    return NewVolume(request.name, names.volkin_name(request.name), capacity, block_size,
                     PARAM_BLOCK_SIZE in parameters, kind, ident)


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, admin: Admin, block_size: int, delete_wait: float) -> None:
        self._lifecycle = Lifecycle(admin, delete_wait)
        self._block_size = block_size
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
        new = _new_volume(request, self._block_size)
        volume = await self._lifecycle.create_volume(new)
        source = request.volume_content_source if new.source_kind else None
        return csi_pb2.CreateVolumeResponse(volume=_csi_volume(volume, source))

    @answer
    async def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest,
                           context: Context) -> csi_pb2.DeleteVolumeResponse:
        _required(volume_id=request.volume_id)
        await self._lifecycle.delete_volume(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    @answer
    async def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                                     context: Context) -> csi_pb2.ControllerExpandVolumeResponse:
        _required(volume_id=request.volume_id)
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        volume = await self._lifecycle.expand_volume(
            request.volume_id, requests.Capacity.of(request.capacity_range))
        # A block volume needs nothing on the node: the next stage attaches it at its new
        # size. A mount volume's file system grows there (NodeExpandVolume).
        block = (request.HasField("volume_capability")
                 and request.volume_capability.WhichOneof("access_type") == "block")
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=volume.size_bytes,
                                                      node_expansion_required=not block)

    @answer
    async def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest,
                                  context: Context) -> csi_pb2.ControllerGetVolumeResponse:
        _required(volume_id=request.volume_id)
        volume = await self._lifecycle.primary(request.volume_id)
        return csi_pb2.ControllerGetVolumeResponse(volume=_csi_volume(volume))

    @answer
    async def ListVolumes(self, request: csi_pb2.ListVolumesRequest,
                          context: Context) -> csi_pb2.ListVolumesResponse:
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        volumes = await self._lifecycle.primaries()
        chosen, following = names.page(volumes, [v.name for v in volumes],
                                       request.starting_token, request.max_entries)
        return csi_pb2.ListVolumesResponse(
            entries=[csi_pb2.ListVolumesResponse.Entry(volume=_csi_volume(v)) for v in chosen],
            next_token=following)

    @answer
    async def ValidateVolumeCapabilities(
            self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
            context: Context) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        _required(volume_id=request.volume_id)
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        volume = await self._lifecycle.primary(request.volume_id)
        problems = [p for p in map(requests.capability_problem, request.volume_capabilities)
                    if p]
        asked_block = request.parameters.get(PARAM_BLOCK_SIZE)
        if asked_block is not None and asked_block != str(volume.block_size):
            problems.append(f"the volume's block size is {volume.block_size}, not {asked_block}")
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters))

    # -- snapshots -----------------------------------------------------------------
    def _csi_snapshot(self, snapshot: Snapshot) -> csi_pb2.Snapshot:
        name = snapshot.volume.name
        if name not in self._seen:
            self._seen[name] = Timestamp()
            self._seen[name].GetCurrentTime()
        # ready_to_use at once: a volkin snapshot is readable (and can be copied) the
        # moment it exists, while it is still virtual.
        return csi_pb2.Snapshot(snapshot_id=name, source_volume_id=snapshot.origin,
                                size_bytes=snapshot.volume.size_bytes,
                                creation_time=self._seen[name], ready_to_use=True)

    @answer
    async def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest,
                             context: Context) -> csi_pb2.CreateSnapshotResponse:
        _required(name=request.name, source_volume_id=request.source_volume_id)
        snapshot = await self._lifecycle.create_snapshot(
            request.name, names.volkin_name(request.name), request.source_volume_id)
        return csi_pb2.CreateSnapshotResponse(snapshot=self._csi_snapshot(snapshot))

    @answer
    async def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest,
                             context: Context) -> csi_pb2.DeleteSnapshotResponse:
        _required(snapshot_id=request.snapshot_id)
        if await self._lifecycle.delete_snapshot(request.snapshot_id):
            self._seen.pop(request.snapshot_id, None)
        return csi_pb2.DeleteSnapshotResponse()

    @answer
    async def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest,
                            context: Context) -> csi_pb2.ListSnapshotsResponse:
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        snapshots = await self._lifecycle.snapshots(request.snapshot_id,
                                                    request.source_volume_id)
        chosen, following = names.page(snapshots, [s.volume.name for s in snapshots],
                                       request.starting_token, request.max_entries)
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._csi_snapshot(s))
                     for s in chosen],
            next_token=following)
