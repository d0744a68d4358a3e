"""The committed CSI stubs match proto/csi.proto, and the wire facts clients rely on hold."""

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor
from grpclib.const import Cardinality

from fusecsi.csi.generated import csi_grpc, csi_pb2

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_grpc.py")


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_stubs.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "fusecsi/csi/generated" / name).read_bytes()
        != (REPO / "fusecsi/csi/generated" / name).read_bytes()
    ]
    assert not stale, (
        f"fusecsi/csi/generated/{', '.join(stale)} out of date: run `make stubs` and commit"
    )


def message(name: str):
    return csi_pb2.DESCRIPTOR.message_types_by_name[name]


def numbers(name: str) -> dict[str, int]:
    return {f.name: f.number for f in message(name).fields}


def routes(base) -> dict:
    """grpclib's path -> handler table of a generated servicer base."""
    concrete = type("Concrete", (base,), dict.fromkeys(base.__abstractmethods__))
    return concrete().__mapping__()


def test_package_and_service_paths():
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    services = csi_pb2.DESCRIPTOR.services_by_name
    assert set(services) == {
        "Identity",
        "Controller",
        "GroupController",
        "SnapshotMetadata",
        "Node",
    }
    # kubelet and the sidecars call exactly these paths.
    assert set(routes(csi_grpc.IdentityBase)) == {
        "/csi.v1.Identity/GetPluginInfo",
        "/csi.v1.Identity/GetPluginCapabilities",
        "/csi.v1.Identity/Probe",
    }
    assert set(routes(csi_grpc.NodeBase)) == {
        f"/csi.v1.Node/Node{name}"
        for name in (
            "StageVolume",
            "UnstageVolume",
            "PublishVolume",
            "UnpublishVolume",
            "GetVolumeStats",
            "ExpandVolume",
            "GetCapabilities",
            "GetInfo",
        )
    }
    assert len(routes(csi_grpc.ControllerBase)) == 15
    assert len(routes(csi_grpc.GroupControllerBase)) == 4
    allocated = routes(csi_grpc.SnapshotMetadataBase)[
        "/csi.v1.SnapshotMetadata/GetMetadataAllocated"
    ]
    assert allocated.cardinality is Cardinality.UNARY_STREAM


def test_node_publish_field_numbers():
    assert numbers("NodePublishVolumeRequest") == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "target_path": 4,
        "volume_capability": 5,
        "readonly": 6,
        "secrets": 7,
        "volume_context": 8,
    }
    assert numbers("NodeStageVolumeRequest") == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "volume_capability": 4,
        "secrets": 5,
        "volume_context": 6,
    }
    assert numbers("CreateVolumeRequest") == {
        "name": 1,
        "capacity_range": 2,
        "volume_capabilities": 3,
        "parameters": 4,
        "secrets": 5,
        "volume_content_source": 6,
        "accessibility_requirements": 7,
        "mutable_parameters": 8,
    }
    assert numbers("Volume") == {
        "capacity_bytes": 1,
        "volume_id": 2,
        "volume_context": 3,
        "content_source": 4,
        "accessible_topology": 5,
    }


def test_wire_encoding_of_target_path():
    # Field 4, wire type 2 (length-delimited) -> tag byte 0x22.
    encoded = csi_pb2.NodePublishVolumeRequest(target_path="/t").SerializeToString()
    assert encoded == b"\x22\x02/t"


def enum_values(enum) -> dict[str, int]:
    return {v.name: v.number for v in enum.values}


def test_enum_values():
    mode = message("VolumeCapability").nested_types_by_name["AccessMode"]
    assert enum_values(mode.enum_types_by_name["Mode"]) == {
        "UNKNOWN": 0,
        "SINGLE_NODE_WRITER": 1,
        "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3,
        "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5,
        "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    }
    plugin = csi_pb2.PluginCapability.Service
    assert plugin.CONTROLLER_SERVICE == 1
    assert plugin.VOLUME_ACCESSIBILITY_CONSTRAINTS == 2
    assert plugin.GROUP_CONTROLLER_SERVICE == 3
    rpc = csi_pb2.ControllerServiceCapability.RPC
    assert (rpc.CREATE_DELETE_VOLUME, rpc.EXPAND_VOLUME, rpc.MODIFY_VOLUME) == (1, 9, 14)
    node = csi_pb2.NodeServiceCapability.RPC
    assert (node.STAGE_UNSTAGE_VOLUME, node.GET_VOLUME_STATS, node.EXPAND_VOLUME) == (1, 2, 3)
    assert node.VOLUME_MOUNT_GROUP == 6
    assert enum_values(csi_pb2.VolumeUsage.Unit.DESCRIPTOR) == {
        "UNKNOWN": 0,
        "BYTES": 1,
        "INODES": 2,
    }


def test_oneofs_and_wrappers():
    capability = message("VolumeCapability")
    access_type = capability.oneofs_by_name["access_type"]
    assert [(f.name, f.number) for f in access_type.fields] == [("block", 1), ("mount", 2)]
    assert capability.fields_by_name["access_mode"].number == 3
    ready = message("ProbeResponse").fields_by_name["ready"]
    assert ready.message_type.full_name == "google.protobuf.BoolValue"


def test_extension_numbers():
    assert csi_pb2.csi_secret.number == 1059
    for ext in ("alpha_field", "alpha_enum", "alpha_enum_value", "alpha_message", "alpha_method"):
        assert getattr(csi_pb2, ext).number == 1060
    assert csi_pb2.alpha_service.number == 1060


@pytest.mark.parametrize(
    "msg",
    [
        "CreateVolumeRequest",
        "DeleteVolumeRequest",
        "ControllerPublishVolumeRequest",
        "NodeStageVolumeRequest",
        "NodePublishVolumeRequest",
        "NodeExpandVolumeRequest",
        "CreateSnapshotRequest",
    ],
)
def test_secrets_are_marked(msg):
    # CSI-aware tools (sidecars, csi-sanity, proxies) keep these fields out of logs.
    field = message(msg).fields_by_name["secrets"]
    assert field.type == FieldDescriptor.TYPE_MESSAGE  # map entry
    assert field.GetOptions().Extensions[csi_pb2.csi_secret] is True
