"""Takeover through mountd: it keeps each mount's /dev/fuse descriptor, so a killed daemon's
replacement serves the same mount; targets are not re-bound and open files keep working."""

from __future__ import annotations

import os
import signal
import time

import trio
from support.mountd import (  # noqa: F401 - fixtures
    check_load,
    check_nothing_leaked,
    cluster_fixture,
    eventually,
    mount_ids,
    mountd_fixture,
    open_fds,
    publish_volume,
    under_load,
)

from fusecsi.mountd.recovery import CRASH_WINDOW

KILLS = 2
# past the crash-loop pause after each early death (1 s, then 2 s: supervisor.CRASH_WINDOW)
PAUSE = 1.5
# the loop: how many kills (FUSECSI_TAKEOVER_KILLS=100 for the long run), each after the
# crash window, so every one is taken over at once (no crash-loop pause in the stalls)
LOOP_KILLS = int(os.environ.get("FUSECSI_TAKEOVER_KILLS", "3"))


async def kill_daemon(mountd, deadline: float = 10) -> None:
    """SIGKILL the key's daemon; back once another one serves."""
    [row] = await mountd.client.list()
    os.kill(row["pid"], signal.SIGKILL)

    async def replaced():
        [now] = await mountd.client.list()
        return now["pid"] != row["pid"] and now["state"] == "running"

    await eventually(replaced, deadline=deadline, what="takeover")


async def kill_under_load(mountd, cluster, tmp_path, name: str, kills: int, pause: float):
    """`kills` SIGKILLs, `pause` apart, of the daemon of a volume under load: no error, no
    lost write, the same mount throughout, nothing leaked."""
    target = await publish_volume(mountd, cluster, name)
    layers = mount_ids(target)
    descriptors = open_fds(mountd.proc.pid)
    began = time.monotonic()
    async with under_load(target, tmp_path / "report.json") as report:
        for _ in range(kills):
            await trio.sleep(pause)
            await kill_daemon(mountd, deadline=60)
        await trio.sleep(0.5)
    print(f"{kills} kills in {time.monotonic() - began:.0f}s")
    check_load(report)
    assert mount_ids(target) == layers  # the same mount serves: nothing re-bound
    [row] = await mountd.client.list()
    assert row["restarts"] == kills and mountd.daemon_pids() == [row["pid"]]
    check_nothing_leaked(mountd, descriptors)
    await mountd.client.unpublish(f"vol-{name}", target)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_killed_daemon_is_taken_over_without_a_rebind(mountd, cluster, tmp_path):
    await kill_under_load(mountd, cluster, tmp_path, "take", KILLS, PAUSE)


async def test_kill_loop_through_mountd_loses_nothing_and_leaks_nothing(mountd, cluster, tmp_path):
    """FUSECSI_TAKEOVER_KILLS SIGKILLs, each after the crash window; the stalls are printed
    (median, 99th percentile, longest), never asserted."""
    await kill_under_load(mountd, cluster, tmp_path, "loop", LOOP_KILLS, CRASH_WINDOW + 0.5)


async def test_a_restarted_mountd_takes_over_the_daemons_it_adopted(mountd, cluster, tmp_path):
    """The new mountd takes a duplicate of the adopted daemon's descriptor (pidfd_getfd)."""
    target = await publish_volume(mountd, cluster, "adopt")
    layers = mount_ids(target)
    mountd.kill()
    mountd.start()
    async with under_load(target, tmp_path / "report.json") as report:
        await trio.sleep(0.5)
        await kill_daemon(mountd)
        await trio.sleep(0.5)
    check_load(report)
    assert mount_ids(target) == layers
    await mountd.client.unpublish("vol-adopt", target)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])
