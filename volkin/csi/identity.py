"""The CSI Identity service: who the driver is and which services it serves."""

from __future__ import annotations

from google.protobuf.wrappers_pb2 import BoolValue

from volkin import __version__
from volkin.api.csi.v1 import csi_pb2, csi_pb2_grpc
from volkin.csi import DRIVER_NAME
from volkin.csi.admin import Admin
from volkin.csi.rpc import Context, answer
from volkin.errors import Unavailable

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion
# Liveness probes wait a few seconds: answer before they give up.
PROBE_TIMEOUT = 2.0


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, serves_controller: bool, admin: Admin) -> None:
        self._serves_controller = serves_controller
        self._admin = admin

    @answer
    async def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                            context: Context) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    @answer
    async def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                                    context: Context) -> csi_pb2.GetPluginCapabilitiesResponse:
        # No VOLUME_ACCESSIBILITY_CONSTRAINTS: every node reaches every volume over NBD.
        # VolumeExpansion OFFLINE: an NBD connection keeps the size it negotiated, so a
        # volume attached on a node does not see it grow until it is attached again; the
        # CO expands a volume while it is not staged anywhere, and the node grows its file
        # system after the next stage (docs/csi.md).
        caps = [csi_pb2.PluginCapability(volume_expansion=csi_pb2.PluginCapability.
                                         VolumeExpansion(type=Expansion.OFFLINE))]
        if self._serves_controller:
            caps.append(csi_pb2.PluginCapability(
                service=Service(type=Service.CONTROLLER_SERVICE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    @answer
    async def Probe(self, request: csi_pb2.ProbeRequest,
                    context: Context) -> csi_pb2.ProbeResponse:
        # Ready while the controller's admin API answers. An unreachable controller (or a
        # standby) is "not ready", not a failure: restarting the driver would not help.
        try:
            await self._admin.ping(PROBE_TIMEOUT)
        except Unavailable:
            return csi_pb2.ProbeResponse(ready=BoolValue(value=False))
        return csi_pb2.ProbeResponse(ready=BoolValue(value=True))
