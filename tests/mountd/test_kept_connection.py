"""mountd keeps each mount's /dev/fuse descriptor in a holder process, never in itself.

A thread of mountd waiting on a request the daemon had read (the health check's statfs)
waits uninterruptibly until it is answered or the connection ends. Killed together with the
daemon (a container kill), a mountd that held the descriptor itself could never finish
exiting, so it would never let the connection go: mountd and every call on the mount stuck
for good. Here the master is stopped so the daemon reads mountd's statfs and waits; then
mountd and the daemon are SIGKILLed at once, as `cgroup.kill` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import trio
from support.mountd import (  # noqa: F401 - fixtures
    cluster_fixture,
    eventually,
    mountd_fixture,
    open_fds,
    publish_volume,
)

from fusecsi.mountd import mounts

FUSECTL = "/sys/fs/fuse/connections"


def waiting_on_fuse(pid: int) -> bool:
    """A thread of `pid` waits for a FUSE answer."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/wchan") as f:
            if "request_wait_answer" in f.read():
                return True
    return False


def abort_connection(target: str) -> None:
    """Clean-up when the test fails: end the target's connection through fusectl."""
    entry = mounts.top_mount(target)
    if entry is None:
        return
    if not os.listdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], check=False)
    with open(os.path.join(FUSECTL, entry.device.split(":")[1], "abort"), "w") as f:
        f.write("1")


def holders_of_fuse(parent: int) -> list[int]:
    """Children of `parent` holding a /dev/fuse descriptor."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid == parent and "/dev/fuse" in open_fds(int(name))[0]:
                found.append(int(name))
    return found


async def test_mountd_killed_with_its_daemon_mid_request_exits_and_lets_the_mount_go(
    mountd, cluster
):
    target = await publish_volume(mountd, cluster, "kept")
    [row] = await mountd.client.list()
    daemon = row["pid"]
    # the kept descriptor is the holder's, not mountd's
    assert "/dev/fuse" not in open_fds(mountd.proc.pid)[0]
    holders = [pid for pid in holders_of_fuse(mountd.proc.pid) if pid != daemon]
    assert holders, "no process but the daemon keeps the connection"
    os.kill(cluster.master.pid, signal.SIGSTOP)  # the daemon reads the statfs and waits
    try:
        await eventually(
            lambda: waiting_on_fuse(mountd.proc.pid), deadline=30, what="mountd waiting"
        )
        os.kill(daemon, signal.SIGKILL)
        mountd.proc.kill()
        await eventually(lambda: mountd.proc.poll() is not None, deadline=30, what="mountd gone")
        for pid in holders:
            await eventually(
                lambda pid=pid: not os.path.exists(f"/proc/{pid}/fd"),
                deadline=30,
                what=f"holder {pid} gone",
            )
    finally:
        os.kill(cluster.master.pid, signal.SIGCONT)
        if mountd.proc.poll() is None:  # failed: release it (and the mount) for clean-up
            await trio.to_thread.run_sync(abort_connection, target)
            await trio.to_thread.run_sync(mountd.proc.wait, 30)
