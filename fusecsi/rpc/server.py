"""An RPC server: handlers by name, a token check (`hello`) first, limits against hostile
clients (docs/contracts.md, "Hostile clients").

Handlers are a table {name: callable}. A plain function runs inline in the connection's
reader (cheap lookups avoid a task per request); an `async def` runs as its own task, so a
slow call (a journal fsync, a disk write) never holds up the others on the connection.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import inspect
import logging
import math
import socket as stdsocket
from collections.abc import Callable, Mapping
from typing import Any

import trio

from fusecsi.metrics import Tally
from fusecsi.rpc.errors import ProtocolError, ReadTimeout, RPCError, error_payload
from fusecsi.rpc.framing import DEFAULT_MAX_FRAME, REPLY, REQUEST, FrameSocket

log = logging.getLogger("fusecsi.rpc")


Handler = Callable[..., Any]


# Defaults of a server's limits (docs/contracts.md, "Hostile clients").
HELLO_FRAME = 16 << 10  # the largest frame before hello(token) on a server with a token


HELLO_TIMEOUT = 10.0  # a new connection's first request (hello when there is a token)


IDLE_TIMEOUT = 600.0  # a connection with nothing in flight that sends nothing is closed


STALL_TIMEOUT = 60.0  # a frame begun must keep moving


# a client drops a pooled connection idle this long rather than race the server's close
REUSE_IDLE = IDLE_TIMEOUT - 60


MAX_CONNS = 4096


MAX_CONNS_PER_PEER = 1024


FD_RESERVE = 64  # descriptors kept for files, listeners and outgoing connections


def _fd_bound() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_CONNS if soft == resource.RLIM_INFINITY else max(16, soft - FD_RESERVE)


class _Throttled:
    """A warning logged at most once per `interval`, with how many were left out."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next = -math.inf
        self._skipped = 0

    def warn(self, message: str, *args: Any) -> None:
        now = trio.current_time()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            message += f" (and {self._skipped} more like it)"
        log.warning(message, *args)
        self._next, self._skipped = now + self.interval, 0


class Server:
    """Serves a handler table on listening sockets; one misbehaving peer affects only itself.

    Hostile peers cost little: a frame before hello(token) is at most HELLO_FRAME bytes and
    the first request must come within `hello_timeout`; a frame's announced length is never
    allocated up front; connections are bounded per peer address and in total (new ones
    beyond are closed at once); a connection idle for `idle_timeout` with nothing in flight,
    or silent for `stall_timeout` inside a frame, is closed.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        token: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        name: str = "rpc",
        max_conns: int = MAX_CONNS,
        max_conns_per_peer: int = MAX_CONNS_PER_PEER,
        hello_timeout: float = HELLO_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self.handlers = dict(handlers)
        self.is_async = {k: inspect.iscoroutinefunction(v) for k, v in self.handlers.items()}
        self.token = token
        self.max_frame = max_frame
        self.name = name
        self.max_conns = min(max_conns, _fd_bound())
        self.max_conns_per_peer = max_conns_per_peer
        self.hello_timeout = hello_timeout
        self.idle_timeout = idle_timeout
        self.stall_timeout = stall_timeout
        self.open_conns = 0
        self._per_peer: dict[str, int] = {}
        self._refusals = _Throttled()
        self._drops = _Throttled()
        # answers by (method, "OK" or errno name); methods nobody serves are not counted
        self.calls = Tally(
            f"fusecsi_{name}_rpcs_total", f"requests {name} answered", ["method", "code"]
        )

    async def serve(
        self,
        listener: trio.socket.SocketType | stdsocket.socket,
        *,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        if isinstance(listener, stdsocket.socket):
            listener = trio.socket.from_stdlib_socket(listener)
        listener.listen(512)
        with listener:
            await self._accept_loop(listener, task_status)

    async def _accept_loop(self, listener, task_status) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started(listener.getsockname())
            while True:
                try:
                    conn, addr = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self._refusals.warn("%s: accept failed: %s", self.name, exc)
                        await trio.sleep(0.1)
                        continue
                    raise
                # unix peers are all local (the socket's mode guards it): only the total counts
                peer = addr[0] if isinstance(addr, tuple) else ""
                if self.open_conns >= self.max_conns or (
                    peer and self._per_peer.get(peer, 0) >= self.max_conns_per_peer
                ):
                    conn.close()
                    self._refusals.warn(
                        "%s: connection from %s refused: %d open (limits %d, %d per peer)",
                        self.name,
                        peer or "a local peer",
                        self.open_conns,
                        self.max_conns,
                        self.max_conns_per_peer,
                    )
                    continue
                self.open_conns += 1
                self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
                nursery.start_soon(self._connection, conn, peer)

    async def _connection(self, sock: trio.socket.SocketType, peer: str) -> None:
        if sock.family in (stdsocket.AF_INET, stdsocket.AF_INET6):
            sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
        conn = FrameSocket(sock, self.max_frame)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.writer)
                try:
                    await self._read_loop(conn, nursery)
                except (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                except ReadTimeout as exc:
                    if not exc.idle:
                        self._drops.warn(
                            "%s: dropping connection from %s: %s", self.name, peer, exc
                        )
                except ProtocolError as exc:
                    self._drops.warn("%s: dropping connection from %s: %s", self.name, peer, exc)
                    await self._last_word(conn, 0, ["EPROTO", str(exc)])
                except Exception:
                    log.exception("%s: dropping connection after an internal error", self.name)
                nursery.cancel_scope.cancel()
        finally:
            conn.close()
            self.open_conns -= 1
            left = self._per_peer[peer] - 1
            if left:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]

    async def _last_word(self, conn: FrameSocket, req_id: Any, error: list) -> None:
        """Send one error reply and give it a moment to leave before the connection closes."""
        with contextlib.suppress(RPCError):
            conn.queue([REPLY, req_id, error, None])
        with trio.move_on_after(1):
            await conn.flush()

    async def _first_frame(self, conn: FrameSocket) -> Any:
        """The first request, within hello_timeout; only a small one before hello(token)."""
        limit = HELLO_FRAME if self.token is not None else self.max_frame
        with trio.move_on_after(self.hello_timeout):
            return await conn.read_frame(limit, stall=self.stall_timeout)
        raise ReadTimeout(idle=False)

    async def _read_loop(self, conn: FrameSocket, nursery: trio.Nursery) -> None:
        authed = self.token is None
        msg = await self._first_frame(conn)
        while True:
            if (
                not isinstance(msg, list)
                or len(msg) != 4
                or msg[0] != REQUEST
                or not isinstance(msg[2], str)
                or not isinstance(msg[3], list)
            ):
                raise ProtocolError("expected a request [0, id, method, args]")
            _, req_id, method, args = msg
            if method == "hello":
                ok = self.token is None or (
                    len(args) == 1
                    and isinstance(args[0], str)
                    and hmac.compare_digest(args[0].encode(), self.token.encode())
                )
                if not ok:
                    await self._last_word(
                        conn, req_id, ["EACCES", "authentication failed: bad token"]
                    )
                    return
                authed = True
                conn.queue([REPLY, req_id, None, True])
            elif not authed:
                await self._last_word(
                    conn, req_id, ["EACCES", "authentication required: send hello(token) first"]
                )
                return
            else:
                self._dispatch(conn, nursery, req_id, method, args)
            msg = await self._next_frame(conn)

    async def _next_frame(self, conn: FrameSocket) -> Any:
        while True:
            try:
                return await conn.read_frame(idle=self.idle_timeout, stall=self.stall_timeout)
            except ReadTimeout as exc:
                if not exc.idle or not conn.requests_running:
                    raise
                # quiet while its requests run (a long publish): not idle

    def _dispatch(self, conn: FrameSocket, nursery, req_id, method: str, args: list) -> None:
        handler = self.handlers.get(method)
        if handler is None:
            conn.queue([REPLY, req_id, ["ENOSYS", f"unknown method {method!r}"], None])
        elif self.is_async[method]:
            nursery.start_soon(self._call_async, conn, req_id, method, handler, args)
        else:
            try:
                result = handler(*args)
            except Exception as exc:
                self._reply_error(conn, req_id, method, exc)
            else:
                self._reply(conn, req_id, result, method)

    async def _call_async(self, conn, req_id, method, handler, args) -> None:
        conn.requests_running += 1
        try:
            result = await handler(*args)
        except Exception as exc:
            self._reply_error(conn, req_id, method, exc)
        else:
            self._reply(conn, req_id, result, method)
        finally:
            conn.requests_running -= 1

    def _reply(self, conn: FrameSocket, req_id, result, method) -> None:
        self.calls.add(method, "OK")
        if conn.closed:
            return
        try:
            conn.queue([REPLY, req_id, None, result])
        except Exception as exc:  # too large, or not serialisable
            self._reply_error(conn, req_id, method, exc)

    def _reply_error(self, conn: FrameSocket, req_id, method: str, exc: Exception) -> None:
        payload = error_payload(exc)
        self.calls.add(method, payload[0])
        if payload[0] == "EIO" and not isinstance(exc, OSError):
            log.exception("%s: %s failed", self.name, method)
        if not conn.closed:
            conn.queue([REPLY, req_id, payload, None])
