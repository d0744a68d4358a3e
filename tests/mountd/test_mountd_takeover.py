"""Takeover through mountd: it keeps each mount's /dev/fuse descriptor, so a killed daemon's
replacement serves the same mount; targets are not re-bound and open files keep working."""

from __future__ import annotations

import json
import os
import signal
import time

import trio
from support import takeover_load
from support.mountd import (  # noqa: F401 - fixtures
    cluster_fixture,
    eventually,
    make_dirs,
    mount_ids,
    mountd_fixture,
    open_fds,
    stall_summary,
    zombies,
)

from fusecsi.mountd import mounts
from fusecsi.mountd.recovery import CRASH_WINDOW

KILLS = 2
# past the crash-loop pause after each early death (1 s, then 2 s: supervisor.CRASH_WINDOW)
PAUSE = 1.5
# the loop: how many kills (FUSECSI_TAKEOVER_KILLS=100 for the long run), each after the
# crash window, so every one is taken over at once (no crash-loop pause in the stalls)
LOOP_KILLS = int(os.environ.get("FUSECSI_TAKEOVER_KILLS", "3"))


async def test_killed_daemon_is_taken_over_without_a_rebind(mountd, cluster, tmp_path):
    await make_dirs(cluster, "/take/v")
    target = mountd.target("pod-1", "v")
    await mountd.publish("vol-take", "/take", "v", target)
    layers = len(mounts.stack_at(target))
    descriptors = open_fds(mountd.proc.pid)
    report_path = tmp_path / "report.json"
    load = await trio.to_thread.run_sync(takeover_load.start, target, report_path)
    try:
        for _ in range(KILLS):
            await trio.sleep(PAUSE)
            [row] = await mountd.client.list()
            os.kill(row["pid"], signal.SIGKILL)

            async def replaced(old=row["pid"]):
                [now] = await mountd.client.list()
                return now["pid"] != old and now["state"] == "running"

            await eventually(replaced, deadline=10, what="takeover")
        await trio.sleep(0.5)
    finally:
        report = await trio.to_thread.run_sync(takeover_load.finish, load, report_path)
    print(takeover_load.summary(report))
    for name, worker in report.items():
        assert worker["errors"] == [], name
    assert len(mounts.stack_at(target)) == layers  # the same mount serves: nothing re-bound
    [row] = await mountd.client.list()
    assert row["restarts"] == KILLS and mountd.daemon_pids() == [row["pid"]]
    held, sockets = open_fds(mountd.proc.pid)
    assert held == descriptors[0] and sockets <= descriptors[1]
    assert zombies(mountd.proc.pid) == []
    await mountd.client.unpublish("vol-take", target)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_a_restarted_mountd_takes_over_the_daemons_it_adopted(mountd, cluster, tmp_path):
    """The new mountd takes a duplicate of the adopted daemon's descriptor (pidfd_getfd)."""
    await make_dirs(cluster, "/adopt/v")
    target = mountd.target("pod-1", "v")
    await mountd.publish("vol-adopt", "/adopt", "v", target)
    layers = len(mounts.stack_at(target))
    mountd.kill()
    mountd.start()
    [row] = await mountd.client.list()
    report_path = tmp_path / "report.json"
    load = await trio.to_thread.run_sync(takeover_load.start, target, report_path)
    try:
        await trio.sleep(0.5)
        os.kill(row["pid"], signal.SIGKILL)

        async def replaced():
            [now] = await mountd.client.list()
            return now["pid"] != row["pid"] and now["state"] == "running"

        await eventually(replaced, deadline=10, what="takeover")
        await trio.sleep(0.5)
    finally:
        report = await trio.to_thread.run_sync(takeover_load.finish, load, report_path)
    for name, worker in report.items():
        assert worker["errors"] == [], name
    assert len(mounts.stack_at(target)) == layers
    await mountd.client.unpublish("vol-adopt", target)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_kill_loop_through_mountd_loses_nothing_and_leaks_nothing(mountd, cluster, tmp_path):
    """FUSECSI_TAKEOVER_KILLS SIGKILLs of the key's daemon under load; the stalls are printed
    (median, 99th percentile, longest), never asserted."""
    await make_dirs(cluster, "/loop/v")
    target = mountd.target("pod-1", "v")
    await mountd.publish("vol-loop", "/loop", "v", target)
    layers = mount_ids(target)
    descriptors = open_fds(mountd.proc.pid)
    report_path = tmp_path / "report.json"
    began = time.monotonic()
    load = await trio.to_thread.run_sync(takeover_load.start, target, report_path)
    try:
        for _ in range(LOOP_KILLS):
            await trio.sleep(CRASH_WINDOW + 0.5)
            [row] = await mountd.client.list()
            os.kill(row["pid"], signal.SIGKILL)

            async def replaced(old=row["pid"]):
                [now] = await mountd.client.list()
                return now["pid"] != old and now["state"] == "running"

            await eventually(replaced, deadline=60, what="takeover")
        await trio.sleep(0.5)
    finally:
        report = await trio.to_thread.run_sync(takeover_load.finish, load, report_path)
    print(f"{LOOP_KILLS} kills in {time.monotonic() - began:.0f}s")
    print(takeover_load.summary(report))
    print(json.dumps(stall_summary(report)))
    for name, worker in report.items():
        assert worker["errors"] == [] and worker["lost"] == 0, (name, worker["errors"])
    assert mount_ids(target) == layers  # the same mount served throughout
    [row] = await mountd.client.list()
    assert row["restarts"] == LOOP_KILLS and mountd.daemon_pids() == [row["pid"]]
    held, sockets = open_fds(mountd.proc.pid)
    assert held == descriptors[0] and sockets <= descriptors[1]
    assert zombies(mountd.proc.pid) == []
    await mountd.client.unpublish("vol-loop", target)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])
