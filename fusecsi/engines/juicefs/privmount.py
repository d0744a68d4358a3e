"""The controller's private mount of a whole JuiceFS filesystem.

JuiceFS creates directories and xattrs only through a client, so the controller holds one
`juicefs mount` per cluster under a fresh temp dir: started on first use, shared by every
namespace opened on that cluster within one trio run, stopped after `IDLE_SECONDS` without a
user and when the run ends (a system task owns it: the pool outlives any one request, never
the run). If the controller dies, the kernel sends the mount process SIGTERM (parent-death
signal) and JuiceFS unmounts itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field

import trio

from fusecsi.engines.base import Unreachable
from fusecsi.engines.juicefs.commands import environment, error_of
from fusecsi.engines.juicefs.metaurl import MetaURL
from fusecsi.engines.juicefs.node import FSTYPE, SERVE_DIRECTLY, mount_argv

log = logging.getLogger(__name__)

PREFIX = "fusecsi-juicefs-"
IDLE_SECONDS = 60.0
STOP_GRACE = 5.0
# fresh views: other clients (the nodes) change the tree under the controller
PRIVATE_ARGS = [
    "--no-bgjob",
    "--backup-meta=0",
    "--attr-cache=0",
    "--entry-cache=0",
    "--dir-entry-cache=0",
]
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _dying_with_us(argv: list[str]) -> list[str]:
    """argv run under util-linux's setpriv, which sets the parent-death signal and execs it
    (a preexec_fn would do the same, but is unsafe in a process with threads)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *argv] if setpriv else argv


def _open_private(path: str, mode: str):
    return open(path, mode, opener=lambda p, f: os.open(p, f, 0o600))


def _remove_unmounted(base: str) -> bool:
    """Remove a private mount's temp dir, but only once its mountpoint is an empty directory
    (never a tree of the filesystem through a mount that is still there)."""
    try:
        os.rmdir(os.path.join(base, "mnt"))  # EBUSY / ENOTEMPTY while anything is there
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("leaving %s: %s", base, exc.strerror)
        return False
    shutil.rmtree(base, ignore_errors=True)
    return True


def sweep_stale() -> None:
    """Remove the temp dirs of private mounts whose controller process is gone (killed: the
    parent-death signal made JuiceFS unmount, but the directory stayed)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        base = os.path.join(tmp, name)
        if not name.startswith(PREFIX) or os.path.islink(base):
            continue
        try:
            with open(os.path.join(base, "owner")) as f:
                owner = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue  # not ours or not written yet
        if owner == os.getpid() or os.path.exists(f"/proc/{owner}"):
            continue
        if mounted_fstype(os.path.join(base, "mnt")) is None:
            _remove_unmounted(base)


def mounted_fstype(path: str) -> str | None:
    """The fstype mounted at exactly `path` (the top of the stack), from mountinfo."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and fields[4] == path:
                found = right.split()[0]
    return found


@dataclass
class PrivateMount:
    meta: MetaURL
    base: str = ""
    process: trio.Process | None = None
    users: int = 0
    last_used: float = 0.0
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def root(self) -> str:
        return os.path.join(self.base, "mnt")

    def alive(self) -> bool:
        return (
            self.process is not None
            and self.process.returncode is None
            and mounted_fstype(self.root) == FSTYPE
        )

    async def start(self, seconds: float) -> None:
        sweep_stale()
        self.base = tempfile.mkdtemp(prefix=PREFIX)
        with _open_private(os.path.join(self.base, "owner"), "w") as f:
            f.write(str(os.getpid()))
        os.mkdir(self.root, 0o700)
        log_path = os.path.join(self.base, "mount.log")
        argv = mount_argv(self.meta, "/", self.root, os.path.join(self.base, "cache"), [])
        with _open_private(log_path, "wb") as log_file:
            self.process = await trio.lowlevel.open_process(
                _dying_with_us(argv + PRIVATE_ARGS),
                env={**environment(self.meta), **SERVE_DIRECTLY},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        try:
            with trio.fail_after(seconds):
                while mounted_fstype(self.root) != FSTYPE:
                    if self.process.returncode is not None:
                        with _open_private(log_path, "rb") as f:
                            raise error_of("mount", f.read(), self.meta.public)
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            await self.stop()
            raise Unreachable(
                f"JuiceFS {self.meta.public}: the controller's mount was not ready "
                f"within {seconds:g}s"
            ) from None
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Unmount and remove the temp dir; never removes anything still mounted."""
        with trio.CancelScope(shield=True):
            process, self.process = self.process, None
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)  # juicefs unmounts and exits
                with trio.move_on_after(STOP_GRACE):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            if not self.base:
                return
            if mounted_fstype(self.root) is not None:
                if _libc.umount2(self.root.encode(), _MNT_DETACH) != 0:
                    code = ctypes.get_errno()
                    log.warning("leaving %s: umount: %s", self.base, os.strerror(code))
                    return
            if _remove_unmounted(self.base):
                self.base = ""


_POOL: trio.lowlevel.RunVar = trio.lowlevel.RunVar("fusecsi_juicefs_private_mounts")


def _pool() -> dict[tuple[str, str], PrivateMount]:
    try:
        return _POOL.get()
    except LookupError:
        pool: dict[tuple[str, str], PrivateMount] = {}
        _POOL.set(pool)
        return pool


async def _reaper(key: tuple[str, str], mount: PrivateMount) -> None:
    """Stops `mount` once idle, or when the run ends (a system task, so cancelled last)."""
    try:
        while True:
            await trio.sleep(max(0.05, mount.last_used + IDLE_SECONDS - trio.current_time()))
            if mount.users == 0 and trio.current_time() - mount.last_used >= IDLE_SECONDS:
                async with mount.lock:
                    if mount.users == 0:
                        break
    except trio.Cancelled:
        pass
    except Exception:  # a system task must not raise: it would crash the run
        log.exception("JuiceFS private mount reaper failed")
    finally:
        with trio.CancelScope(shield=True):
            _pool().pop(key, None)
            try:
                await mount.stop()
            except Exception:
                log.exception("stopping the JuiceFS private mount failed")


async def acquire(meta: MetaURL, *, seconds: float) -> PrivateMount:
    """The running private mount of `meta`'s filesystem, counted as used until `release`."""
    key = (meta.public, hashlib.sha256(meta.password.encode()).hexdigest())
    pool = _pool()
    mount = pool.get(key)
    if mount is None:
        mount = pool[key] = PrivateMount(meta)
        mount.last_used = trio.current_time()
        trio.lowlevel.spawn_system_task(_reaper, key, mount)
    mount.users += 1
    try:
        async with mount.lock:
            if not mount.alive():
                await mount.stop()
                await mount.start(seconds)
    except BaseException:
        release(mount)
        raise
    return mount


def release(mount: PrivateMount) -> None:
    mount.users -= 1
    mount.last_used = trio.current_time()
