"""Keeping the /dev/fuse descriptor of a daemon whose client passes it (JuiceFS).

A JuiceFS mount process started with `_FUSE_FD_COMM=<socket>` dials that socket before it
mounts. Whoever listens there sends one message: "setting" bytes (the kernel's INIT
parameters the connection was negotiated with; b"FUSE" while none are known) with
SCM_RIGHTS descriptors [placeholder] or [placeholder, fuse fd]. The client closes the
placeholder. Given a fuse fd it serves that connection as it is (no mount, no INIT);
given none it mounts by itself and then dials again to send back (its setting, its fuse
fd) for the listener to keep. A client that only wants to drop a descriptor it was given
answers b"CLOSE" with a throwaway one; some hang up without answering.

mountd listens per key on `<connection dir>/fd.sock` and keeps what it is sent as the key's
connection (KeyState.conn, held by keeper.py) and its setting (in memory and in `<connection dir>/setting`,
for a restarted mountd): while mountd holds it, a dead daemon's mount waits for the next one,
which is handed the same descriptor. Unlike JuiceFS's own supervisor, mountd keeps its copy
after handing it out: the mount must outlive every daemon, not pass from one to the next.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket

import trio

from fusecsi.logs import fields
from fusecsi.mountd import keeper
from fusecsi.mountd.keystate import KeyState

log = logging.getLogger(__name__)

SOCKET = "fd.sock"
SETTING_FILE = "setting"
# a successor's handle state (JuiceFS reads it from `_FUSE_STATE_PATH`)
STATE_FILE = "state.json"
NO_SETTING = b"FUSE"
CLOSE = b"CLOSE"
MAX_MESSAGE = 4096
MAX_FDS = 4
# a client answers at once, or hangs up: a silent one is dropped after this long
ANSWER_TIMEOUT = 10.0
# how long a fresh daemon may take to send its descriptor once its mount is up
SEND_TIMEOUT = 10.0


def socket_path(conn_dir: str) -> str:
    return os.path.join(conn_dir, SOCKET)


def read_setting(conn_dir: str) -> bytes | None:
    """The setting a daemon sent to an earlier mountd; None if none was kept."""
    try:
        with open(os.path.join(conn_dir, SETTING_FILE), "rb") as f:
            return f.read() or None
    except FileNotFoundError:
        return None


def forget(conn_dir: str) -> None:
    """A new connection: nothing of an older one (setting, handle state) may be used."""
    for name in (SETTING_FILE, STATE_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(conn_dir, name))


def _save_setting(conn_dir: str, setting: bytes) -> None:
    tmp = os.path.join(conn_dir, SETTING_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, setting)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(conn_dir, SETTING_FILE))


def _is_fuse(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "/dev/fuse"
    except OSError:
        return False


class FdServer:
    """The listener of one key; `run` in a nursery, `close` (or cancelling it) ends it."""

    def __init__(self, key_id: str, conn_dir: str, state: KeyState) -> None:
        self.key_id = key_id
        self.conn_dir = conn_dir
        self.state = state
        self.setting = read_setting(conn_dir) or NO_SETTING
        self.received = trio.Event()  # a descriptor arrived since the last `expect`
        self._scope = trio.CancelScope()

    def expect(self) -> None:
        """A daemon is about to start: wait (in `wait_sent`) for what it sends from now."""
        self.received = trio.Event()

    def reset(self) -> None:
        """The connection is new (the daemon mounts by itself): its setting is unknown."""
        self.setting = NO_SETTING
        forget(self.conn_dir)

    async def wait_sent(self) -> bool:
        with trio.move_on_after(SEND_TIMEOUT):
            await self.received.wait()
        return self.received.is_set()

    def close(self) -> None:
        self._scope.cancel()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            os.makedirs(self.conn_dir, mode=0o700, exist_ok=True)
            path = socket_path(self.conn_dir)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # an earlier mountd's
            listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await listener.bind(path)
                listener.listen(8)
                task_status.started()
                async with trio.open_nursery() as nursery:
                    while True:
                        try:
                            conn, _ = await listener.accept()
                        except OSError as exc:  # out of descriptors, say: not fatal
                            log.warning(
                                "accept failed", extra=fields(key_id=self.key_id, error=str(exc))
                            )
                            await trio.sleep(0.5)
                            continue
                        nursery.start_soon(self._serve, conn)
            finally:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def _serve(self, conn) -> None:
        with conn:
            try:
                with trio.move_on_after(ANSWER_TIMEOUT):
                    await self._offer(conn)
                    await self._take(conn)
            except OSError as exc:
                log.warning(
                    "descriptor exchange failed", extra=fields(key_id=self.key_id, error=str(exc))
                )

    async def _offer(self, conn) -> None:
        """The setting and [placeholder, kept descriptor if any]."""
        # duplicates: the kept descriptor may be replaced while the send waits
        fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)]
        try:
            if self.state.conn is not None:
                fds.append(self.state.conn.take())
            rights = array.array("i", fds).tobytes()
            await conn.sendmsg([self.setting], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        finally:
            for fd in fds:
                os.close(fd)

    async def _take(self, conn) -> None:
        """The client's answer: its descriptor and setting, or CLOSE, or nothing."""
        message, ancillary, _, _ = await conn.recvmsg(
            MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        fds = []
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                fds += array.array("i", data[:usable]).tolist()
        if message != CLOSE and message and len(fds) == 1 and _is_fuse(fds[0]):
            self._keep(fds.pop(), message)
        for fd in fds:
            os.close(fd)

    def _keep(self, fd: int, setting: bytes) -> None:
        """The daemon's connection becomes the key's (a duplicate of the one kept already,
        or a new connection of a daemon that mounted by itself: the old one is done)."""
        old, self.state.conn = self.state.conn, keeper.hold(fd)
        if old is not None:
            old.close()
        if setting != self.setting or read_setting(self.conn_dir) is None:
            self.setting = setting
            _save_setting(self.conn_dir, setting)
        self.received.set()
        log.info("kept the daemon's FUSE descriptor", extra=fields(key_id=self.key_id))
