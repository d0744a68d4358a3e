"""The worker's half of short-circuit I/O: it hands block descriptors to clients on its host.

The wire and the client's half are in fusecsi/cluster/shortcircuit.py.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from fusecsi.cluster.shortcircuit import Channel
from fusecsi.metrics import Tally

log = logging.getLogger("fusecsi.cluster.shortcircuit")

# on the worker: whether short-circuit I/O is in use at all (a worker on a node whose
# mounts never open anything here is not reachable from them, see the chart's
# mountd.workerSocketDirs)
LOCAL_OPENS = Tally(
    "fusecsi_worker_local_opens_total",
    "block files handed to clients on this host (short-circuit I/O), by mode and errno name",
    ["mode", "code"],
)


def _token_matches(args: list, token: str) -> bool:
    return (
        len(args) == 1
        and isinstance(args[0], str)
        and hmac.compare_digest(args[0].encode(), token.encode())
    )


Opener = Callable[[int, bool], Awaitable[tuple[int, int]]]


class LocalServer:
    """Hands block descriptors to clients on this host."""

    def __init__(self, worker_id: str, token: str | None, block_size, open_block: Opener):
        self.worker_id = worker_id
        self.token = token
        self.block_size = block_size  # a callable: the master may change it after start
        self.open_block = open_block

    async def serve(self, listener: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED):
        listener.setblocking(False)
        async with trio.open_nursery() as nursery:
            task_status.started()
            try:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(listener)
                        continue
                    except OSError as exc:  # out of descriptors: let some close
                        log.warning("local accept failed: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._connection, Channel(conn))
            finally:
                listener.close()

    async def _connection(self, channel: Channel) -> None:
        authed = self.token is None
        try:
            while True:
                message, fds = await channel.receive()
                for fd in fds:  # clients send none
                    os.close(fd)
                if not (isinstance(message, list) and len(message) == 2):
                    return
                method, args = message
                if not isinstance(args, list):
                    return
                if method == "hello":
                    if not authed and not _token_matches(args, self.token):
                        await channel.send([["EACCES", "bad token"], None])
                        return
                    authed = True
                    info = {"id": self.worker_id, "block_size": self.block_size()}
                    await channel.send([None, info])
                elif method == "open" and authed:
                    await self._open(channel, args)
                else:
                    await channel.send([["EPROTO", f"unexpected {method!r}"], None])
                    return
        except (EOFError, OSError):
            pass
        except Exception:  # a malformed message: drop this client, keep serving the others
            log.warning("dropping a local client", exc_info=True)
        finally:
            channel.close()

    async def _open(self, channel: Channel, args: list) -> None:
        mode = "write" if args[1:] == [True] else "read"
        try:
            if len(args) != 2 or not isinstance(args[1], bool):
                raise OSError(errno.EINVAL, "open(block_id, writable)")
            fds = await self.open_block(args[0], args[1])
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or errno.EIO, "EIO")
            LOCAL_OPENS.add(mode, name)
            await channel.send([[name, exc.strerror or str(exc)], None])
            return
        LOCAL_OPENS.add(mode, "OK")
        try:
            await channel.send([None, {"size": os.fstat(fds[0]).st_size}], fds)
        finally:
            for fd in fds:  # the client has its own copies now
                os.close(fd)
