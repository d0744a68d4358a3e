"""Takeover through mountd: it keeps each mount's /dev/fuse descriptor, so a killed daemon's
replacement serves the same mount; targets are not re-bound and open files keep working."""

from __future__ import annotations

import os
import re
import signal

import trio
from support import takeover_load
from support.mountd import (  # noqa: F401 - fixtures
    cluster_fixture,
    eventually,
    make_dirs,
    mountd_fixture,
)

from fusecsi.mountd import mounts

KILLS = 2
# past the crash-loop pause after each early death (1 s, then 2 s: supervisor.CRASH_WINDOW)
PAUSE = 1.5


def open_fds(pid: int) -> tuple[list[str], int]:
    """What a process holds open: its non-socket descriptors' targets (/dev/fuse, pidfds,
    files), and how many sockets (a control connection may close a moment after the call
    that used it returned, so sockets are compared as at most, the rest exactly)."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    sockets = sum(t.startswith("socket:") for t in targets)
    # pipe:[inode] and the like: the kind, not the instance (a replaced daemon's pipe is new)
    kinds = (re.sub(r"\[\d+\]$", "", t) for t in targets if not t.startswith("socket:"))
    return sorted(kinds), sockets


def zombies(parent: int) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == b"Z" and int(fields[1]) == parent:
            found.append(int(name))
    return found


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
