"""The CSI Node service's answers to kubelet: validation and error codes, capabilities, info,
Probe, and mountd being away. Real `fusecsi node` + `fusecsi mountd` processes and a real
cluster; requests go through the CSI socket as kubelet's would."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from support.node import (  # noqa: F401 - fixtures
    TOKEN,
    Mode,
    cluster_fixture,
    node_fixture,
    pause,
    publish_request,
    resume,
    unpublish_request,
)

from fusecsi.cluster.local import free_port
from fusecsi.csi import bridge as grpc_bridge
from fusecsi.csi.generated import csi_pb2 as pb

Cap = pb.VolumeCapability
SHAPE = "is not pods/<pod uid>/volumes/kubernetes.io~csi/<pv name>/mount"
Rpc = pb.NodeServiceCapability.RPC


async def expect(call, method: str, request, status: Status, fragment: str = "") -> str:
    with pytest.raises(GRPCError) as err:
        await call("Node", method, request)
    got = err.value
    assert got.status is status, f"{method}: {got.status.name} {got.message!r}"
    assert fragment in (got.message or ""), f"{method}: {got.message!r} lacks {fragment!r}"
    return got.message or ""


async def test_capabilities_info_and_unoffered_rpcs(node):
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        caps = await call("Node", "NodeGetCapabilities", pb.NodeGetCapabilitiesRequest())
        assert {c.rpc.type for c in caps.capabilities} == {
            Rpc.GET_VOLUME_STATS,
            Rpc.VOLUME_CONDITION,
            Rpc.SINGLE_NODE_MULTI_WRITER,
        }
        info = await call("Node", "NodeGetInfo", pb.NodeGetInfoRequest())
        assert (info.node_id, info.max_volumes_per_node) == ("node-a", 0)
        assert not info.HasField("accessible_topology")
        # one shared FUSE daemon per key replaces staging; quotas need no node expansion
        for method, request in [
            ("NodeStageVolume", pb.NodeStageVolumeRequest(volume_id="v")),
            ("NodeUnstageVolume", pb.NodeUnstageVolumeRequest(volume_id="v")),
            ("NodeExpandVolume", pb.NodeExpandVolumeRequest(volume_id="v")),
        ]:
            await expect(call, method, request, Status.UNIMPLEMENTED, method)


async def test_publish_validation(node):
    volume = await node.volume("validated")
    target = node.target()
    good = publish_request(volume, target)

    def variant(**changes) -> pb.NodePublishVolumeRequest:
        request = pb.NodePublishVolumeRequest()
        request.CopyFrom(good)
        for name, value in changes.items():
            if value is None:
                request.ClearField(name)
            elif name == "volume_context":
                request.volume_context.clear()
                request.volume_context.update(value)
            elif name == "volume_capability":
                request.volume_capability.CopyFrom(value)
            else:
                setattr(request, name, value)
        return request

    def capability(**kwargs) -> Cap:
        kwargs.setdefault("access_mode", Cap.AccessMode(mode=Mode.SINGLE_NODE_WRITER))
        return Cap(**kwargs)

    no_source = {"fs-path": "/kube"}
    cases = [
        (variant(volume_id=""), Status.INVALID_ARGUMENT, "volume_id missing"),
        (variant(target_path=""), Status.INVALID_ARGUMENT, "target_path missing"),
        (variant(volume_capability=None), Status.INVALID_ARGUMENT, "volume_capability missing"),
        (
            variant(volume_capability=capability(block=Cap.BlockVolume())),
            Status.INVALID_ARGUMENT,
            "block",
        ),
        (
            variant(volume_capability=capability(mount=Cap.MountVolume(), access_mode=None)),
            Status.INVALID_ARGUMENT,
            "access_mode missing",
        ),
        (
            variant(volume_capability=capability(access_mode=Cap.AccessMode(mode=99))),
            Status.INVALID_ARGUMENT,
            "access mode 99",
        ),
        (
            variant(volume_capability=Cap(access_mode=Cap.AccessMode(mode=1))),
            Status.INVALID_ARGUMENT,
            "access_type",
        ),
        (
            variant(volume_capability=capability(mount=Cap.MountVolume(mount_flags=["noexec"]))),
            Status.INVALID_ARGUMENT,
            "'noexec'",
        ),
        (
            variant(volume_capability=capability(mount=Cap.MountVolume(mount_flags=["bogus=1"]))),
            Status.INVALID_ARGUMENT,
            "bogus",
        ),
        # the context lacks the source and the id is not one of ours: name what is missing
        (
            variant(volume_id="pv-static", volume_context=no_source),
            Status.INVALID_ARGUMENT,
            "master-addrs, subpath",
        ),
        (
            variant(volume_context={**volume.context, "master-addrs": "not an address"}),
            Status.INVALID_ARGUMENT,
            "",
        ),
        (
            variant(volume_context={**volume.context, "subpath": "../escape"}),
            Status.INVALID_ARGUMENT,
            "",
        ),
        (
            variant(volume_context={**volume.context, "options": "attr-timeout=nope"}),
            Status.INVALID_ARGUMENT,
            "attr-timeout",
        ),
        # mountd refuses targets outside the kubelet dir (EPERM)
        (variant(target_path=str(node.root / "elsewhere")), Status.INVALID_ARGUMENT, ""),
        # kubelet's CSI target shape only: a bind above it would hide other pods' volumes
        (variant(target_path=str(node.kubelet / "pods")), Status.INVALID_ARGUMENT, SHAPE),
        (
            variant(target_path=str(Path(target).parents[3])),  # <kubelet>/pods/<uid>
            Status.INVALID_ARGUMENT,
            SHAPE,
        ),
        (
            variant(target_path=str(Path(target).parent / "other")),
            Status.INVALID_ARGUMENT,
            SHAPE,
        ),
        (
            variant(target_path=str(node.kubelet / "pods" / ("x" * 10_000) / "mount")),
            Status.INVALID_ARGUMENT,
            "path of 10",
        ),
        # volume ids are bounded and checked even when the context names the source
        (variant(volume_id="v" * 10_000), Status.INVALID_ARGUMENT, "volume_id is 10000 bytes"),
        (variant(volume_id="vol\0x"), Status.INVALID_ARGUMENT, "NUL or control characters"),
        (variant(volume_id="a/../b"), Status.INVALID_ARGUMENT, "contains a '..' segment"),
        # the directory does not exist in the cluster
        (
            variant(volume_context={**volume.context, "subpath": "never-created"}),
            Status.NOT_FOUND,
            "",
        ),
    ]
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        for request, status, fragment in cases:
            await expect(call, "NodePublishVolume", request, status, fragment)
        assert await node.refs() == []  # nothing half-published
        await call("Node", "NodePublishVolume", good)  # and the good request still works
        await call("Node", "NodeUnpublishVolume", unpublish_request(volume, target))
    assert TOKEN not in node.node_log()


async def test_unpublish_and_stats_validation(node):
    volume = await node.volume("stats-validated")
    target = node.target()
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        for request, fragment in [
            (pb.NodeUnpublishVolumeRequest(target_path=target), "volume_id missing"),
            (pb.NodeUnpublishVolumeRequest(volume_id=volume.volume_id), "target_path missing"),
        ]:
            await expect(call, "NodeUnpublishVolume", request, Status.INVALID_ARGUMENT, fragment)
        for request, fragment in [
            (pb.NodeGetVolumeStatsRequest(volume_path=target), "volume_id missing"),
            (pb.NodeGetVolumeStatsRequest(volume_id=volume.volume_id), "volume_path missing"),
        ]:
            await expect(call, "NodeGetVolumeStats", request, Status.INVALID_ARGUMENT, fragment)
        # a path that is not published, and a published path asked about under another id
        stats = pb.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=target)
        await expect(call, "NodeGetVolumeStats", stats, Status.NOT_FOUND)
        await call("Node", "NodePublishVolume", publish_request(volume, target))
        other = pb.NodeGetVolumeStatsRequest(volume_id="other-volume", volume_path=target)
        await expect(call, "NodeGetVolumeStats", other, Status.NOT_FOUND, "other-volume")
        await call("Node", "NodeGetVolumeStats", stats)


async def test_mountd_away_is_unavailable_and_not_ready(node):
    volume = await node.volume("away")
    target = node.target()
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        probe = await call("Identity", "Probe", pb.ProbeRequest())
        assert probe.ready.value is True
        pause(node.mountd_proc)  # a wedged mountd accepts connections but never answers
        try:
            probe = await call("Identity", "Probe", pb.ProbeRequest())
        finally:
            resume(node.mountd_proc)
        assert probe.ready.value is False
        node.mountd_proc.kill()
        node.mountd_proc.wait()
        probe = await call("Identity", "Probe", pb.ProbeRequest())
        assert probe.ready.value is False
        for method, request in [
            ("NodePublishVolume", publish_request(volume, target)),
            ("NodeUnpublishVolume", unpublish_request(volume, target)),
            (
                "NodeGetVolumeStats",
                pb.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=target),
            ),
        ]:
            await expect(call, method, request, Status.UNAVAILABLE, "mountd")
        node.start_mountd()
        probe = await call("Identity", "Probe", pb.ProbeRequest())
        assert probe.ready.value is True
        await call("Node", "NodePublishVolume", publish_request(volume, target))


async def test_metrics_histogram_counts_calls(node):
    node.node_proc.kill()
    node.node_proc.wait()
    port = free_port()
    node.start_node("--metrics-address", f"127.0.0.1:{port}")
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        await call("Node", "NodeGetInfo", pb.NodeGetInfoRequest())
        await expect(
            call, "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(), Status.INVALID_ARGUMENT
        )

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    counts = [
        line
        for line in (await trio.to_thread.run_sync(scrape)).splitlines()
        if line.startswith("fusecsi_csi_calls_total{") and line.endswith(" 1.0")
    ]
    for method, code in [("NodeGetInfo", "OK"), ("NodeUnpublishVolume", "INVALID_ARGUMENT")]:
        assert any(f'method="{method}"' in c and f'code="{code}"' in c for c in counts), counts


async def _not_fusecsi(listener) -> None:
    """A peer that answers every connection like an HTTP server."""
    while True:
        conn, _ = await listener.accept()
        with conn:
            await conn.recv(100)
            await conn.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


async def test_unreachable_master_is_unavailable_with_the_address_and_why(node):
    volume = await node.volume("unreached")
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    http = f"127.0.0.1:{listener.getsockname()[1]}"
    refused = f"127.0.0.1:{free_port()}"
    cases = [
        (refused, f"cannot connect to {refused}: connection refused"),
        ("no-such-host.invalid:8995", "cannot connect to no-such-host.invalid:8995: no such host"),
        (http, f"{http} is not a fusecsi server"),
    ]
    async with trio.open_nursery() as nursery, grpc_bridge.connect(str(node.csi_socket)) as call:
        nursery.start_soon(_not_fusecsi, listener)
        for address, why in cases:
            context = {**volume.context, "master-addrs": address}
            message = await expect(
                call,
                "NodePublishVolume",
                publish_request(volume, node.target(), context=context),
                Status.UNAVAILABLE,
                why,
            )
            assert f"cluster {address} unreachable" in message
        nursery.cancel_scope.cancel()
    assert await node.refs() == []
