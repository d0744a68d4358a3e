"""A real cluster, a real `fusecsi mountd` subprocess and real FUSE daemons under tmp_path.

Import the fixtures into a test module (`from support.mountd import cluster_fixture,
mountd_fixture`); tests ask for them as `cluster` and `mountd`.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

from fusecsi.cluster.client import ClusterClient
from fusecsi.cluster.local import LocalCluster
from fusecsi.engines.embedded import NODE as EMBEDDED
from fusecsi.mountd import mounts
from fusecsi.mountd.client import MountdClient
from fusecsi.mountd.daemons import process_args
from support import takeover_load
from support.processes import FUSECSI, read_log, wait_for_path

TOKEN = "mountd-test-token"


@pytest.fixture(name="cluster", scope="module")
def cluster_fixture(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=1, token=TOKEN) as running:
        yield running


class Mountd:
    """One `fusecsi mountd` process; it can be killed and started again on the same state."""

    def __init__(self, base: Path, cluster: LocalCluster, **flags) -> None:
        self.base = base
        self.cluster = cluster
        self.state_dir = base / "state"
        self.kubelet_dir = base / "kubelet"
        self.socket = base / "mountd.sock"
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        self.flags = {"linger": "0", "health-interval": "0.5", **flags}
        self.proc: subprocess.Popen | None = None
        self.client = MountdClient(f"unix://{self.socket}")
        self.starts = 0

    def start(self) -> None:
        args = [
            *FUSECSI,
            "mountd",
            "--state-dir",
            str(self.state_dir),
            "--socket",
            f"unix://{self.socket}",
            "--kubelet-dir",
            str(self.kubelet_dir),
        ]
        for name, value in self.flags.items():
            args += [f"--{name}"] if value is True else [f"--{name}", str(value)]
        self.starts += 1
        # a killed mountd leaves its socket file; the new one replaces it once it is ready
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        log = open(self.base / f"mountd-{self.starts}.log", "wb")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if k != "FUSECSI_TOKEN"}
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.proc.log_path = log.name
        wait_for_path(self.socket, self.proc)

    def kill(self, signum: int = signal.SIGKILL) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=30)

    def start_daemon(self, fs_path: str, options: str, mountpoint: str) -> subprocess.Popen:
        """A `fusecsi mount` started by hand, as a mountd would (close() kills it too)."""
        args = ["--master-addrs", self.cluster.master_addrs, "--fs-path", fs_path]
        return subprocess.Popen(
            [*FUSECSI, "mount", *args, "--options", options, mountpoint],
            env={**os.environ, "FUSECSI_TOKEN": TOKEN},
            start_new_session=True,
        )

    def status(self, *flags: str) -> str:
        """The output of `fusecsi mountd status` against this mountd."""
        args = [*FUSECSI, "mountd", "status", "--socket", f"unix://{self.socket}", *flags]
        return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout

    def roll(self, *flags: str) -> subprocess.CompletedProcess:
        """`fusecsi mountd roll` against this mountd (its exit code is the caller's to check)."""
        args = [*FUSECSI, "mountd", "roll", "--socket", f"unix://{self.socket}", *flags]
        return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)

    def log(self) -> str:
        return read_log(self.proc)

    def target(self, pod: str, pv: str) -> str:
        return str(self.kubelet_dir / "pods" / pod / "volumes" / "kubernetes.io~csi" / pv / "mount")

    def make_parent(self, target: str) -> str:
        """kubelet creates the target's parent; the plugin creates the target itself."""
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return target

    async def publish(self, volume_id, fs_path, subpath, target, *, options="", readonly=False):
        self.make_parent(target)
        return await self.client.publish(
            volume_id=volume_id,
            cluster=self.cluster.master_addrs,
            fs_path=fs_path,
            subpath=subpath,
            options=options,
            target=target,
            readonly=readonly,
            secrets={"token": TOKEN},
        )

    def daemon_pids(self) -> list[int]:
        """Live `fusecsi mount` processes serving this mountd's state dir."""
        marker = os.fsencode(str(self.state_dir / "mounts"))
        pids = []
        for name in filter(str.isdigit, os.listdir("/proc")):
            args = process_args(int(name))
            if args and b"mount" in args and any(a.startswith(marker) for a in args):
                pids.append(int(name))
        return sorted(pids)

    def fuse_mounts(self) -> tuple[list[str], list[str]]:
        """(daemon mountpoints, bound targets) of fuse.fusecsi in /proc/self/mountinfo; a
        target with stacked mounts (a recovery binds on top of the dead one) counts once."""
        entries = [e for e in mounts.read_mountinfo() if e.fstype == EMBEDDED.fstype]
        state = str(self.state_dir) + "/"
        kubelet = str(self.kubelet_dir) + "/"
        return (
            sorted({e.mountpoint for e in entries if e.mountpoint.startswith(state)}),
            sorted({e.mountpoint for e in entries if e.mountpoint.startswith(kubelet)}),
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        for pid in self.daemon_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for entry in mounts.mounts_under(str(self.base)):
            subprocess.run(["umount", "-l", entry.mountpoint], check=False)


@contextlib.contextmanager
def another_mountd(base: Path, cluster: LocalCluster, **flags):
    """A started mountd with its own flags (and state), closed afterwards."""
    node = Mountd(base, cluster, **flags)
    try:
        node.start()
        yield node
    finally:
        node.close()


@contextlib.asynccontextmanager
async def supervisor_in_process(base: Path, *, kill_daemons: bool = True, **options):
    """mountd's Supervisor in the test's own trio loop, for a fault injected at one exact
    point of its work (through monkeypatch); its FUSE daemons are real processes.

    Leaving it is a mountd that died: its state lock and kept connections go; its daemons
    are killed and its mounts removed, unless `kill_daemons` is False (a later supervisor
    on the same `base` adopts them)."""
    from fusecsi.mountd.supervisor import Supervisor

    (base / "kubelet").mkdir(parents=True, exist_ok=True)
    # the fault points these tests hit are on the re-bind path: takeover only when asked
    options = {"linger": 0, "health_interval": 0.1, "takeover": False, **options}
    supervisor = Supervisor(str(base / "state"), str(base / "kubelet"), **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            yield supervisor
            nursery.cancel_scope.cancel()
    finally:
        if supervisor._lock_fd is not None:
            os.close(supervisor._lock_fd)
        for state in supervisor.key_states.values():
            if state.conn is not None:
                state.conn.close()
        for entry in list(supervisor.table.entries.values()) if kill_daemons else ():
            if entry.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(entry.pid, signal.SIGKILL)
        for own in ("state", "kubelet") if kill_daemons else ():
            for entry in reversed(mounts.mounts_under(str(base / own))):
                with contextlib.suppress(OSError):
                    mounts.umount(entry.mountpoint, lazy=True)


@pytest.fixture(name="mountd")
def mountd_fixture(tmp_path, cluster):
    daemon = Mountd(tmp_path, cluster)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.close()


async def make_dirs(cluster: LocalCluster, *paths: str) -> None:
    async with ClusterClient(cluster.master_addrs, token=TOKEN) as client:
        for path in paths:
            await client.mkdirs(path)


async def eventually(check, *, deadline: float, what: str):
    """Poll `check()` until it returns a truthy value (a plain function runs in a thread)."""
    end = time.monotonic() + deadline
    last: BaseException | None = None
    while time.monotonic() < end:
        try:
            if inspect.iscoroutinefunction(check):
                value = await check()
            else:
                value = await trio.to_thread.run_sync(check, abandon_on_cancel=True)
            if value:
                return value
        except OSError as exc:
            last = exc
        await trio.sleep(0.05)
    raise AssertionError(f"{what} not within {deadline}s (last error: {last})")


async def publish_volume(mountd: Mountd, cluster: LocalCluster, name: str) -> str:
    """Volume `vol-<name>` (the cluster's /<name>/v) published at a pod's target: the target."""
    await make_dirs(cluster, f"/{name}/v")
    target = mountd.target("pod-1", "v")
    await mountd.publish(f"vol-{name}", f"/{name}", "v", target)
    return target


def read_write(target: str, name: str, data: str) -> bool:
    """Write a file through `target` and read it back."""
    path = os.path.join(target, name)
    with open(path, "w") as f:
        f.write(data)
    with open(path) as f:
        return f.read() == data


def errno_of(exc: BaseException) -> str:
    return errno.errorcode.get(getattr(exc, "errno", 0) or 0, "?")


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def exists(path: str) -> bool:
    return os.path.lexists(path)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


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
    """Children of `parent` it has not reaped."""
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


def mount_ids(target: str) -> list[int]:
    """The mounts stacked at `target`, bottom first: the same ids, nothing re-bound."""
    return [m.mount_id for m in mounts.stack_at(target)]


def stall_summary(report: dict) -> dict:
    """A takeover_load report's stalls of every worker together (seconds): how many,
    median, 99th percentile, longest."""
    stalls = sorted(s for w in report.values() for s in w["stalls"]) or [0.0]
    p50, p99 = (stalls[min(len(stalls) - 1, int(q * len(stalls)))] for q in (0.5, 0.99))
    count = sum(len(w["stalls"]) for w in report.values())
    return {
        "stalls": count,
        "median": round(p50, 3),
        "p99": round(p99, 3),
        "max": round(stalls[-1], 3),
    }


@contextlib.asynccontextmanager
async def under_load(target: str, report_path: Path):
    """support/takeover_load.py living in `target` for the block; its report (per worker)
    fills the dict yielded once the load stopped."""
    report: dict = {}
    load = await trio.to_thread.run_sync(takeover_load.start, target, report_path)
    try:
        yield report
    finally:
        report.update(await trio.to_thread.run_sync(takeover_load.finish, load, report_path))


def check_load(report: dict) -> None:
    """Print the stalls; no worker saw an error or lost an acknowledged write (the appender
    and the writer read back every record they wrote)."""
    print(takeover_load.summary(report))
    print(json.dumps(stall_summary(report)))
    for name, worker in report.items():
        assert worker["errors"] == [] and worker["lost"] == 0, (name, worker["errors"])


def check_nothing_leaked(mountd: Mountd, descriptors: tuple[list[str], int]) -> None:
    """mountd holds what it held before (`open_fds` then) and has no unreaped child."""
    held, sockets = open_fds(mountd.proc.pid)
    assert held == descriptors[0] and sockets <= descriptors[1]
    assert zombies(mountd.proc.pid) == []
