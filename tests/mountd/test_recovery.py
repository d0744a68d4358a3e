"""Healing: a killed FUSE daemon, a killed mountd, a cluster that is gone while targets are."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal

import pytest
import trio
from mountd_stack import (  # noqa: F401 - fixtures
    TOKEN,
    another_mountd,
    cluster_fixture,
    eventually,
    exists,
    make_dirs,
    mountd_fixture,
    read_text,
    read_write,
)

from fusecsi.cluster.local import LocalCluster
from fusecsi.mountd import mounts

RECOVERY_DEADLINE = 5.0


def all_serve(targets: dict[str, str], name: str):
    """A check: every target reads its file and takes a new write."""

    def check() -> bool:
        for target, data in targets.items():
            if read_text(os.path.join(target, name)) != data:
                return False
            if not read_write(target, "after-recovery", data):
                return False
        return True

    return check


@contextlib.asynccontextmanager
async def lone_volume(tmp_path, data: str, **flags):
    """Its own cluster (the test may stop it) and mountd, one volume published and written."""
    with LocalCluster(tmp_path / "cluster", workers=1, token=TOKEN) as cluster:
        await make_dirs(cluster, "/lone/v")
        with another_mountd(tmp_path / "node", cluster, **flags) as node:
            target = node.target("pod-1", "v")
            await node.publish("vol-lone", "/lone", "v", target)
            assert read_write(target, "f", data)
            [row] = await node.client.list()
            yield cluster, node, target, row


async def test_killed_daemon_is_replaced_and_every_target_rebound(mountd, cluster):
    await make_dirs(cluster, "/heal/a", "/heal/b")
    targets = {
        mountd.target("pod-1", "a"): "volume a",
        mountd.target("pod-2", "a"): "volume a",
        mountd.target("pod-3", "b"): "volume b",
    }
    for target, data in targets.items():
        await mountd.publish(f"vol-{data[-1]}", "/heal", data[-1], target)
    # a later request with a stale secret binds (the daemon is up) but must not become the
    # token the replacement daemon starts with
    stale = mountd.make_parent(mountd.target("pod-4", "b"))
    await mountd.client.publish(
        "vol-b", cluster.master_addrs, "/heal", "b", "", stale, False, "stale-token"
    )
    targets[stale] = "volume b"
    for target, data in targets.items():
        assert read_write(target, "before", data)
    [row] = await mountd.client.list()
    os.kill(row["pid"], signal.SIGKILL)

    await eventually(all_serve(targets, "before"), deadline=RECOVERY_DEADLINE, what="recovery")
    [row_after] = await mountd.client.list()
    assert row_after["restarts"] == 1 and row_after["state"] == "running"
    assert row_after["pid"] != row["pid"] and mountd.daemon_pids() == [row_after["pid"]]
    daemon_mounts, bound = mountd.fuse_mounts()
    assert daemon_mounts == [row["mountpoint"]] and bound == sorted(targets)
    for target in targets:
        stats = await mountd.client.stats(target)
        assert stats["healthy"], stats
        await mountd.client.unpublish(stats["volume_id"], target)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_hung_daemon_is_replaced_after_repeated_failed_checks(tmp_path, cluster):
    """A stopped (not dead) daemon makes statfs hang: after a few timed-out checks it goes."""
    await make_dirs(cluster, "/hung/v")
    with another_mountd(tmp_path / "node", cluster, **{"probe-timeout": "0.3"}) as node:
        target = node.target("pod-1", "v")
        await node.publish("vol-hung", "/hung", "v", target)
        assert read_write(target, "f", "before the hang")
        [row] = await node.client.list()
        os.kill(row["pid"], signal.SIGSTOP)
        await eventually(
            all_serve({target: "before the hang"}, "f"), deadline=15, what="hung recovery"
        )
        [after] = await node.client.list()
        assert after["restarts"] == 1 and after["pid"] != row["pid"]
        assert node.daemon_pids() == [after["pid"]]  # the stopped one was killed
        await node.client.unpublish("vol-hung", target)
        assert node.daemon_pids() == [] and node.fuse_mounts() == ([], [])


async def test_cluster_outage_keeps_the_daemon_that_resumes_afterwards(tmp_path):
    """Failing checks while the cluster is down must not replace a daemon a new one cannot
    beat: the old one serves again, same process, once the master is back."""
    flags = {"probe-timeout": "0.3"}
    async with lone_volume(tmp_path, "survives the outage", **flags) as (
        cluster,
        node,
        target,
        row,
    ):
        cluster.kill_master()
        await eventually(
            lambda: "cluster unreachable" in node.log(), deadline=15, what="outage seen"
        )
        await trio.to_thread.run_sync(cluster.restart_master)
        await eventually(
            all_serve({target: "survives the outage"}, "f"), deadline=30, what="resume"
        )
        [after] = await node.client.list()
        assert after["pid"] == row["pid"] and after["restarts"] == 0
        await node.client.unpublish("vol-lone", target)


async def test_mountd_restart_adopts_live_daemons_and_recovers_dead_ones(mountd, cluster):
    await make_dirs(cluster, "/restart-live/v", "/restart-dead/v")
    live = {mountd.target("pod-1", "live"): "live data"}
    dead = {mountd.target("pod-2", "dead"): "dead data"}
    await mountd.publish("vol-live", "/restart-live", "v", *live)
    await mountd.publish("vol-dead", "/restart-dead", "v", *dead)
    for target, data in {**live, **dead}.items():
        assert read_write(target, "f", data)
    before = {row["fs_path"]: row for row in await mountd.client.list()}

    mountd.kill()
    # the daemons outlive mountd and keep serving
    assert mountd.daemon_pids() == sorted(row["pid"] for row in before.values())
    assert all_serve({**live, **dead}, "f")()
    os.kill(before["/restart-dead"]["pid"], signal.SIGKILL)

    mountd.start()
    await eventually(all_serve({**live, **dead}, "f"), deadline=RECOVERY_DEADLINE, what="restart")
    after = {row["fs_path"]: row for row in await mountd.client.list()}
    assert after["/restart-live"]["pid"] == before["/restart-live"]["pid"]
    assert after["/restart-live"]["restarts"] == 0
    assert after["/restart-dead"]["pid"] != before["/restart-dead"]["pid"]
    assert after["/restart-dead"]["restarts"] == 1
    assert [r["target"] for r in after["/restart-live"]["refs"]] == list(live)
    assert mountd.daemon_pids() == sorted(row["pid"] for row in after.values())

    assert await mountd.client.unpublish("vol-live", *live) == {"removed": True}
    assert await mountd.client.unpublish("vol-dead", *dead) == {"removed": True}
    assert await mountd.client.list() == []
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_restart_removes_binds_the_table_does_not_know(mountd, cluster):
    """mountd stopped after binding but before persisting: the leftover bind goes at restart."""
    await make_dirs(cluster, "/leftover/v")
    kept, orphan = mountd.target("pod-1", "kept"), mountd.target("pod-2", "orphan")
    await mountd.publish("vol-kept", "/leftover", "v", kept)
    table_before_orphan = (mountd.state_dir / "table.json").read_bytes()
    await mountd.publish("vol-orphan", "/leftover", "v", orphan)
    pids = mountd.daemon_pids()
    assert mountd.kill(signal.SIGTERM) == 0  # a clean stop leaves the daemons serving
    assert mountd.daemon_pids() == pids and not exists(mountd.socket)
    (mountd.state_dir / "table.json").write_bytes(table_before_orphan)
    mountd.start()
    assert mountd.fuse_mounts()[1] == [kept]
    [row] = await mountd.client.list()
    assert [r["target"] for r in row["refs"]] == [kept]
    await mountd.client.unpublish("vol-kept", kept)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_restart_in_the_middle_of_a_recovery_rebinds_targets_left_on_the_dead_mount(
    mountd, cluster
):
    """mountd died after starting a new daemon but before re-binding: the adopted daemon is
    healthy, yet the target still shows the dead connection; it must be re-bound."""
    await make_dirs(cluster, "/midway/v")
    target = mountd.target("pod-1", "v")
    await mountd.publish("vol-midway", "/midway", "v", target)
    assert read_write(target, "f", "kept across the crash")
    [row] = await mountd.client.list()
    mountd.kill()
    os.kill(row["pid"], signal.SIGKILL)
    # what the dead mountd had done so far: a new daemon on the mountpoint, in the table
    mounts.umount(row["mountpoint"], lazy=True)
    daemon = mountd.start_daemon("/midway", row["options"], row["mountpoint"])
    await eventually(
        lambda: mounts.is_fuse_mount(mounts.top_mount(row["mountpoint"])), deadline=15, what="mount"
    )
    table = json.loads((mountd.state_dir / "table.json").read_text())
    table["entries"][0]["pid"] = daemon.pid
    (mountd.state_dir / "table.json").write_text(json.dumps(table))
    with pytest.raises(OSError):
        os.listdir(target)  # still the dead connection

    mountd.start()
    await eventually(all_serve({target: "kept across the crash"}, "f"), deadline=10, what="re-bind")
    [after] = await mountd.client.list()
    assert after["pid"] == daemon.pid  # adopted, not replaced
    await mountd.client.unpublish("vol-midway", target)
    assert daemon.wait(timeout=10) == 0 and mountd.fuse_mounts() == ([], [])


async def test_unpublish_clears_a_broken_target_while_the_cluster_is_down(tmp_path):
    async with lone_volume(tmp_path, "x", **{"ready-timeout": "2"}) as (cluster, node, target, row):
        node.kill()
        cluster.stop()
        os.kill(row["pid"], signal.SIGKILL)
        node.start()

        # the target is a dead mount, never a local directory that silently takes writes
        with pytest.raises(OSError) as info:
            os.listdir(target)
        assert info.value.errno == errno.ENOTCONN
        stats = await node.client.stats(target)
        assert stats["healthy"] is False and stats["message"]

        assert await node.client.unpublish("vol-lone", target) == {"removed": True}
        assert node.fuse_mounts() == ([], [])
        assert not exists(target)
        assert await node.client.list() == []
        assert node.daemon_pids() == []
