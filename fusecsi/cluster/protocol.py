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
        self._buf = bytearray(RECV_SIZE)
        self._start = 0
        self._end = 0
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._wake = trio.Event()
        self._drained = trio.Event()
        self.closed = False
        self._busy = False
        self._big = bytearray()

    # -- reading

    async def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            # compact: move the unread tail to the front
            tail = self._buf[self._start : self._end]
            self._buf[: len(tail)] = tail
            self._start, self._end = 0, len(tail)
        n = await self.sock.recv_into(memoryview(self._buf)[self._end :])
        if n == 0:
            raise EOFError
        self._end += n

    async def read_frame(self) -> Any:
        """The next message, EOFError at a clean end, ProtocolError for a bad frame."""
        while self._end - self._start < HEADER.size:
            await self._fill()
        (length,) = HEADER.unpack_from(self._buf, self._start)
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        self._start += HEADER.size
        have = self._end - self._start
        if length <= len(self._buf) // 2 or have >= length:
            while self._end - self._start < length:
                await self._fill()
            view = memoryview(self._buf)[self._start : self._start + length]
            self._start += length
            try:
                return unpack_frame(view)
            except Exception as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from None
            finally:
                view.release()
        # a large frame: receive it straight into a buffer kept for the next one (unpacking
        # copies `bin` values out, so the buffer is free again once this frame is decoded)
        if length > KEEP_BUFFER:
            big = bytearray(length)
        else:
            if len(self._big) < length:
                self._big = bytearray(max(length, 2 * len(self._big)))
            big = self._big
        with memoryview(big) as whole, whole[:length] as view:
            view[:have] = memoryview(self._buf)[self._start : self._end]
            self._start = self._end = 0
            got = have
            while got < length:
                n = await self.sock.recv_into(view[got:], length - got)
                if n == 0:
                    raise EOFError
                got += n
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


class Server:
    """Serves a handler table on listening sockets; one misbehaving peer affects only itself."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        token: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        name: str = "rpc",
    ) -> None:
        self.handlers = dict(handlers)
        self.is_async = {k: inspect.iscoroutinefunction(v) for k, v in self.handlers.items()}
        self.token = token
        self.max_frame = max_frame
        self.name = name
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
                    conn, _ = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("accept failed: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    raise
                nursery.start_soon(self._connection, conn)

    async def _connection(self, sock: trio.socket.SocketType) -> None:
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
                except ProtocolError as exc:
                    log.warning("%s: dropping connection: %s", self.name, exc)
                    await self._last_word(conn, 0, ["EPROTO", str(exc)])
                except Exception:
                    log.exception("%s: dropping connection after an internal error", self.name)
                nursery.cancel_scope.cancel()
        finally:
            conn.close()

    async def _last_word(self, conn: FrameSocket, req_id: Any, error: list) -> None:
        """Send one error reply and give it a moment to leave before the connection closes."""
        with contextlib.suppress(RPCError):
            conn.queue([REPLY, req_id, error, None])
        with trio.move_on_after(1):
            await conn.flush()

    async def _read_loop(self, conn: FrameSocket, nursery: trio.Nursery) -> None:
        authed = self.token is None
        handlers, is_async = self.handlers, self.is_async
        while True:
            msg = await conn.read_frame()
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
                continue
            if not authed:
                await self._last_word(
                    conn, req_id, ["EACCES", "authentication required: send hello(token) first"]
                )
                return
            handler = handlers.get(method)
            if handler is None:
                conn.queue([REPLY, req_id, ["ENOSYS", f"unknown method {method!r}"], None])
            elif is_async[method]:
                nursery.start_soon(self._call_async, conn, req_id, method, handler, args)
            else:
                try:
                    result = handler(*args)
                except Exception as exc:
                    self._reply_error(conn, req_id, method, exc)
                else:
                    self._reply(conn, req_id, result, method)

    async def _call_async(self, conn, req_id, method, handler, args) -> None:
        try:
            result = await handler(*args)
        except Exception as exc:
            self._reply_error(conn, req_id, method, exc)
        else:
            self._reply(conn, req_id, result, method)

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
    return host, int(port) if port else default_port


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
        return RPCUnavailable(errno.ECONNRESET, f"connection to {self.address} lost: {exc}")

    async def call(self, method: str, *args: Any, deadline: float = math.inf) -> Any:
        """Send a request and wait for its reply; RPCUnavailable(ETIMEDOUT) after `deadline`
        (trio clock)."""
        if not self.usable:
            raise self._unavailable()
        self._next_id += 1
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
        raise RPCUnavailable(errno.ECONNREFUSED, f"cannot connect to {address}: {exc}") from None
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
                exc = RPCUnavailable(errno.ETIMEDOUT, f"{method} on {address} timed out")
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
            raise RPCUnavailable(
                errno.ECONNREFUSED, f"cannot connect to {address}: {exc}"
            ) from None
        calls = ([["hello", [token]]] if token is not None else []) + [[method, list(args)]]
        sock.sendall(b"".join(encode([REQUEST, i + 1, m, a]) for i, (m, a) in enumerate(calls)))
        result = None
        for _ in calls:
            (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
            _, _, err, result = unpack_frame(_recv_exact(sock, length))
            if err is not None:
                raise RPCError(str(err[0]), str(err[1]))
        return result
    except (TimeoutError, EOFError, ConnectionError) as exc:
        raise RPCUnavailable(errno.ETIMEDOUT, f"{method} on {address}: {exc}") from None
    finally:
        sock.close()
