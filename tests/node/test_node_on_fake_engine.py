"""The node service and mountd on a fake engine (tests/support/fake_engine.py): no cluster, real mountd.

mountd's Supervisor and its control API run in the test's trio loop on a real unix socket, the
NodeService is called directly, the fake's daemons are real processes with real bind mounts.
What these tests check is the node side's own logic, table-driven: request checks, the
engine and secrets reaching mountd, the single-writer rule under concurrency, stats through
the engine, recovery of a killed daemon.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from support.fake_engine import FAKE, TOKEN, fake_cluster, fake_target, resolve, supervisor_on_fake

from fusecsi import unix_socket
from fusecsi.csi.generated import csi_pb2 as pb
from fusecsi.csi.node.service import NodeService
from fusecsi.mountd import api, mounts
from fusecsi.mountd.client import MountdClient
from fusecsi.mountd.supervisor import Supervisor

Mode = pb.VolumeCapability.AccessMode


class FakeNodeStack:
    def __init__(self, root: Path, sup: Supervisor, service: NodeService, cluster: Path):
        self.root, self.sup, self.service, self.cluster = root, sup, service, cluster

    def context(self, subpath: str = "v1", **changes: str) -> dict[str, str]:
        base = {"engine": "fake", "root": str(self.cluster), "fs-path": "/base"}
        return {k: v for k, v in {**base, "subpath": subpath, **changes}.items() if v}

    def target(self) -> str:
        return fake_target(self.sup)

    def request(
        self,
        target: str,
        *,
        volume_id: str = "fake-v1",
        context: dict | None = None,
        mode=Mode.SINGLE_NODE_WRITER,
        flags=(),
        token: str = TOKEN,
    ) -> pb.NodePublishVolumeRequest:
        return pb.NodePublishVolumeRequest(
            volume_id=volume_id,
            target_path=target,
            volume_capability=pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(mount_flags=list(flags)),
                access_mode=Mode(mode=mode),
            ),
            volume_context=self.context() if context is None else context,
            secrets={"token": token} if token else {},
        )

    async def publish(self, target: str, **kwargs) -> None:
        await self.service.NodePublishVolume(self.request(target, **kwargs))

    async def unpublish(self, target: str, volume_id: str = "fake-v1") -> None:
        await self.service.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)
        )


@pytest.fixture(name="fake")
async def fake_fixture(tmp_path):
    socket = str(tmp_path / "mountd.sock")
    service = NodeService("node-a", MountdClient(socket), engines=resolve)
    with fake_cluster(tmp_path) as cluster:
        async with supervisor_on_fake(tmp_path) as sup, trio.open_nursery() as nursery:
            await nursery.start(api.server(sup).serve, unix_socket.bind(socket))
            yield FakeNodeStack(tmp_path, sup, service, cluster)
            nursery.cancel_scope.cancel()


async def grpc_status(call) -> tuple[Status, str]:
    with pytest.raises(GRPCError) as info:
        await call
    return info.value.status, info.value.message or ""


REFUSALS = [
    # (what, request changes, status, fragment of the message)
    ("unknown engine", {"context": {"engine": "nope"}}, Status.INVALID_ARGUMENT, "'nope'"),
    ("no cluster", {"context": {"root": ""}}, Status.INVALID_ARGUMENT, "lacks root"),
    ("bad cluster", {"context": {"root": "rel"}}, Status.INVALID_ARGUMENT, "absolute path"),
    (
        "option off the engine's allow-list",
        {"flags": ["colour=red"]},
        Status.INVALID_ARGUMENT,
        "unknown mount option 'colour'",
    ),
    ("wrong secret", {"token": "wrong-secret"}, Status.INTERNAL, "authentication failed"),
    ("no secret", {"token": ""}, Status.INTERNAL, "authentication failed"),
    ("missing volume dir", {"context": {"subpath": "gone"}}, Status.NOT_FOUND, "'gone'"),
    ("escaping subpath", {"context": {"subpath": "../v1"}}, Status.INVALID_ARGUMENT, "subpath"),
]


@pytest.mark.parametrize(("what", "changes", "status", "fragment"), REFUSALS)
async def test_refusals_name_the_problem_and_leave_nothing(fake, what, changes, status, fragment):
    target = fake.target()
    if "context" in changes:
        changes = {**changes, "context": fake.context(**changes["context"])}
    got, message = await grpc_status(
        fake.service.NodePublishVolume(fake.request(target, **changes))
    )
    assert (got, fragment in message) == (status, True), (what, got, message)
    assert "\n" not in message and "wrong-secret" not in message
    assert await fake.service.mountd.list() == []
    assert mounts.top_mount(target) is None


PUBLISHES = [
    # (what, flags, mode, writable)
    ("read-write", (), Mode.SINGLE_NODE_WRITER, True),
    ("ro flag", ("ro",), Mode.SINGLE_NODE_WRITER, False),
    ("read-only mode", (), Mode.MULTI_NODE_READER_ONLY, False),
    ("an allowed option", ("flavour=mint",), Mode.SINGLE_NODE_MULTI_WRITER, True),
]


@pytest.mark.parametrize(("what", "flags", "mode", "writable"), PUBLISHES)
async def test_publish_binds_the_volume_through_the_engine(fake, what, flags, mode, writable):
    target = fake.target()
    await fake.publish(target, flags=flags, mode=mode)
    [row] = await fake.service.mountd.list()
    assert row["engine"] == "fake" and row["cluster"] == str(fake.cluster), what
    assert mounts.top_mount(target).fstype == FAKE.fstype
    if writable:
        write(os.path.join(target, "f"), what)
        assert read(fake.cluster / "base" / "v1" / "f") == what.encode()
    else:
        with pytest.raises(OSError) as info:
            write(os.path.join(target, "f"), what)
        assert info.value.errno == errno.EROFS
    # the secret reached the daemon as a 0600 file, never as an argument or in the table
    assert TOKEN not in " ".join(os.fsdecode(a) for a in _cmdline(row["pid"]))
    assert TOKEN.encode() not in read(fake.sup.table.path)
    stats = await fake.service.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="fake-v1", volume_path=target)
    )
    assert not stats.volume_condition.abnormal
    used = {u.unit: u.used for u in stats.usage}
    assert used[pb.VolumeUsage.BYTES] == (len(what) if writable else 0)
    await fake.unpublish(target)
    assert mounts.top_mount(target) is None and await fake.service.mountd.list() == []


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


async def test_single_writer_refuses_a_second_target_and_the_same_one_is_idempotent(fake):
    first, second = fake.target(), fake.target()
    snsw = Mode.SINGLE_NODE_SINGLE_WRITER
    await fake.publish(first, mode=snsw)
    await fake.publish(first, mode=snsw)
    got, message = await grpc_status(
        fake.service.NodePublishVolume(fake.request(second, mode=snsw))
    )
    assert got is Status.FAILED_PRECONDITION and f"already published at {first}" in message
    # another volume of the same key is not held back
    await fake.publish(second, mode=snsw, volume_id="fake-v2", context=fake.context("v2"))
    await fake.unpublish(first)
    await fake.unpublish(second, volume_id="fake-v2")


async def test_two_concurrent_single_writer_publishes_of_one_volume_one_wins(fake):
    """The race the node plugin's list-then-publish could not close: mountd decides under
    the volume's lock, so exactly one target gets the volume."""
    targets = [fake.target() for _ in range(4)]
    outcomes: dict[str, str] = {}

    async def publish(target: str) -> None:
        try:
            await fake.publish(target, mode=Mode.SINGLE_NODE_SINGLE_WRITER)
            outcomes[target] = "ok"
        except GRPCError as exc:
            outcomes[target] = exc.status.name

    async with trio.open_nursery() as nursery:
        for target in targets:
            nursery.start_soon(publish, target)
    assert sorted(outcomes.values()) == ["FAILED_PRECONDITION"] * 3 + ["ok"], outcomes
    [winner] = [t for t, outcome in outcomes.items() if outcome == "ok"]
    [row] = await fake.service.mountd.list()
    assert [ref["target"] for ref in row["refs"]] == [winner]
    assert [t for t in targets if mounts.top_mount(t) is not None] == [winner]


async def test_a_killed_daemon_is_replaced_and_the_target_keeps_serving(fake):
    target = fake.target()
    await fake.publish(target)
    [row] = await fake.service.mountd.list()
    os.kill(row["pid"], signal.SIGKILL)
    with trio.fail_after(20):
        while True:
            [now] = await fake.service.mountd.list()
            if now["pid"] not in (None, row["pid"]) and now["state"] == "running":
                break
            await trio.sleep(0.1)
    assert now["restarts"] == 1
    write(os.path.join(target, "after"), "still here")
    assert read(fake.cluster / "base" / "v1" / "after") == b"still here"
    await fake.unpublish(target)
