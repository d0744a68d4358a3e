"""mountd's side of JuiceFS's descriptor passing (fusecsi/mountd/fdpass.py), with a client
written here from the protocol: a fresh client is offered only a placeholder and hands its
descriptor back; a later one is offered the kept descriptor and setting; CLOSE and hang-ups
change nothing; a restarted mountd finds the setting again."""

from __future__ import annotations

import array
import os
import shutil
import socket
import tempfile

import trio

from fusecsi.mountd import fdpass
from fusecsi.mountd.keystate import KeyState

SETTING = b"\x68\x00\x00\x00kernel-init-parameters"


def connect(path: str) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(path)
    return client


def receive(client: socket.socket) -> tuple[bytes, list[int]]:
    message, fds, _, _ = socket.recv_fds(client, 4096, 4)
    return message, fds


def send(client: socket.socket, message: bytes, fd: int) -> None:
    client.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def send_null(client: socket.socket, message: bytes) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        send(client, message, null)
    finally:
        os.close(null)


def target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def same_file(a: int, b: int) -> bool:
    """Whether two descriptors are one open file description (kcmp, as root may)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    kcmp = 312 if os.uname().machine == "x86_64" else 272
    return libc.syscall(kcmp, os.getpid(), os.getpid(), 0, a, b) == 0  # KCMP_FILE


def exchange(path: str, answer) -> tuple[bytes, list[int]]:
    """One client visit: what it was offered (the caller closes those), after answering."""
    with connect(path) as client:
        message, fds = receive(client)
        answer(client)
    return message, fds


async def test_the_descriptor_is_kept_and_offered_to_the_next_client():
    # short: a socket's path must fit a sockaddr_un (108 bytes)
    base = tempfile.mkdtemp(prefix="fdp-", dir="/tmp")
    conn_dir = os.path.join(base, "c")
    state = KeyState()
    server = fdpass.FdServer("k", conn_dir, state)
    fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)  # any /dev/fuse stands for a mount
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            path = fdpass.socket_path(conn_dir)
            server.expect()

            # a fresh client: a placeholder only; it mounts and hands its descriptor back
            offered, fds = await trio.to_thread.run_sync(exchange, path, lambda c: None)
            assert offered == fdpass.NO_SETTING and len(fds) == 1 and target(fds[0]) != "/dev/fuse"
            os.close(fds[0])
            assert state.conn is None
            offered, fds = await trio.to_thread.run_sync(
                exchange, path, lambda c: send(c, SETTING, fuse)
            )
            for fd in fds:
                os.close(fd)
            assert await server.wait_sent()
            # kept by a holder process, not by mountd (keeper.py)
            held = state.conn.take()
            assert same_file(held, fuse) and state.conn.pid != os.getpid()
            os.close(held)
            assert fdpass.read_setting(conn_dir) == SETTING

            # the next client is offered that descriptor and setting; CLOSE changes nothing
            kept = state.conn
            offered, fds = await trio.to_thread.run_sync(
                exchange, path, lambda c: send_null(c, fdpass.CLOSE)
            )
            assert offered == SETTING and len(fds) == 2 and same_file(fds[1], fuse)
            for fd in fds:
                os.close(fd)
            # a client that hangs up without answering changes nothing either
            offered, fds = await trio.to_thread.run_sync(exchange, path, lambda c: None)
            for fd in fds:
                os.close(fd)
            await trio.sleep(0.1)
            assert state.conn is kept

            # something that is no /dev/fuse is not kept
            offered, fds = await trio.to_thread.run_sync(
                exchange, path, lambda c: send_null(c, SETTING)
            )
            for fd in fds:
                os.close(fd)
            await trio.sleep(0.1)
            assert state.conn is kept
            server.close()
        # the listener is gone with its socket; a later mountd finds the setting
        assert fdpass.SOCKET not in os.listdir(conn_dir)
        assert fdpass.FdServer("k", conn_dir, KeyState()).setting == SETTING
        fdpass.forget(conn_dir)
        assert fdpass.read_setting(conn_dir) is None
    finally:
        os.close(fuse)
        if state.conn is not None:
            state.conn.close()
        shutil.rmtree(base, ignore_errors=True)
