"""The /dev/fuse descriptor mountd keeps for a key, held by a small child process.

The kernel keeps a FUSE connection while any process holds its descriptor, which is what
lets a new daemon take a dead one's mount over. mountd itself must not be that process: a
thread of mountd waiting on a request the dead daemon had already read (the health check's
statfs, a bind's lookup) waits uninterruptibly until it is answered or the connection
ends. When mountd's container is killed (cgroup.kill: mountd and its daemons at once) that
thread would wait for an answer nobody can give, mountd could never finish exiting, so it
would never close the descriptor that keeps the connection: mountd and every pod's call on
that mount stuck for good. A holder that never touches a mount dies at once; the last
descriptor goes, the kernel ends the connection (pods see ENOTCONN, the mount can be
replaced) and mountd's waiting thread is released with it.

mountd takes a duplicate (pidfd_getfd) only for the moment it needs one: to hand it to a
daemon, or to the engine's client asking for it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess

from fusecsi.mountd.daemons import pidfd_getfd

# holds what it inherited until mountd's main thread exits (the death signal: mountd's
# threads waiting on a mount may outlive it, never the holder) or its stdin, a pipe from
# mountd, ends (a mountd that died before the death signal was set). Spawned from mountd's
# main thread (trio's), whose exit is mountd's; the daemons hold their own descriptors.
HOLD = ["setpriv", "--pdeathsig", "KILL", "--", "/bin/sh", "-c", "read _ || exit 0"]


class Kept:
    """One kept connection: a holder process and the number of the descriptor in it."""

    def __init__(self, proc: subprocess.Popen, fd_number: int, pipe: int) -> None:
        self._proc, self._fd_number, self._pipe = proc, fd_number, pipe

    @classmethod
    def hold(cls, fd: int) -> Kept:
        """Give `fd` to a new holder (the caller still closes its own copy)."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            proc = subprocess.Popen(
                HOLD,
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(fd,),
                env={"PATH": "/usr/bin:/bin"},
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        return cls(proc, fd, write_end)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def take(self) -> int:
        """A duplicate of the kept descriptor in mountd (close-on-exec); the caller closes
        it as soon as it has passed it on. ESRCH when the holder is gone."""
        fd = pidfd_getfd(self._proc.pid, self._fd_number) if self.alive() else None
        if fd is None:
            raise OSError(errno.ESRCH, "the holder of the kept FUSE descriptor is gone")
        return fd

    def close(self) -> None:
        """Let the connection go (it ends with the last daemon holding it)."""
        with contextlib.suppress(OSError):
            os.close(self._pipe)
        with contextlib.suppress(OSError):
            self._proc.kill()
        self._proc.wait()


def hold(fd: int) -> Kept:
    """Give `fd` to a holder and close mountd's copy."""
    try:
        return Kept.hold(fd)
    finally:
        os.close(fd)
