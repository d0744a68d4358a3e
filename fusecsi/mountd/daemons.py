"""Starting, watching and stopping FUSE daemons (any engine's, from its Launch).

Daemons run in their own session, so a signal to mountd's process group (or mountd's death)
leaves them serving. They are watched through pidfds, which work for our children and for
daemons adopted from a previous mountd alike.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess

import trio

from fusecsi.engines.base import Launch
from fusecsi.logs import fields
from fusecsi.mountd import cgroups, mounts

log = logging.getLogger(__name__)

LOG_LIMIT = 8 << 20  # a daemon's log is rotated once when it grows past this
PIDFD_GETFD = 438  # syscall number (x86_64 and arm64 alike)
LEADER_POLL = 0.25  # seconds between looks at a daemon's main thread (see leader_exited)


class DaemonFailed(OSError):
    pass


def _open_log(path: str) -> int:
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_size > LOG_LIMIT:
            os.replace(path, path + ".1")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


class Daemon:
    """One FUSE daemon process, spawned by us or adopted by pid."""

    def __init__(self, pid: int, popen: subprocess.Popen | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self.exited = trio.Event()
        self.returncode: int | None = None
        self._watching = False
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None
            self.exited.set()

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def start_watching(self, nursery: trio.Nursery) -> None:
        """Have `exited` set (and the child reaped) when the process ends."""
        if not self._watching:
            self._watching = True
            nursery.start_soon(self._watch)

    async def _watch(self) -> None:
        if self._pidfd is not None:
            try:
                while not leader_exited(self.pid):
                    with trio.move_on_after(LEADER_POLL):
                        await trio.lowlevel.wait_readable(self._pidfd)
                        break
            except BaseException:
                self._close()  # mountd is stopping; the daemon lives on
                raise
            if self.popen is not None:
                with contextlib.suppress(Exception):
                    self.returncode = self.popen.poll()
            self._close()
        self.exited.set()

    def _close(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None

    def signal(self, signum: int) -> None:
        if self._pidfd is not None and not self.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    async def stop(self, grace: float) -> None:
        """SIGTERM (the daemon unmounts and exits), SIGKILL after `grace` seconds."""
        self.signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await self.exited.wait()
        if self.alive:
            self.signal(signal.SIGKILL)
            with trio.move_on_after(5):
                await self.exited.wait()


# what a daemon's environment keeps of mountd's (the rest, secrets included, stays behind)
ENV_KEPT = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONHOME")
ENV_KEPT += ("SSL_CERT_FILE", "SSL_CERT_DIR")  # an engine reaching object storage over TLS
ENV_KEPT += tuple(p + "_PROXY" for p in ("HTTP", "HTTPS", "NO"))
ENV_KEPT += tuple(p + "_proxy" for p in ("http", "https", "no"))
ENV_KEPT_PREFIXES = ("LC_", "FUSECSI_", "COVERAGE_")
ENV_DROPPED = ("FUSECSI_TOKEN",)
READY_POLL = 0.1  # seconds between looks at mountinfo while a daemon comes up
HANDOVER_ENV = "handover.env"  # in the connection directory: see _handover_env


def daemon_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if (k in ENV_KEPT or k.startswith(ENV_KEPT_PREFIXES)) and k not in ENV_DROPPED
    }
    return {**env, **extra}


def fill(text: str, values: dict[str, str]) -> str:
    """Replace the placeholders mountd knows (`{private}`, `{ready_fd}`, ...) and nothing
    else: an argument may hold braces of its own."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


def write_private_files(private_dir: str, files: dict[str, bytes]) -> None:
    """The launch's files, mode 0600, in the key's private directory (mode 0700)."""
    os.makedirs(private_dir, mode=0o700, exist_ok=True)
    os.chmod(private_dir, 0o700)
    for name, content in files.items():
        if not name or "/" in name or name in (".", ".."):
            raise DaemonFailed(errno.EINVAL, f"launch file name {name!r} is not a plain name")
        path = os.path.join(private_dir, name)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        os.replace(tmp, path)


async def spawn(
    launch: Launch,
    *,
    fstype: str,
    mountpoint: str,
    private_dir: str,
    log_path: str,
    deadline: float,
    nursery: trio.Nursery,
    metrics_file: str | None = None,
    fuse_fd: int | None = None,
    connection: str | None = None,
) -> Daemon:
    """Start the daemon `launch` describes and wait until it is ready; DaemonFailed
    (ETIMEDOUT/EIO) otherwise.

    Ready means a READY line on the ready pipe (launch.ready "ready-fd") or `fstype`
    mounted at `mountpoint` with a statfs that answers ("mountinfo"). The watcher task runs
    in `nursery` so the caller learns when the process exits later.
    """
    if launch.ready not in ("ready-fd", "mountinfo"):
        raise DaemonFailed(errno.EINVAL, f"unknown readiness {launch.ready!r}")
    await trio.to_thread.run_sync(write_private_files, private_dir, launch.files)
    argv = list(launch.argv)
    if fuse_fd is not None:
        argv += launch.takeover_argv
    if metrics_file is not None:
        argv += launch.metrics_argv
    values = {
        "private": private_dir,
        "fuse_fd": str(fuse_fd),
        "connection": connection or "",
        "metrics_file": metrics_file or "",
    }
    read_fd = write_fd = None
    if launch.ready == "ready-fd":
        read_fd, write_fd = os.pipe()
        values["ready_fd"] = str(write_fd)
    argv = [fill(arg, values) for arg in argv]
    # a variable naming the connection directory is set only when there is one
    wanted = {k: v for k, v in launch.env.items() if connection or "{connection}" not in v}
    env = daemon_env({k: fill(v, values) for k, v in wanted.items()})
    if connection:
        env.update(_handover_env(connection))
    passed = tuple(fd for fd in (write_fd, fuse_fd) if fd is not None)
    log_fd = _open_log(log_path)
    try:
        popen = await trio.to_thread.run_sync(
            lambda: subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                env=env,
                pass_fds=passed,
                start_new_session=True,
                close_fds=True,
            )
        )
    except BaseException:
        if read_fd is not None:
            os.close(read_fd)
        raise
    finally:
        if write_fd is not None:
            os.close(write_fd)
        os.close(log_fd)
    daemon = Daemon(popen.pid, popen)
    daemon.start_watching(nursery)
    try:
        cgroups.place(popen.pid)
    except OSError as exc:
        if read_fd is not None:
            os.close(read_fd)
        with trio.CancelScope(shield=True):
            await daemon.stop(grace=2)
        raise DaemonFailed(errno.EIO, f"cannot move the FUSE daemon to its cgroup: {exc}") from exc
    log.info("daemon started", extra=fields(pid=popen.pid, mountpoint=mountpoint))
    try:
        with trio.move_on_after(deadline) as scope:
            if read_fd is not None:
                ready = await _ready_line(read_fd)
            else:
                ready = await _mounted(daemon, fstype, mountpoint)
    except BaseException:
        # cancelled while waiting: a daemon nobody records must not outlive the call
        with trio.CancelScope(shield=True):
            await daemon.stop(grace=2)
        raise
    if not scope.cancelled_caught and ready:
        return daemon
    if scope.cancelled_caught:
        message = f"FUSE daemon did not become ready within {deadline:g}s"
        code = errno.ETIMEDOUT
    else:
        with trio.move_on_after(2):
            await daemon.exited.wait()
        message = f"FUSE daemon failed to mount (exit {daemon.returncode}): {last_words(log_path)}"
        code = errno.EIO
    with trio.CancelScope(shield=True):
        await daemon.stop(grace=2)
    log.warning("daemon failed", extra=fields(mountpoint=mountpoint, error=message))
    raise DaemonFailed(code, message)


def _handover_env(connection: str) -> dict[str, str]:
    """What a daemon that handed its mount over left for its successor's environment
    (NodeEngine.hand_over): used once, by the next daemon started on the connection."""
    path = os.path.join(connection, HANDOVER_ENV)
    try:
        with open(path, "rb") as f:
            values = json.load(f)
    except (OSError, ValueError):
        return {}
    with contextlib.suppress(OSError):
        os.unlink(path)
    if not isinstance(values, dict):
        return {}
    return {str(k): str(v) for k, v in values.items()}


async def _ready_line(read_fd: int) -> bool:
    """Whether the daemon wrote READY before closing its end of the pipe."""
    os.set_blocking(read_fd, False)
    stream = trio.lowlevel.FdStream(read_fd)
    received = b""
    try:
        while b"\n" not in received:
            chunk = await stream.receive_some(64)
            if not chunk:
                break
            received += chunk
    finally:
        await stream.aclose()
    return received.startswith(b"READY")


async def _mounted(daemon: Daemon, fstype: str, mountpoint: str) -> bool:
    """Wait until `fstype` is the top mount at `mountpoint` and a statfs of it answers;
    False once the daemon exits first. The caller bounds the wait."""
    while daemon.alive:
        top = mounts.top_mount(mountpoint)
        if top is not None and top.fstype == fstype:
            with trio.move_on_after(5):
                try:
                    await trio.to_thread.run_sync(os.statvfs, mountpoint, abandon_on_cancel=True)
                    return True
                except OSError:
                    pass
        with trio.move_on_after(READY_POLL):
            await daemon.exited.wait()
    return False


def last_words(log_path: str, limit: int = 300) -> str:
    """The daemon's last log line, for the error a caller sees (logs are redacted already)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    if not lines:
        return "no output"
    line = lines[-1]
    with contextlib.suppress(ValueError, AttributeError):
        record = json.loads(line)
        line = ": ".join(str(record[k]) for k in ("msg", "err") if record.get(k))
    return line[:limit] + f" (log: {log_path})"


def process_args(pid: int) -> list[bytes] | None:
    """The command line of a live process; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state in (b"Z", b"X") else args


def leader_exited(pid: int) -> bool:
    """Whether the process's main thread is gone. A killed daemon can linger with one thread
    stuck in the kernel on its own mount (a notify_store waiting for a page that a read in
    flight locks): the pidfd reports its exit only once that read is answered, and with
    takeover only the next daemon answers it. So its death is seen here, not waited for."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def cmdline_matches(pid: int, mountpoint: str) -> bool:
    """Whether `pid` is (still) a daemon serving `mountpoint`, not a reused pid: its command
    line names mountd's private mountpoint, alone or as an option's value (`-dir=...`)."""
    args = process_args(pid)
    if args is None:
        return False
    # some clients rewrite their command line as one string (juicefs, hiding a password)
    words = [a for a in args if a]
    if len(words) == 1:
        args = words[0].split(b" ")
    wanted = os.fsencode(mountpoint)
    return any(a == wanted or a.endswith(b"=" + wanted) for a in args)


def take_fuse_fd(pid: int) -> int | None:
    """A duplicate of the /dev/fuse descriptor of daemon `pid` (pidfd_getfd), so a mountd
    that adopts a running daemon keeps its connection too; None if it has none."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") == "/dev/fuse":
                return pidfd_getfd(pid, int(name))
    return None


def pidfd_getfd(pid: int, fd: int) -> int | None:
    import ctypes

    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        got = libc.syscall(PIDFD_GETFD, pidfd, fd, 0)  # the new fd is close-on-exec
        return got if got >= 0 else None
    finally:
        os.close(pidfd)
