"""NodePublishVolume / NodeUnpublishVolume through a real node plugin, mountd, FUSE daemon
and cluster: data flows through kubelet-style targets, calls are idempotent, conflicting
publishes and concurrent calls get the codes the CSI spec names, and the plugin can die
without any mount noticing."""

from __future__ import annotations

import errno
import signal

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from support.node import (  # noqa: F401 - fixtures
    TOKEN,
    Mode,
    Volume,
    cluster_fixture,
    is_mount_point,
    node_fixture,
    pause,
    processes_with,
    publish_request,
    resume,
    unpublish_request,
)

from fusecsi.cluster.client import ClusterClient
from fusecsi.csi import bridge as grpc_bridge


async def outcome(call, method: str, request) -> str:
    """ "OK" or the status name, for calls whose result is one of several."""
    try:
        await call("Node", method, request)
    except GRPCError as exc:
        return exc.status.name
    return "OK"


# what kubelet adds to the volume context with podInfoOnMount: true
POD_INFO = {
    "csi.storage.k8s.io/pod.name": "web-0",
    "csi.storage.k8s.io/pod.namespace": "default",
    "csi.storage.k8s.io/pod.uid": "6a1f0c52-0000-4000-8000-000000000001",
    "csi.storage.k8s.io/serviceAccount.name": "default",
    "csi.storage.k8s.io/ephemeral": "false",
}


async def test_publish_write_unpublish_idempotent(node):
    volume = await node.volume("rw")
    target = node.target()
    request = publish_request(volume, target, context={**volume.context, **POD_INFO})
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        for _ in range(2):
            await call("Node", "NodePublishVolume", request)
        assert is_mount_point(target)
        refs = await node.refs()
        assert [(r["volume_id"], r["target"]) for r in refs] == [(volume.volume_id, target)]
        # the pod reached mountd, which tells it through Events if its mount breaks
        table = await trio.Path(node.state, "table.json").read_text()
        assert POD_INFO["csi.storage.k8s.io/pod.name"] in table

        await trio.Path(target, "hello.txt").write_bytes(b"through the pod's target")
        async with ClusterClient(node.master_addrs, token=TOKEN) as client:
            attr = await client.resolve(f"{volume.path}/hello.txt")
            assert await client.read(attr.ino, 0, 100) == b"through the pod's target"

        for _ in range(2):
            await call("Node", "NodeUnpublishVolume", unpublish_request(volume, target))
        assert not is_mount_point(target)
        assert await node.refs() == []
        # the directory is still there for the next pod
        async with ClusterClient(node.master_addrs, token=TOKEN) as client:
            await client.resolve(f"{volume.path}/hello.txt")
    assert TOKEN not in node.node_log()


async def test_two_targets_share_one_daemon_and_readonly_is_enforced(node):
    volume = await node.volume("shared")
    writer, reader, other_mode = node.target("pv-w"), node.target("pv-r"), node.target("pv-o")
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        await call("Node", "NodePublishVolume", publish_request(volume, writer))
        await call("Node", "NodePublishVolume", publish_request(volume, reader, readonly=True))
        # the reader-only access mode means read-only without the readonly flag
        await call(
            "Node",
            "NodePublishVolume",
            publish_request(volume, other_mode, mode=Mode.MULTI_NODE_READER_ONLY),
        )
        await trio.Path(writer, "data").write_bytes(b"x" * 1000)
        for path in (reader, other_mode):
            assert await trio.Path(path, "data").read_bytes() == b"x" * 1000
            with pytest.raises(OSError) as err:
                await trio.Path(path, "new").write_bytes(b"no")
            assert err.value.errno == errno.EROFS
        daemons = await node.mountd_list()
        assert len(daemons) == 1 and len(daemons[0]["refs"]) == 3
        for path in (writer, reader, other_mode):
            await call("Node", "NodeUnpublishVolume", unpublish_request(volume, path))
        assert await node.mountd_list() == []  # linger 0: the last reference stops the daemon


async def test_conflicting_publish_is_already_exists(node):
    first, second = await node.volume("first"), await node.volume("second")
    target = node.target()
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        await call("Node", "NodePublishVolume", publish_request(first, target))
        conflicts = [
            publish_request(second, target),  # another volume
            publish_request(first, target, readonly=True),  # other options
            publish_request(first, target, flags=["attr-timeout=7"]),  # another daemon
        ]
        for request in conflicts:
            with pytest.raises(GRPCError) as err:
                await call("Node", "NodePublishVolume", request)
            assert err.value.status is Status.ALREADY_EXISTS, err.value.message
        await trio.Path(target, "still").write_bytes(b"served")
        refs = await node.refs()
        assert [(r["volume_id"], r["readonly"]) for r in refs] == [(first.volume_id, False)]


async def test_busy_volume_target_is_aborted(node):
    """While mountd is stopped, the call holding the try-lock cannot finish: a second call
    for the same (volume, target) must be ABORTED at once, whichever of the two came first.
    Unpublish takes the same lock as publish."""
    volume = await node.volume("busy")
    target = node.target()
    publish, unpublish = publish_request(volume, target), unpublish_request(volume, target)
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        for calls in [
            [("NodePublishVolume", publish), ("NodePublishVolume", publish)],
            [("NodeUnpublishVolume", unpublish), ("NodePublishVolume", publish)],
        ]:
            results: list[str] = []
            first_done = trio.Event()

            async def run(method, request, results=results, first_done=first_done) -> None:
                results.append(await outcome(call, method, request))
                first_done.set()

            pause(node.mountd_proc)
            try:
                with trio.fail_after(60):
                    async with trio.open_nursery() as nursery:
                        for method, request in calls:
                            nursery.start_soon(run, method, request)
                        await first_done.wait()
                        assert results == ["ABORTED"]
                        resume(node.mountd_proc)
            finally:
                resume(node.mountd_proc)
            assert results == ["ABORTED", "OK"]


async def test_many_concurrent_identical_calls_leave_one_reference(node):
    volume = await node.volume("crowd")
    target = node.target()
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        for method, request, refs_after in [
            ("NodePublishVolume", publish_request(volume, target), 1),
            ("NodeUnpublishVolume", unpublish_request(volume, target), 0),
        ]:
            results: list[str] = []

            async def one(method=method, request=request, results=results) -> None:
                results.append(await outcome(call, method, request))

            async with trio.open_nursery() as nursery:
                for _ in range(12):
                    nursery.start_soon(one)
            assert set(results) <= {"OK", "ABORTED"} and "OK" in results, results
            assert len(await node.refs()) == refs_after
            assert is_mount_point(target) is bool(refs_after)


async def test_static_pv_from_volume_context_alone(node):
    """A pre-created directory, a volume handle that is not a fusecsi id, no CreateVolume."""
    async with ClusterClient(node.master_addrs, token=TOKEN) as client:
        directory = await client.mkdirs("/datasets/imagenet")
        attr = await client.create(directory.ino, b"README", 0o644, 0, 0)
        await client.write(attr.ino, 0, b"static data")
        await client.commit(attr.ino, len(b"static data"))
    context = {"master-addrs": node.master_addrs, "fs-path": "/datasets", "subpath": "imagenet"}
    volume = Volume("static-handle-imagenet", context, "/datasets/imagenet")
    target = node.target("static-pv")
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        await call("Node", "NodePublishVolume", publish_request(volume, target))
        assert await trio.Path(target, "README").read_bytes() == b"static data"
        await call("Node", "NodeUnpublishVolume", unpublish_request(volume, target))
    assert not is_mount_point(target)


async def test_source_decoded_from_volume_id_when_context_lacks_it(node):
    volume = await node.volume("from-id")
    target = node.target()
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        await call("Node", "NodePublishVolume", publish_request(volume, target, context={}))
        await trio.Path(target, "f").write_bytes(b"ok")
        await call("Node", "NodeUnpublishVolume", unpublish_request(volume, target))


async def test_publish_needs_the_cluster_token(node):
    volume = await node.volume("guarded")
    target = node.target()
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        for token in (None, "wrong-token"):
            status = await outcome(
                call, "NodePublishVolume", publish_request(volume, target, token=token)
            )
            assert status == "INTERNAL"  # the daemon cannot mount (EIO from mountd)
        assert not is_mount_point(target) and await node.refs() == []
        await call("Node", "NodePublishVolume", publish_request(volume, target))
    # neither the log nor any process's arguments carry the token
    assert TOKEN not in node.node_log()
    assert processes_with(TOKEN) == []


async def test_killed_plugin_leaves_mounts_working_and_a_new_one_unpublishes(node):
    volume = await node.volume("survivor")
    target = node.target()
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        await call("Node", "NodePublishVolume", publish_request(volume, target))
    await trio.Path(target, "before").write_bytes(b"1")
    node.node_proc.send_signal(signal.SIGKILL)
    node.node_proc.wait()
    await trio.Path(target, "after").write_bytes(b"2")
    assert sorted(p.name for p in await trio.Path(target).iterdir()) == ["after", "before"]
    assert len(await node.refs()) == 1

    # a graceful stop (an upgrade) leaves the mount alone as well
    node.start_node().send_signal(signal.SIGTERM)
    assert node.node_proc.wait() == 0
    assert await trio.Path(target, "before").read_bytes() == b"1"

    node.start_node()
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        await call("Node", "NodeUnpublishVolume", unpublish_request(volume, target))
    assert not is_mount_point(target)
    assert await node.refs() == []


async def test_single_node_single_writer_refuses_a_second_target(node):
    """csi-sanity: a SINGLE_NODE_SINGLE_WRITER volume already published at one target is
    FAILED_PRECONDITION at another; the same target again is still idempotent."""
    volume = await node.volume("snsw")
    first, second = node.target("pv-a"), node.target("pv-b")
    mode = Mode.SINGLE_NODE_SINGLE_WRITER
    async with grpc_bridge.connect(str(node.csi_socket)) as call:
        await call("Node", "NodePublishVolume", publish_request(volume, first, mode=mode))
        await call("Node", "NodePublishVolume", publish_request(volume, first, mode=mode))
        with pytest.raises(GRPCError) as err:
            await call("Node", "NodePublishVolume", publish_request(volume, second, mode=mode))
        assert err.value.status is Status.FAILED_PRECONDITION
        assert first in err.value.message
        assert not is_mount_point(second)
        # a multi-writer mode may share the volume between targets
        multi = Mode.SINGLE_NODE_MULTI_WRITER
        await call("Node", "NodePublishVolume", publish_request(volume, second, mode=multi))
        for target in (first, second):
            await call("Node", "NodeUnpublishVolume", unpublish_request(volume, target))
