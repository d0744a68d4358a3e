"""CSI Identity service: who we are, what we can do, whether we are ready."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fusecsi import DRIVER_NAME, __version__
from fusecsi.csi.generated import csi_pb2 as pb

Readiness = Callable[[], Awaitable[bool]]

_Service = pb.PluginCapability.Service
_Expansion = pb.PluginCapability.VolumeExpansion


async def _always_ready() -> bool:
    return True


class IdentityService:
    def __init__(self, *, controller: bool, ready: Readiness = _always_ready) -> None:
        self.controller = controller
        self.ready = ready

    async def GetPluginInfo(self, request: pb.GetPluginInfoRequest) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    async def GetPluginCapabilities(
        self, request: pb.GetPluginCapabilitiesRequest
    ) -> pb.GetPluginCapabilitiesResponse:
        capabilities = []
        if self.controller:
            capabilities = [
                pb.PluginCapability(service=_Service(type=_Service.CONTROLLER_SERVICE)),
                pb.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)),
            ]
        return pb.GetPluginCapabilitiesResponse(capabilities=capabilities)

    async def Probe(self, request: pb.ProbeRequest) -> pb.ProbeResponse:
        response = pb.ProbeResponse()
        response.ready.value = await self.ready()
        return response
