"""Which volume capabilities fusecsi serves: the one check CreateVolume,
ValidateVolumeCapabilities and NodePublishVolume all make, so a node never accepts what the
controller would refuse."""

from __future__ import annotations

from fusecsi.csi.generated import csi_pb2 as pb

_Mode = pb.VolumeCapability.AccessMode.Mode

SUPPORTED_MODES = frozenset(
    {
        _Mode.SINGLE_NODE_WRITER,
        _Mode.SINGLE_NODE_READER_ONLY,
        _Mode.SINGLE_NODE_SINGLE_WRITER,
        _Mode.SINGLE_NODE_MULTI_WRITER,
        _Mode.MULTI_NODE_READER_ONLY,
        _Mode.MULTI_NODE_SINGLE_WRITER,
        _Mode.MULTI_NODE_MULTI_WRITER,
    }
)


def capability_problem(cap: pb.VolumeCapability) -> str | None:
    """Why a capability cannot be served, or None."""
    if cap.HasField("block"):
        return "block access is not supported (fusecsi volumes are filesystems)"
    if not cap.HasField("mount"):
        return "volume capability has no access_type (mount)"
    mode = cap.access_mode.mode
    if mode not in SUPPORTED_MODES:
        name = _Mode.Name(mode) if mode in _Mode.values() else str(mode)
        return f"access mode {name} is not supported"
    return None
