"""Healing: a killed FUSE daemon, a killed mountd, a cluster that is gone while targets are."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
from functools import partial

import pytest
import trio
from support.mountd import (  # noqa: F401 - fixtures
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
from fusecsi.engines.embedded import NODE as EMBEDDED
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
        volume_id="vol-b",
        cluster=cluster.master_addrs,
        fs_path="/heal",
        subpath="b",
        target=stale,
        readonly=False,
        secrets={"token": "stale-token"},
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
        lambda: mounts.is_mount_of(mounts.top_mount(row["mountpoint"]), EMBEDDED.fstype),
        deadline=15,
        what="mount",
    )
    table = json.loads((mountd.state_dir / "table.json").read_text())
    table["entries"][0]["pid"] = daemon.pid
    (mountd.state_dir / "table.json").write_text(json.dumps(table))
    with pytest.raises(OSError) as info:
        os.listdir(target)  # still the dead connection
    assert info.value.errno == errno.ENOTCONN

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


async def test_a_daemon_that_recovers_with_its_stopped_master_is_never_replaced(tmp_path):
    """#14.8: the master SIGSTOPped, then resumed while mountd's "does the cluster answer?"
    check waits on it. That check succeeds the moment the master is back, but the failed
    checks before it were the outage's: the daemon (and the pod's open file) must stay."""
    flags = {"probe-timeout": "1", "health-interval": "0.2"}
    async with lone_volume(tmp_path, "kept open", **flags) as (cluster, node, target, row):

        async def message(wanted: str):
            [now] = await node.client.list()
            return wanted in now["message"] and now

        held = os.open(os.path.join(target, "f"), os.O_RDONLY)  # a pod's open file
        master = cluster.master.pid
        os.kill(master, signal.SIGSTOP)
        try:
            await eventually(
                partial(message, "cluster unreachable"), deadline=30, what="outage seen"
            )
            # the next probe failed and mountd is asking the stopped master again: resume it
            await eventually(partial(message, "mount answered"), deadline=30, what="re-check")
        finally:
            os.kill(master, signal.SIGCONT)

        async def settled():
            [now] = await node.client.list()
            return now["state"] == "running" and now["message"] == "" and now

        after = await eventually(settled, deadline=30, what="healthy again")
        assert after["pid"] == row["pid"] and after["restarts"] == 0, after
        assert os.pread(held, 100, 0) == b"kept open"
        os.close(held)
        await node.client.unpublish("vol-lone", target)


async def test_a_crash_looping_daemon_is_replaced_after_growing_pauses(tmp_path, cluster):
    """Each daemon dies right after it started: every replacement waits twice as long as the
    one before (1, 2, 4 s), even though each of them re-binds its targets fine."""
    await make_dirs(cluster, "/loop/v")
    with another_mountd(tmp_path / "node", cluster, **{"health-interval": "0.1"}) as node:
        target = node.target("pod-1", "v")
        await node.publish("vol-loop", "/loop", "v", target)
        assert read_write(target, "f", "crash loop")
        [row] = await node.client.list()
        pid, pauses = row["pid"], []
        for _ in range(4):
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()

            async def replaced(old=pid):
                [now] = await node.client.list()
                if now["pid"] in (None, old) or now["state"] != "running":
                    return None
                # the recovery is over once the target serves the new daemon
                served = await trio.to_thread.run_sync(all_serve({target: "crash loop"}, "f"))
                return served and now["pid"]

            pid = await eventually(replaced, deadline=30, what="replacement")
            pauses.append(time.monotonic() - killed)
        assert pauses[3] >= 3.0, pauses  # the fourth waited for a backoff of 4 s
        [row] = await node.client.list()
        assert row["restarts"] == 4
        await node.client.unpublish("vol-loop", target)


async def test_a_target_unmounted_from_outside_is_bound_again(mountd, cluster):
    await make_dirs(cluster, "/outside/v")
    target = mountd.target("pod-1", "v")
    await mountd.publish("vol-outside", "/outside", "v", target)
    assert read_write(target, "f", "unmounted by someone else")
    [row] = await mountd.client.list()
    mounts.umount(target)
    await eventually(
        all_serve({target: "unmounted by someone else"}, "f"), deadline=15, what="re-bind"
    )
    [after] = await mountd.client.list()
    assert after["pid"] == row["pid"] and after["restarts"] == 0  # only the bind was redone
    await mountd.client.unpublish("vol-outside", target)
    assert mountd.fuse_mounts() == ([], [])


async def test_a_reused_pid_in_the_table_is_neither_adopted_nor_killed(mountd, cluster):
    """mountd was down while its daemon died and the pid went to another process: at restart
    that process is not taken for the daemon, nor killed as a stale one."""
    await make_dirs(cluster, "/reused/v")
    target = mountd.target("pod-1", "v")
    await mountd.publish("vol-reused", "/reused", "v", target)
    assert read_write(target, "f", "pid reused")
    [row] = await mountd.client.list()
    mountd.kill()
    os.kill(row["pid"], signal.SIGKILL)
    stranger = await trio.lowlevel.open_process(["sleep", "300"])
    try:
        table = json.loads((mountd.state_dir / "table.json").read_text())
        table["entries"][0]["pid"] = stranger.pid
        (mountd.state_dir / "table.json").write_text(json.dumps(table))
        mountd.start()
        await eventually(all_serve({target: "pid reused"}, "f"), deadline=15, what="recovery")
        [after] = await mountd.client.list()
        assert after["pid"] not in (stranger.pid, row["pid"]) and after["restarts"] == 1
        assert stranger.poll() is None  # alive: never signalled
    finally:
        stranger.kill()
        await stranger.wait()
    await mountd.client.unpublish("vol-reused", target)
