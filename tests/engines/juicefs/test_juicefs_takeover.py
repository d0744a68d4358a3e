"""Takeover of JuiceFS mounts through mountd (real juicefs, real mounts): the client hands
mountd its /dev/fuse descriptor (fusecsi/mountd/fdpass.py), so a SIGKILLed daemon's
successor, or the successor of one that handed over (JuiceFSNode.hand_over), serves the
same mount; targets are never re-bound.

What a process holding things open sees (held_probe.py, takeover_load.py):
- after hand_over: nothing (handles pass to the successor through the state file);
- after SIGKILL: its cwd and new opens work; descriptors opened before answer EBADF (the
  new daemon never saw their handles), an mmap fault of such a file is a SIGBUS.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import trio
from support import takeover_load
from support.mountd import eventually, supervisor_in_process

from fusecsi.engines import open_namespace
from fusecsi.engines.juicefs import NODE
from fusecsi.mountd import mounts

PROBE = Path(__file__).with_name("held_probe.py")
VOLUME = b"trusted.fusecsi.volume"
EINTR = ("InterruptedError(4,",)
WRITE_ERRORS = ("OSError(9, 'Bad file descriptor')", *EINTR)
GRACE = 30.0  # JuiceFS gives up a busy handover after ~10 s


@pytest.fixture
def base():
    # short: the descriptor socket's path must fit a sockaddr_un (108 bytes)
    path = Path(tempfile.mkdtemp(prefix="jfs-", dir="/tmp"))
    yield path
    for entry in mounts.mounts_under(str(path)):
        with contextlib.suppress(OSError):
            mounts.umount(entry.mountpoint, lazy=True)
    shutil.rmtree(path, ignore_errors=True)


def supervisor(base: Path, **options):
    """mountd's Supervisor in the test's trio loop with takeover on
    (support.mountd.supervisor_in_process: `kill_daemons=False` keeps its daemons)."""
    options = {"health_interval": 0.2, "ready_timeout": 30, "takeover": True, **options}
    return supervisor_in_process(base, engines=lambda name: NODE, **options)


def assert_no_error(after: dict, report: dict) -> None:
    """The prober's held reader, cwd, mmap and appender, and every load worker, saw no
    error and lost nothing."""
    probed = ("held", "cwd", "mmap", "appender")
    assert {k: after[k] for k in probed} == dict.fromkeys(probed, "ok"), after
    for name, worker in report.items():
        assert worker["errors"] == [] and worker["lost"] == 0, (name, worker)


async def publish(sup, backend, volume: str) -> str:
    async with open_namespace(backend.cluster, timeout=30) as ns:
        await ns.mkdirs("/pvc")
        await ns.mkdir_tagged(f"/pvc/{volume}", 0o777, {VOLUME: volume.encode()}, None)
    target = Path(
        sup.kubelet_dir, "pods", str(uuid.uuid4()), "volumes", "kubernetes.io~csi", volume, "mount"
    )
    target.parent.mkdir(parents=True)
    await sup.publish(
        volume_id=f"vol-{volume}",
        engine="juicefs",
        cluster=backend.cluster.address,
        fs_path="/pvc",
        subpath=volume,
        target=str(target),
        readonly=False,
        secrets=dict(backend.secrets),
    )
    return str(target)


def session_of(mountpoint: str) -> int:
    """The metadata session of the daemon serving `mountpoint` (its `.config`)."""
    with open(os.path.join(mountpoint, ".config")) as f:
        return json.load(f)["Meta"]["Sid"]


def fuse_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"
    return count


def juicefs_pids(base: Path) -> list[int]:
    marker = os.fsencode(str(base))
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
            if len(args) > 2 and args[1] == b"mount" and any(marker in a for a in args):
                found.append(int(name))
    return found


async def off_thread(fn, *args, seconds: float = 60):
    """A call that may hang on a mount nobody serves (the test then fails, not hangs)."""
    with trio.fail_after(seconds):
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


@pytest.fixture
def processes():
    """Processes the test starts on its mounts: killed at the end, whatever happened."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


class Prober:
    def __init__(self, directory: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PROBE), directory],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline() == "READY\n"

    def probe(self) -> dict:
        self.proc.stdin.write("probe\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def quit(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        last = json.loads(self.proc.stdout.readline())
        assert self.proc.wait(timeout=60) == 0
        return last


async def held_open(target: str, tmp_path: Path, processes: list):
    """A prober (held_probe.py) and a load (takeover_load.py) running in the volume."""
    prober = await off_thread(Prober, target)
    processes.append(prober.proc)
    os.makedirs(os.path.join(target, "load"))
    report_path = tmp_path / "report.json"
    load = await off_thread(takeover_load.start, os.path.join(target, "load"), report_path)
    processes.append(load)
    return prober, load, report_path


async def replaced(sup, key_id: str, old: int) -> None:
    async def done():
        state = sup.key_states.get(key_id)
        return (
            state is not None and state.state == "running" and sup.table.entries[key_id].pid != old
        )

    await eventually(done, deadline=60, what="a new daemon")


def served(sup, key_id: str) -> tuple[int, int]:
    """The connection mountd keeps for the key: (its descriptor, the daemon's pid)."""
    return sup.key_states[key_id].conn, sup.table.entries[key_id].pid


async def test_a_sigkilled_juicefs_is_taken_over_without_a_rebind(
    redis_fs, base, tmp_path, processes
):
    async with supervisor(base) as sup:
        target = await publish(sup, redis_fs, "v1")
        [key_id] = sup.table.entries
        mount_id = mounts.top_mount(target).mount_id
        conn, pid = served(sup, key_id)
        assert conn is not None  # the daemon passed its descriptor to mountd
        prober, load, report_path = await held_open(target, tmp_path, processes)
        before = await off_thread(prober.probe)
        assert [before[k] for k in ("held", "cwd", "mmap", "appender")] == ["ok"] * 4
        try:
            await trio.sleep(1)
            os.kill(pid, signal.SIGKILL)
            await replaced(sup, key_id, pid)
            rounds = [await off_thread(prober.probe) for _ in range(3)]
            await trio.sleep(1)
        finally:
            report = await off_thread(takeover_load.finish, load, report_path, seconds=150)
        print("after SIGKILL:", rounds, takeover_load.summary(report))
        print({name: worker["errors"][:3] for name, worker in report.items()})
        # under load: reads through held descriptors and mmaps see nothing; a call in
        # flight at the kill is answered EINTR ~3 s later (Python retries reads, writes
        # and fsyncs, not a close or a listing); a descriptor held for writing answers
        # EBADF at its next call (the load then reopens it)
        for name in ("held", "mapped"):
            assert report[name]["errors"] == [], name
        for name, allowed in (("cwd", EINTR), ("appender", WRITE_ERRORS), ("writer", WRITE_ERRORS)):
            errors = report[name]["errors"]
            assert all(e.startswith(allowed) for e in errors), (name, errors)
        # the same mount is served: no re-bind, the cwd and new opens go on
        assert mounts.top_mount(target).mount_id == mount_id
        assert len(mounts.stack_at(target)) == 1
        # JuiceFS recovers the read-only handles of a killed process (their numbers say
        # so), not the ones that write: a descriptor opened for writing answers EBADF
        for after in rounds:
            assert [after[k] for k in ("held", "cwd", "mmap")] == ["ok"] * 3, after
            assert after["appender"] == "EBADF", after
        last = await off_thread(prober.quit)
        print("closing:", last)
        # what was fsync'd before the kill is there, exactly
        assert last["log_exact"] and last["synced"] == 1, last
        assert sup.table.entries[key_id].restarts == 1
        await assert_stops_clean(sup, base, target)


async def test_hand_over_passes_open_files_to_the_successor(redis_fs, base, tmp_path, processes):
    async with supervisor(base) as sup:
        target = await publish(sup, redis_fs, "v1")
        [key_id] = sup.table.entries
        mount_id = mounts.top_mount(target).mount_id
        _, pid = served(sup, key_id)
        session = await off_thread(session_of, sup.table.entries[key_id].mountpoint)
        prober, load, report_path = await held_open(target, tmp_path, processes)
        try:
            await trio.sleep(1)
            # as a roll does: the key is held, so no health check starts the successor
            # before the handles are in place; then the next check starts it
            async with sup.key_locks.hold(key_id):
                await NODE.hand_over(pid, sup._connection_dir(key_id), GRACE)
            await replaced(sup, key_id, pid)
            after = await off_thread(prober.probe)
            await trio.sleep(1)
        finally:
            report = await off_thread(takeover_load.finish, load, report_path, seconds=150)
        print("after hand_over:", after, takeover_load.summary(report))
        assert_no_error(after, report)
        assert mounts.top_mount(target).mount_id == mount_id
        assert len(mounts.stack_at(target)) == 1
        # the successor continues the session (files unlinked while open, locks)
        assert await off_thread(session_of, sup.table.entries[key_id].mountpoint) == session
        # the successor read its predecessor's handles (and set the file aside)
        assert "state.json.bak" in os.listdir(sup._connection_dir(key_id))
        last = await off_thread(prober.quit)
        assert last == {"close": "ok", "log_exact": True, "synced": last["synced"]}
        await assert_stops_clean(sup, base, target)


async def test_a_restarted_mountd_takes_over_the_juicefs_it_adopted(redis_fs, base, processes):
    """The new mountd duplicates the adopted daemon's descriptor (pidfd_getfd)."""
    async with supervisor(base, kill_daemons=False) as sup:
        target = await publish(sup, redis_fs, "v1")
        [key_id] = sup.table.entries
    mount_id = mounts.top_mount(target).mount_id
    prober = await off_thread(Prober, target)
    processes.append(prober.proc)
    async with supervisor(base) as sup:
        conn, pid = served(sup, key_id)
        assert conn is not None and sup.key_states[key_id].daemon.alive
        # kept by a holder process, never by mountd itself (fusecsi/mountd/keeper.py)
        assert fuse_fds(os.getpid()) == 0 and fuse_fds(conn.pid) == 1
        os.kill(pid, signal.SIGKILL)
        await replaced(sup, key_id, pid)
        after = await off_thread(prober.probe)
        print("after mountd restart and SIGKILL:", after)
        assert mounts.top_mount(target).mount_id == mount_id
        assert len(mounts.stack_at(target)) == 1
        assert [after[k] for k in ("held", "cwd", "mmap")] == ["ok"] * 3, after
        await off_thread(prober.quit)
        await assert_stops_clean(sup, base, target)


async def test_without_takeover_a_sigkilled_juicefs_is_rebound(redis_fs, base, processes):
    """`mountd --no-takeover`: juicefs mounts alone, is told of no socket, and its death
    costs what it did before fd passing: a fresh mount on top, ENOTCONN for held files."""
    async with supervisor(base, takeover=False) as sup:
        target = await publish(sup, redis_fs, "v1")
        [key_id] = sup.table.entries
        mount_id = mounts.top_mount(target).mount_id
        conn, pid = served(sup, key_id)
        assert conn is None and sup.key_states[key_id].fd_server is None
        environ = await off_thread(Path(f"/proc/{pid}/environ").read_bytes)
        assert b"_FUSE_FD_COMM" not in environ
        prober = await off_thread(Prober, target)
        processes.append(prober.proc)
        os.kill(pid, signal.SIGKILL)
        await replaced(sup, key_id, pid)
        after = await off_thread(prober.probe)
        print("without takeover, after SIGKILL:", after)
        assert mounts.top_mount(target).mount_id != mount_id  # re-bound on top
        assert [after[k] for k in ("held", "cwd", "appender")] == ["ENOTCONN"] * 3
        assert after["mmap"] == "SIGBUS"
        prober.proc.kill()
        await assert_stops_clean(sup, base, target)


async def test_hand_over_of_a_gone_process_is_an_error(base):
    with pytest.raises(OSError) as info:
        await NODE.hand_over(2**22 + 1, str(base), 1)
    assert info.value.errno == 3  # ESRCH


async def assert_stops_clean(sup, base: Path, target: str) -> None:
    """Unpublish: no daemon, no mount, no descriptor of ours left."""
    [ref] = [r for e in sup.table.entries.values() for r in e.refs.values()]
    await sup.unpublish(ref.volume_id, target)
    assert sup.table.entries == {} and sup.key_states == {}
    assert juicefs_pids(base) == []
    assert mounts.mounts_under(str(base)) == []
    assert fuse_fds(os.getpid()) == 0
    assert not any(p.name == "fd.sock" for p in (base / "state").rglob("*"))
