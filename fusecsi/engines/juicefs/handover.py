"""A running `juicefs mount` hands its mount over to a successor and exits (upgrades).

On SIGHUP a JuiceFS mount process flushes what it buffered, stops reading requests without
unmounting, writes its open handles to `/tmp/state<its parent pid>.json` (its own /tmp,
which may be another mount namespace's) and exits with code 1. When it cannot stop cleanly
(requests still in flight after ~10 s, a flush that fails) it says so in its log and keeps
serving. Its successor, served the same connection (fdpass.py), reads the handles from
`_FUSE_STATE_PATH`: mountd points that at the key's connection directory, so the file is
moved there. It also continues the daemon's metadata session (`_JFS_META_SID`, left in
`handover.env` for mountd to add to its environment), as JuiceFS's own upgrade does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal

import trio

from fusecsi.logs import fields

log = logging.getLogger(__name__)

STATE_FILE = "state.json"  # fusecsi/mountd/fdpass.STATE_FILE: the successor's _FUSE_STATE_PATH
# the successor's extra environment (fusecsi/mountd/daemons.HANDOVER_ENV)
HANDOVER_ENV = "handover.env"
POLL = 0.1
SESSION_TIMEOUT = 5.0


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


async def _wait_exit(pid: int, pidfd: int, grace: float) -> bool:
    with trio.move_on_after(grace):
        while not _exited(pid):
            with trio.move_on_after(POLL):
                await trio.lowlevel.wait_readable(pidfd)
        return True
    return False


def _session_of(pid: int) -> int | None:
    """The metadata session of the daemon, from the `.config` its mount serves at the
    root (the mountpoint is the argument after the metadata URL)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        words = f.read().replace(b"\0", b" ").split()
    try:
        mountpoint = os.fsdecode(words[words.index(b"mount") + 2])
    except (ValueError, IndexError):
        return None
    with open(f"/proc/{pid}/root{mountpoint}/.config", "rb") as f:
        sid = json.load(f).get("Meta", {}).get("Sid")
    return sid if isinstance(sid, int) and sid > 0 else None


async def _keep_session(pid: int, connection_dir: str) -> None:
    """Have the successor continue the daemon's metadata session (`_JFS_META_SID`): files
    unlinked while open and locks held belong to it, and a session left behind is cleaned
    up once it goes stale, taking them along."""
    sid = None
    with trio.move_on_after(SESSION_TIMEOUT):
        try:
            sid = await trio.to_thread.run_sync(_session_of, pid, abandon_on_cancel=True)
        except (OSError, ValueError) as exc:
            log.warning("juicefs session unknown", extra=fields(pid=pid, error=str(exc)))
    if sid is None:
        return
    path = os.path.join(connection_dir, HANDOVER_ENV)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps({"_JFS_META_SID": str(sid)}).encode())
    finally:
        os.close(fd)
    os.replace(path + ".tmp", path)


def _move_state(tmp_dir: int, name: str, connection_dir: str) -> bool:
    """Copy the dumped handles into the connection directory (atomically), then remove
    them from the daemon's /tmp; False when it wrote none."""
    try:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=tmp_dir)
    except FileNotFoundError:
        return False
    try:
        data = b""
        while chunk := os.read(src, 1 << 20):
            data += chunk
    finally:
        os.close(src)
    path = os.path.join(connection_dir, STATE_FILE)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=tmp_dir)
    return True


async def hand_over(pid: int, connection_dir: str, grace: float) -> None:
    """SIGHUP `pid`, wait up to `grace` seconds for it to exit, leave its handles in
    `connection_dir`. OSError EBUSY when it is still serving then (it refused); ESRCH when
    there was no such process. An exit without handles is logged: its successor serves, but
    files it had open answer EBADF, as after a crash."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise OSError(errno.ESRCH, f"no juicefs process {pid}") from None
    try:
        # read through its root: the file is in its /tmp, and once it exited /proc/<pid>
        # shows nothing of it
        tmp_dir = os.open(f"/proc/{pid}/root/tmp", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            name = f"state{_parent_of(pid)}.json"
            os.makedirs(connection_dir, mode=0o700, exist_ok=True)
            for stale in (STATE_FILE, HANDOVER_ENV):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(connection_dir, stale))
            await _keep_session(pid, connection_dir)
            signal.pidfd_send_signal(pidfd, signal.SIGHUP)
            if not await _wait_exit(pid, pidfd, grace):
                with contextlib.suppress(FileNotFoundError):  # it goes on with its session
                    os.unlink(os.path.join(connection_dir, HANDOVER_ENV))
                raise OSError(
                    errno.EBUSY,
                    f"juicefs {pid} did not hand its mount over within {grace:g}s "
                    "(busy or a flush failed: see its log); it keeps serving",
                )
            moved = await trio.to_thread.run_sync(_move_state, tmp_dir, name, connection_dir)
        finally:
            os.close(tmp_dir)
    except (FileNotFoundError, ProcessLookupError):
        raise OSError(errno.ESRCH, f"juicefs {pid} exited before the handover") from None
    finally:
        os.close(pidfd)
    if not moved:
        log.warning("juicefs exited without its handle state", extra=fields(pid=pid))
