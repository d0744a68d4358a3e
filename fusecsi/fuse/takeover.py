"""Serving a FUSE connection that outlives its daemon (takeover).

The kernel keeps a FUSE connection while any process holds its /dev/fuse descriptor. Its
owner (mountd, or a test) opens /dev/fuse, mounts with `fd=N` and reads the kernel's INIT
request, which it keeps in `<connection dir>/init`; each daemon it starts gets the same
descriptor (one open file description) and serves the same mount, so a dead daemon's mount
does not fail: requests wait for the next daemon.

libfuse must see an INIT before it serves anything, and the kernel sends INIT once. So a
daemon hands pyfuse3 `/dev/fd/N` where N is first one end of a socketpair holding the
recorded INIT; when libfuse processes it, it calls `Operations.init` (before replying), and
there N is replaced by the real descriptor (dup2). The reply then goes to the kernel: for
the first daemon it completes the handshake; for a later one its unique id was answered long
ago (ids are never reused), so the kernel refuses it with ENOENT and nothing changes. The
INIT is byte for byte the kernel's, so libfuse negotiates exactly what the kernel holds
(same libfuse and options). trio's next wait on N re-registers it (the socket's epoll entry
died with the socket).

Then the daemon asks the kernel to resend every request the dead daemon had read but not
answered (FUSE_NOTIFY_RESEND, Linux 6.9): they are served again, not left hanging. Before
that it has adopted the dead daemon's handles (handles.py) and replayed the writes it had
acknowledged but not committed (spool.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import shutil
import socket
import struct

import trio

from fusecsi.fuse.handlestore import HandleStore
from fusecsi.fuse.spool import SPOOL_DIR, SpoolDir

INIT_FILE = "init"
HANDLES_FILE = "handles"
FUSE_INIT = 26
NOTIFY_RESEND = 7
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOATIME = 0x1, 0x2, 0x4, 0x400
INIT_TIMEOUT = 5.0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2


def supported(release: str | None = None) -> bool:
    """Whether the kernel can resend what a dead daemon had read (Linux 6.9+)."""
    parts = (release or os.uname().release).split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (6, 9)
    except (IndexError, ValueError):
        return False


def mount(mountpoint: str, source: str, fstype: str, options: set[str], conn_dir: str) -> int:
    """Mount a FUSE connection at `mountpoint`, record its INIT in `conn_dir`; the descriptor.

    `options` are the daemon's libfuse options (kernel.fuse_options): the ones the kernel
    takes are passed on, the rest belong to libfuse.
    """
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = MS_NOSUID | MS_NODEV
        flags |= MS_NOATIME if "noatime" in options else 0
        flags |= MS_RDONLY if "ro" in options else 0
        data = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}"]
        data += sorted(o for o in options if o in ("default_permissions", "allow_other"))
        if _libc.mount(
            source.encode(), mountpoint.encode(), fstype.encode(), flags, ",".join(data).encode()
        ):
            code = ctypes.get_errno()
            raise OSError(code, f"mount {mountpoint}: {os.strerror(code)}")
        try:
            init = _read_init(fd)
            os.makedirs(conn_dir, mode=0o700, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # a new connection has no handles
                os.unlink(os.path.join(conn_dir, HANDLES_FILE))
            shutil.rmtree(os.path.join(conn_dir, SPOOL_DIR), ignore_errors=True)  # nor journals
            _write_atomic(os.path.join(conn_dir, INIT_FILE), init)
        except BaseException:
            _libc.umount2(mountpoint.encode(), MNT_DETACH)
            raise
        return fd
    except BaseException:
        os.close(fd)
        raise


def _read_init(fd: int) -> bytes:
    """The kernel queues INIT while mounting: it is there at once."""
    ready, _, _ = select.select([fd], [], [], INIT_TIMEOUT)
    if not ready:
        raise TimeoutError("the kernel sent no FUSE INIT")
    message = os.read(fd, 1 << 21)
    length, opcode = struct.unpack_from("<II", message)
    if opcode != FUSE_INIT or length != len(message):
        raise OSError(f"expected FUSE INIT from the kernel, got opcode {opcode}")
    return message


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Takeover:
    """Hands pyfuse3 a recorded INIT, then the connection (see the module docstring)."""

    def __init__(self, fuse_fd: int, conn_dir: str) -> None:
        with open(os.path.join(conn_dir, INIT_FILE), "rb") as f:
            init = f.read()
        self.fuse_fd = fuse_fd
        self.conn_dir = conn_dir
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ours.send(init)
        self.session_fd = self._theirs.fileno()
        self.attached = trio.Event()

    @property
    def mountpoint(self) -> str:
        """What to give pyfuse3.init instead of the mountpoint."""
        return f"/dev/fd/{self.session_fd}"

    def attach(self) -> None:
        """Called by libfuse's INIT (Operations.init), before it replies: the session's
        descriptor becomes the connection."""
        self._theirs.detach()  # the number is libfuse's; dup2 makes it name the connection
        os.dup2(self.fuse_fd, self.session_fd, inheritable=False)
        os.close(self.fuse_fd)
        self._ours.close()
        self.fuse_fd = self.session_fd
        self.attached.set()

    def resend(self) -> None:
        """Ask the kernel to send again what a dead daemon had read but not answered."""
        header = struct.pack("<IiQ", 16, NOTIFY_RESEND, 0)
        try:
            os.write(self.fuse_fd, header)
        except OSError as exc:
            raise OSError(exc.errno, f"FUSE_NOTIFY_RESEND refused: {exc.strerror}") from exc


def handle_store(conn_dir: str) -> HandleStore:
    return HandleStore(os.path.join(conn_dir, HANDLES_FILE))


def spool_dir(conn_dir: str) -> SpoolDir:
    """The journals of acknowledged writes not yet committed (spool.py)."""
    return SpoolDir(os.path.join(conn_dir, SPOOL_DIR))
