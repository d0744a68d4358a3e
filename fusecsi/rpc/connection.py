"""One client connection: many calls in flight, replies matched by id."""

from __future__ import annotations

import errno
import math
from typing import Any

import outcome
import trio

from fusecsi.metrics import Distribution
from fusecsi.rpc.addresses import open_socket, unreachable
from fusecsi.rpc.errors import ProtocolError, RPCError, RPCUnavailable
from fusecsi.rpc.framing import DEFAULT_MAX_FRAME, EXPIRE_INTERVAL, REPLY, REQUEST, FrameSocket

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
