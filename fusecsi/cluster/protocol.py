"""msgpack-RPC over stream sockets (TCP or unix): framing, a server, a multiplexed client.

A frame is a 4-byte big-endian length and a msgpack array:
  request  [0, id, method, args]        reply [1, id, error, result]
`error` is None or [errno name, message]. Ids are chosen by the caller; many requests may be
in flight on one connection and replies come back in any order. Bulk data travels as msgpack
`bin`. When the server has a token, the first request must be `hello(token)`; anything else
(or a wrong token) is refused with EACCES and the connection is closed.

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
import mmap
import os
import socket as stdsocket
import struct
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import outcome
import trio

from fusecsi.metrics import Distribution, Tally

log = logging.getLogger(__name__)

REQUEST, REPLY = 0, 1
HEADER = struct.Struct(">I")
BIN32 = struct.Struct(">BI")
DEFAULT_MAX_FRAME = 64 << 20
RECV_SIZE = 256 << 10
# a connection's receive buffer starts this small and grows only with bytes that arrived,
# so an idle or hostile connection costs a few KiB, not RECV_SIZE
INITIAL_RECV = 4 << 10
# Frames above this go out on their own instead of being joined with their neighbours.
JOIN_LIMIT = 64 << 10
HIGH_WATER = 16 << 20
EXPIRE_INTERVAL = 0.25
KEEP_BUFFER = 16 << 20  # receive buffers up to this size are kept for the next large frame

_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def unpack_frame(data) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)


class RPCError(OSError):
    """An error with an errno, raised by a handler or received from the other side."""

    def __init__(self, code: int | str, message: str = "") -> None:
        if isinstance(code, str):
            code = getattr(errno, code, errno.EIO) if code.isupper() else errno.EIO
        super().__init__(code, message or errno.errorcode.get(code, "error"))

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno, "EIO")


class RPCUnavailable(RPCError):
    """No connection could be made or kept (ECONNREFUSED) or no reply came (ETIMEDOUT)."""


class ForeignCluster(RPCError):
    """A server that belongs to another cluster than the one first seen (ESTALE)."""


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame: the connection is dropped."""


class ReadTimeout(Exception):
    """No frame within the time given: `idle` when not a byte of one had arrived."""

    def __init__(self, idle: bool) -> None:
        super().__init__("idle" if idle else "stalled in the middle of a frame")
        self.idle = idle


def error_payload(exc: BaseException) -> list:
    if isinstance(exc, OSError) and exc.errno:
        name = errno.errorcode.get(exc.errno, "EIO")
        return [name, str(exc.strerror or exc)]
    if isinstance(exc, TypeError | ValueError | KeyError | IndexError):
        return ["EINVAL", f"bad arguments: {exc}"]
    return ["EIO", f"internal error: {type(exc).__name__}"]


def encode(message: list) -> bytes:
    body = _pack(message)
    return HEADER.pack(len(body)) + body


def _bulk_tail(message: list):
    """The large bytes-like value that ends `message` (a request's last argument or a reply's
    result), if any: it is sent from the caller's buffer instead of being copied."""
    last = message[-1]
    if message[0] == REQUEST and isinstance(last, list) and last:
        last = last[-1]
    if isinstance(last, bytes | bytearray | memoryview):
        view = memoryview(last)
        if view.nbytes > JOIN_LIMIT:
            return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return None


def encode_pieces(message: list) -> tuple[list, int]:
    """The frame as pieces to send in order, and the body's size."""
    tail = _bulk_tail(message)
    if tail is None:
        body = _pack(message)
        return [HEADER.pack(len(body)) + body], len(body)
    if message[0] == REQUEST:
        stub = [*message[:-1], [*message[-1][:-1], b""]]
    else:
        stub = [*message[:-1], b""]
    # an empty bin packs as c4 00 at the very end: swap it for a bin32 header of the tail
    head = _pack(stub)[:-2] + BIN32.pack(0xC6, tail.nbytes)
    size = len(head) + tail.nbytes
    return [HEADER.pack(size) + head, tail], size


class FrameSocket:
    """One connected socket: frame reader plus a writer that coalesces queued frames."""

    def __init__(self, sock: trio.socket.SocketType, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.sock = sock
        self._fd = sock.fileno()
        self.max_frame = max_frame
        self._buf = bytearray(INITIAL_RECV)
        self._start = 0
        self._end = 0
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._wake = trio.Event()
        self._drained = trio.Event()
        self.closed = False
        self._busy = False
        self._big: mmap.mmap | None = None
        self.requests_running = 0  # (server side) async handlers still working for the peer
        # (cancel scope, seconds): the deadline moves by `seconds` whenever bytes arrive
        self._watch: tuple[trio.CancelScope, float] | None = None

    # -- reading

    async def _recv_into(self, view, nbytes: int = 0) -> int:
        n = await self.sock.recv_into(view, nbytes)
        if n == 0:
            raise EOFError
        if self._watch is not None:
            scope, stall = self._watch
            scope.deadline = trio.current_time() + stall
        return n

    async def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            tail = self._buf[self._start : self._end]
            if self._start == 0:
                # full of one unfinished frame: grow, by what arrived, up to RECV_SIZE
                self._buf = bytearray(min(RECV_SIZE, 2 * len(self._buf)))
            self._buf[: len(tail)] = tail  # compact: the unread tail to the front
            self._start, self._end = 0, len(tail)
        self._end += await self._recv_into(memoryview(self._buf)[self._end :])

    async def read_frame(
        self, limit: int | None = None, *, idle: float = math.inf, stall: float = math.inf
    ) -> Any:
        """The next message (frames above `limit`, default max_frame, are refused); EOFError
        at a clean end, ProtocolError for a bad frame, ReadTimeout when no byte came for
        `idle` seconds between frames or for `stall` seconds inside one."""
        limit = self.max_frame if limit is None else limit
        if idle == math.inf and stall == math.inf:
            return await self._read_frame(limit)
        with trio.CancelScope() as scope:
            waiting = self._start == self._end
            scope.deadline = trio.current_time() + (idle if waiting else stall)
            self._watch = (scope, stall)
            try:
                return await self._read_frame(limit)
            finally:
                self._watch = None
        # cancelled: no byte consumed from the buffer when it was idle, so reading again is safe
        raise ReadTimeout(idle=waiting and self._start == self._end == 0)

    async def _read_frame(self, limit: int) -> Any:
        while self._end - self._start < HEADER.size:
            await self._fill()
        (length,) = HEADER.unpack_from(self._buf, self._start)
        if length > limit:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
        have = self._end - self._start - HEADER.size
        if length <= RECV_SIZE // 2 or have >= length:
            while self._end - self._start < HEADER.size + length:
                await self._fill()
            self._start += HEADER.size
            view = memoryview(self._buf)[self._start : self._start + length]
            self._start += length
            try:
                return unpack_frame(view)
            except Exception as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from None
            finally:
                view.release()
        self._start += HEADER.size
        # a large frame: received into anonymous memory, whose pages are committed only as
        # bytes arrive (a peer announcing 64 MiB and sending nothing costs nothing); a buffer
        # up to KEEP_BUFFER is kept for the next large frame (unpacking copies `bin` values
        # out, so it is free again once this frame is decoded)
        if self._big is not None and len(self._big) >= length:
            big = self._big
        else:
            big = mmap.mmap(-1, length)
            if length <= KEEP_BUFFER:
                self._big = big
        with memoryview(big) as whole, whole[:length] as view:
            view[:have] = memoryview(self._buf)[self._start : self._end]
            self._start = self._end = 0
            got = have
            while got < length:
                got += await self._recv_into(view[got:], length - got)
            try:
                return unpack_frame(view)
            except Exception as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from None

    # -- writing

    def queue(self, message: list) -> None:
        if self.closed:
            raise RPCUnavailable(errno.ECONNRESET, "connection closed")
        pieces, size = encode_pieces(message)
        if size > self.max_frame:
            raise RPCError(errno.EMSGSIZE, f"message of {size} bytes exceeds the frame limit")
        if not self._out and not self._busy and len(pieces) == 1:
            # nothing queued ahead of it: hand it to the kernel now, without waking the
            # writer task (a small frame nearly always fits the socket buffer)
            piece = pieces[0]
            try:
                sent = os.write(self._fd, piece)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()  # the reader notices and ends the connection
                raise RPCUnavailable(errno.ECONNRESET, "connection closed") from None
            if sent == len(piece):
                return
            pieces = [memoryview(piece)[sent:]]
        self._out.extend(pieces)
        self._out_bytes += size
        self._wake.set()

    async def send(self, message: list) -> None:
        """Queue a message; wait while the queue is above the high-water mark."""
        self.queue(message)
        while self._out_bytes > HIGH_WATER and not self.closed:
            await self._drained.wait()

    async def flush(self) -> None:
        """Wait until everything queued so far has been handed to the kernel."""
        while (self._out or self._busy) and not self.closed:
            await self._drained.wait()

    async def writer(self) -> None:
        """Send queued frames, joining small ones; a send failure closes the socket."""
        try:
            while True:
                if not self._out:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                pieces, self._out = self._out, []
                self._out_bytes = 0
                self._busy = True
                batch: list[bytes] = []
                for piece in pieces:
                    if isinstance(piece, memoryview) or len(piece) > JOIN_LIMIT:
                        if batch:
                            await self._send_all(b"".join(batch))
                            batch = []
                        await self._send_all(piece)
                    else:
                        batch.append(piece)
                if batch:
                    await self._send_all(b"".join(batch) if len(batch) > 1 else batch[0])
                self._busy = False
                drained, self._drained = self._drained, trio.Event()
                drained.set()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.close()  # the reader notices and ends the connection
        finally:
            self.closed = True
            self._drained.set()

    async def _send_all(self, data) -> None:
        view = memoryview(data)
        total = view.nbytes
        sent = 0
        while sent < total:
            sent += await self.sock.send(view[sent:])

    def close(self) -> None:
        self.closed = True
        self._wake.set()
        self._drained.set()
        self.sock.close()


# ---------------------------------------------------------------- server

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


# ---------------------------------------------------------------- client


def parse_addr(addr: str, default_port: int) -> tuple[str, int]:
    """`host:port`, `host`, `[v6]:port` -> (host, port)."""
    addr = addr.strip()
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif addr.count(":") == 1:
        host, port = addr.split(":")
    else:
        host, port = addr, ""
    if not host:
        raise ValueError(f"address {addr!r} has no host")
    if not port:
        return host, default_port
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {addr!r}: port must be 0-65535")
    return host, int(port)


async def open_socket(address: str, default_port: int = 0) -> trio.socket.SocketType:
    """Connect to `unix:/path` / `unix:///path` or `host:port`."""
    if address.startswith("unix:"):
        path = address[len("unix://") :] if address.startswith("unix://") else address[5:]
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock
    host, port = parse_addr(address, default_port)
    infos = await trio.socket.getaddrinfo(host, port, type=stdsocket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            await sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(errno.ECONNREFUSED, f"cannot resolve {address}")


def unreachable(address: str, exc: OSError) -> RPCUnavailable:
    """ECONNREFUSED (what callers retry on) for any failed connect, with the reason in words:
    no such host, connection refused, or the system's text."""
    if isinstance(exc, stdsocket.gaierror):
        reason = f"no such host ({exc.strerror})"
    elif exc.errno == errno.ECONNREFUSED:
        reason = "connection refused"
    else:
        name = errno.errorcode.get(exc.errno or 0)
        reason = f"{name}: {exc.strerror}" if name else str(exc)
    return RPCUnavailable(errno.ECONNREFUSED, f"cannot connect to {address}: {reason}")


# Every call a client makes in this process, by method: a bisect and two list updates per
# reply. The FUSE daemon exports it as its cluster RPC latency.
CALL_SECONDS = Distribution(
    "fusecsi_cluster_call_seconds", "cluster RPC latency seen by this client", ["method"]
)


class Connection:
    """A client connection: many calls in flight, replies matched by id."""

    def __init__(self, sock: trio.socket.SocketType, address: str, max_frame: int) -> None:
        self.address = address
        self.frames = FrameSocket(sock, max_frame)
        self._next_id = 0
        # request id -> (waiting task, deadline, method)
        self._waiting: dict[int, tuple[trio.lowlevel.Task, float, str]] = {}
        self._calls_waiting = trio.Event()
        self.broken: BaseException | None = None
        self.cancel_scope = trio.CancelScope()
        self.last_call = trio.current_time()

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    @property
    def usable(self) -> bool:
        return self.broken is None and not self.frames.closed

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self.cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.frames.writer)
                nursery.start_soon(self._expire)
                task_status.started()
                try:
                    await self._read_loop()
                except (
                    EOFError,
                    OSError,
                    ProtocolError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                ) as exc:
                    self._fail(exc)
                nursery.cancel_scope.cancel()
        self._fail(EOFError("closed"))

    async def _read_loop(self) -> None:
        while True:
            msg = await self.frames.read_frame()
            if not isinstance(msg, list) or len(msg) != 4 or msg[0] != REPLY:
                raise ProtocolError("expected a reply [1, id, error, result]")
            _, req_id, err, result = msg
            waiter = self._waiting.pop(req_id, None)
            if waiter is None:
                if req_id == 0 and err:
                    # the server's last word before it hangs up
                    raise RPCError(str(err[0]), str(err[1]))
                continue
            if err is None:
                value = outcome.Value(result)
            else:
                value = outcome.Error(RPCError(str(err[0]), str(err[1])))
            trio.lowlevel.reschedule(waiter[0], value)

    async def _expire(self) -> None:
        """Fail calls whose deadline passed (cheaper than a cancel scope around every call;
        deadlines are kept to within EXPIRE_INTERVAL)."""
        while True:
            if not self._waiting:
                self._calls_waiting = trio.Event()
                await self._calls_waiting.wait()
            await trio.sleep(EXPIRE_INTERVAL)
            now = trio.current_time()
            late = [rid for rid, (_, deadline, _) in self._waiting.items() if deadline <= now]
            for rid in late:
                task, _, method = self._waiting.pop(rid)
                exc = RPCUnavailable(errno.ETIMEDOUT, f"{method} on {self.address} timed out")
                trio.lowlevel.reschedule(task, outcome.Error(exc))

    def _fail(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        self.frames.close()
        waiting, self._waiting = self._waiting, {}
        for task, _, _ in waiting.values():
            trio.lowlevel.reschedule(task, outcome.Error(self._unavailable()))

    def _unavailable(self) -> RPCError:
        exc = self.broken
        if isinstance(exc, RPCError):
            return exc
        if isinstance(exc, ProtocolError):
            # an HTTP, gRPC or TLS server answers with bytes that are no reply frame
            return RPCUnavailable(
                errno.EPROTO, f"{self.address} is not a fusecsi server (its answer: {exc})"
            )
        return RPCUnavailable(errno.ECONNRESET, f"connection to {self.address} lost: {exc}")

    async def call(self, method: str, *args: Any, deadline: float = math.inf) -> Any:
        """Send a request and wait for its reply; RPCUnavailable(ETIMEDOUT) after `deadline`
        (trio clock)."""
        if not self.usable:
            raise self._unavailable()
        self._next_id += 1
        self.last_call = trio.current_time()
        req_id = self._next_id
        self.frames.queue([REQUEST, req_id, method, list(args)])
        if not self._waiting:
            self._calls_waiting.set()
        self._waiting[req_id] = (trio.lowlevel.current_task(), deadline, method)

        def abort(_raise_cancel):
            self._waiting.pop(req_id, None)
            return trio.lowlevel.Abort.SUCCEEDED

        started = trio.current_time()
        try:
            return await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            CALL_SECONDS.observe(trio.current_time() - started, method)

    def close(self) -> None:
        self.cancel_scope.cancel()
        self._fail(EOFError("closed"))


async def connect(
    nursery: trio.Nursery,
    address: str,
    *,
    token: str | None = None,
    default_port: int = 0,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> Connection:
    """Open a connection whose reader runs in `nursery`; says hello when a token is given."""
    try:
        sock = await open_socket(address, default_port)
    except OSError as exc:
        raise unreachable(address, exc) from None
    conn = Connection(sock, address, max_frame)
    await nursery.start(conn.run)
    if token is not None:
        try:
            await conn.call("hello", token)
        except BaseException:
            conn.close()
            raise
    return conn


_UNLOCKED = trio.Lock()


class Pool:
    """Connections per server address, opened on demand, replaced when they break.

    A call that fails before its request could be sent is always retried; one whose
    connection broke after sending is retried only when the caller says it is idempotent.
    `on_connect(conn)` vets every new connection before its first call (it raises to refuse
    the server; the connection is then closed).
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        token: str | None = None,
        default_port: int = 0,
        max_conns: int = 4,
        timeout: float = 30.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        on_connect: Callable[[Connection], Any] | None = None,
    ) -> None:
        self.nursery = nursery
        self.on_connect = on_connect
        self.token = token
        self.default_port = default_port
        self.max_conns = max_conns
        self.timeout = timeout
        self.max_frame = max_frame
        self._conns: dict[str, list[Connection]] = {}
        self._locks: dict[str, trio.Lock] = {}

    def _pick(self, address: str) -> Connection | None:
        """An open connection to use now, or None when a new one should be opened."""
        conns = self._conns.get(address)
        if not conns:
            return None
        best = None
        for conn in conns:
            if not conn.usable:
                conns[:] = [c for c in conns if c.usable]
                return self._pick(address)
            if conn.in_flight == 0:
                if trio.current_time() - conn.last_call > REUSE_IDLE:
                    # the server closes it soon (IDLE_TIMEOUT): a request sent as it does
                    # would be lost, so a fresh connection takes it
                    conn.close()
                    continue
                return conn
            if best is None or conn.in_flight < best.in_flight:
                best = conn
        if len(conns) >= self.max_conns or self._locks.get(address, _UNLOCKED).locked():
            return best
        return None

    async def _open(self, address: str) -> Connection:
        lock = self._locks.setdefault(address, trio.Lock())
        async with lock:
            conn = self._pick(address)
            if conn is not None and conn.in_flight == 0:
                return conn
            conn = await connect(
                self.nursery,
                address,
                token=self.token,
                default_port=self.default_port,
                max_frame=self.max_frame,
            )
            if self.on_connect is not None:
                try:
                    await self.on_connect(conn)
                except BaseException:
                    conn.close()
                    raise
            self._conns.setdefault(address, []).append(conn)
            return conn

    async def call(
        self,
        address: str,
        method: str,
        *args: Any,
        idempotent: bool = False,
        time_limit: float | None = None,
    ) -> Any:
        """One call with a deadline; RPCUnavailable (with `.sent`) when the server is gone."""
        deadline = trio.current_time() + (self.timeout if time_limit is None else time_limit)
        attempt = 0
        while True:
            sent = False
            try:
                conn = self._pick(address)
                if conn is None:
                    with trio.fail_after(max(0.0, deadline - trio.current_time())):
                        conn = await self._open(address)
                sent = True
                return await conn.call(method, *args, deadline=deadline)
            except trio.TooSlowError:
                why = (
                    "timed out" if sent else "no answer to a new connection: not a fusecsi server?"
                )
                exc = RPCUnavailable(errno.ETIMEDOUT, f"{method} on {address}: {why}")
                exc.sent = sent
                raise exc from None
            except RPCUnavailable as exc:
                exc.sent = sent
                if (sent and not idempotent) or attempt >= 1 or exc.errno == errno.ETIMEDOUT:
                    raise
            attempt += 1

    def close(self) -> None:
        for conns in self._conns.values():
            for conn in conns:
                conn.close()
        self._conns.clear()


# ---------------------------------------------------------------- blocking helper


def _recv_exact(sock: stdsocket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def call_sync(
    address: str, method: str, *args: Any, token: str | None = None, timeout: float = 10.0
) -> Any:
    """One call on a fresh blocking connection: readiness probes and scripts outside trio."""
    if address.startswith("unix:"):
        path = address[len("unix://") :] if address.startswith("unix://") else address[5:]
        sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        sock.settimeout(timeout)
        target: Any = path
    else:
        host, port = parse_addr(address, 0)
        sock = stdsocket.socket(stdsocket.AF_INET6 if ":" in host else stdsocket.AF_INET)
        sock.settimeout(timeout)
        target = (host, port)
    try:
        try:
            sock.connect(target)
        except OSError as exc:
            raise unreachable(address, exc) from None
        calls = ([["hello", [token]]] if token is not None else []) + [[method, list(args)]]
        sock.sendall(b"".join(encode([REQUEST, i + 1, m, a]) for i, (m, a) in enumerate(calls)))
        result = None
        for _ in calls:
            (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
            try:
                if length > DEFAULT_MAX_FRAME:
                    raise ValueError(f"a frame of {length} bytes")
                _, _, err, result = unpack_frame(_recv_exact(sock, length))
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise RPCUnavailable(
                    errno.EPROTO, f"{address} is not a fusecsi server (its answer: {exc})"
                ) from None
            if err is not None:
                raise RPCError(str(err[0]), str(err[1]))
        return result
    except (TimeoutError, EOFError, ConnectionError) as exc:
        raise RPCUnavailable(errno.ETIMEDOUT, f"{method} on {address}: {exc}") from None
    finally:
        sock.close()
