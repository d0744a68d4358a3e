"""Client connections per server address, opened on demand and replaced when they break."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import trio

from fusecsi.rpc.connection import Connection, connect
from fusecsi.rpc.errors import RPCUnavailable
from fusecsi.rpc.framing import DEFAULT_MAX_FRAME
from fusecsi.rpc.server import REUSE_IDLE

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
