"""NodeGetVolumeStats through a real node plugin, mountd, FUSE daemon and cluster: the
directory quota's usage after writing through the pod's target, and a VolumeCondition that
is abnormal while the volume's FUSE daemon is dead and normal once mountd has recovered it.

The cluster master is down while the daemon is dead, so mountd's recovery cannot succeed
before the test has seen the abnormal condition (a short io-timeout makes each failed
restart quick); the master's return lets the next retry recover the mount."""

from __future__ import annotations

import os
import signal

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from support.node import (  # noqa: F401 - fixtures
    cluster_fixture,
    node_fixture,
    publish_request,
    unpublish_request,
)

from fusecsi.csi import bridge as grpc_bridge
from fusecsi.csi.generated import csi_pb2 as pb

MiB = 1 << 20
WAIT = 90  # generous: recovery retries back off while the master is away


async def stats_until(call, request, predicate) -> pb.NodeGetVolumeStatsResponse:
    """Ask until `predicate(reply)` holds (the state changes asynchronously)."""
    with trio.fail_after(WAIT):
        while True:
            reply = await call("Node", "NodeGetVolumeStats", request)
            if predicate(reply):
                return reply
            await trio.sleep(0.05)


def usage(reply, unit) -> pb.VolumeUsage:
    (found,) = [u for u in reply.usage if u.unit == unit]
    return found


async def test_usage_and_condition_across_a_daemon_death(node):
    volume = await node.volume("measured", max_bytes=64 * MiB, max_inodes=1000)
    volume.context["options"] = "io-timeout=2"
    target = node.target()
    request = pb.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=target)
    data = os.urandom(3 * MiB)
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        await call("Node", "NodePublishVolume", publish_request(volume, target))
        await trio.Path(target, "blob").write_bytes(data)
        await trio.Path(target, "sub").mkdir()

        def counted(reply) -> bool:
            return usage(reply, pb.VolumeUsage.BYTES).used >= len(data)

        reply = await stats_until(call, request, counted)
        used = usage(reply, pb.VolumeUsage.BYTES)
        assert (used.total, used.available) == (64 * MiB, 64 * MiB - used.used)
        inodes = usage(reply, pb.VolumeUsage.INODES)
        assert inodes.used >= 2 and inodes.total == 1000
        assert inodes.available == 1000 - inodes.used
        assert not reply.volume_condition.abnormal

        (daemon,) = await node.mountd_list()
        node.cluster.kill_master()
        try:
            os.kill(daemon["pid"], signal.SIGKILL)
            reply = await stats_until(call, request, lambda r: r.volume_condition.abnormal)
            assert reply.volume_condition.message
            # still abnormal: no daemon can start while the cluster is away
            reply = await call("Node", "NodeGetVolumeStats", request)
            assert reply.volume_condition.abnormal, reply
        finally:
            node.cluster.restart_master()

        reply = await stats_until(call, request, lambda r: not r.volume_condition.abnormal)
        assert usage(reply, pb.VolumeUsage.BYTES).used >= len(data)
        (recovered,) = await node.mountd_list()
        assert recovered["pid"] != daemon["pid"] and recovered["restarts"] >= 1
        # the pod's target was re-bound in place: the data is there again
        assert await trio.Path(target, "blob").read_bytes() == data

        await call("Node", "NodeUnpublishVolume", unpublish_request(volume, target))
        try:
            await call("Node", "NodeGetVolumeStats", request)
        except GRPCError as exc:
            assert exc.status is Status.NOT_FOUND
        else:
            raise AssertionError("stats of an unpublished path must be NOT_FOUND")


async def test_stats_of_paths_never_published_are_not_found(node):
    """csi-sanity: a relative path, a path outside the kubelet dir and an unknown volume
    on a path that is not published are all NOT_FOUND."""
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        for volume_id, path in [
            ("vol-x", "some/path"),
            ("vol-x", "/etc"),
            ("vol-x", node.target("never-published")),
        ]:
            request = pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path)
            with pytest.raises(GRPCError) as err:
                await call("Node", "NodeGetVolumeStats", request)
            assert err.value.status is Status.NOT_FOUND, (path, err.value.message)


async def test_inode_and_byte_totals_come_from_the_cluster_without_a_quota_limit(node):
    """#22: a volume whose quota limits bytes only (what CreateVolume makes) reported inodes
    0 / free 0 / used 2 to kubelet; totals are the cluster's (statfs through the target),
    and what is available never exceeds what the cluster has free."""
    bytes_only = await node.volume("bytes-only", max_bytes=64 * MiB)
    no_quota = await node.volume("no-quota")
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        for volume in (bytes_only, no_quota):
            target = node.target(volume.context["subpath"])
            await call("Node", "NodePublishVolume", publish_request(volume, target))
            await trio.Path(target, "a").write_text("x")
            request = pb.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=target)
            reply = await call("Node", "NodeGetVolumeStats", request)
            fs = await trio.to_thread.run_sync(os.statvfs, target)
            inodes = usage(reply, pb.VolumeUsage.INODES)
            assert inodes.total == fs.f_files > 0, (volume.context, reply)
            assert inodes.used >= 1 and 0 < inodes.available <= fs.f_favail
            size = usage(reply, pb.VolumeUsage.BYTES)
            if volume is bytes_only:
                assert inodes.available == fs.f_favail and inodes.used < 100
                # df in the pod agrees: the quota's size, and what it leaves (whole frsize)
                assert size.total == 64 * MiB == fs.f_blocks * fs.f_frsize
                assert 0 <= size.available - fs.f_bavail * fs.f_frsize < fs.f_frsize
                assert 0 <= 64 * MiB - size.used - size.available < fs.f_frsize
            else:  # no quota at all: the cluster's figures, as df shows them
                assert size.total == fs.f_blocks * fs.f_frsize and size.used > 0
                assert inodes.used + inodes.available == inodes.total
            assert not reply.volume_condition.abnormal
            await call("Node", "NodeUnpublishVolume", unpublish_request(volume, target))
