"""A fault-injecting relay between a cluster client (the controller) and the master.

It speaks the framing of fusecsi/rpc/framing.py (4-byte length, msgpack
`[0, id, method, args]` / `[1, id, error, result]`) over real TCP on loopback and decides per
request: pass it on, hold it (the master never answers: the caller's timeout must fire), or
answer a chosen errno in the master's place without passing it on (so the cluster does not
change). `hello` (the token handshake) and the `cluster_info` a client asks first on every
new connection (to check the master's cluster id) always pass: they vet the connection and
are no step of the operation under test. A trio task in the test process; the
controller under test is a real process pointed at `proxy.address`.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import trio

from fusecsi.rpc.framing import HEADER, REPLY, REQUEST, encode, unpack_frame

HOLD = "hold"
# calls that change the namespace (the others only read, or wait for the journal)
MUTATING = {"mkvolume", "mkdirs", "setxattr", "removexattr", "set_quota", "remove_tree", "rename"}


class _Frames:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def read(self) -> bytes | None:
        """One whole frame (header included), None at the end of the stream."""
        while True:
            if len(self.buf) >= HEADER.size:
                (length,) = HEADER.unpack_from(self.buf)
                if len(self.buf) >= HEADER.size + length:
                    frame = bytes(self.buf[: HEADER.size + length])
                    del self.buf[: HEADER.size + length]
                    return frame
            data = await self.stream.receive_some(1 << 16)
            if not data:
                return None
            self.buf += data


@dataclass
class FaultProxy:
    master: str  # host:port of the real master
    calls: list[str] = field(default_factory=list)  # methods asked for since reset()
    forwarded: list[str] = field(default_factory=list)  # methods passed on since reset()
    address: str = ""
    _faults: dict[int, int] = field(default_factory=dict)  # call index -> errno
    _hold_from: int | None = None

    def reset(self) -> None:
        """No faults; forget the calls seen."""
        self.calls.clear()
        self.forwarded.clear()
        self._faults.clear()
        self._hold_from = None

    def fault_at(self, index: int, fault: int | str) -> None:
        """Call number `index` (from 0, since reset) gets `fault`: an errno answered in
        the master's place, or HOLD: it and every call after it are never answered."""
        if fault == HOLD:
            self._hold_from = index
        else:
            self._faults[index] = fault

    def changed_cluster(self) -> bool:
        return any(method in MUTATING for method in self.forwarded)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        host, port = self.master.rsplit(":", 1)
        async with client, await trio.open_tcp_stream(host, int(port)) as master:
            lock = trio.Lock()  # whole frames to the client, from both directions
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._replies, master, client, lock, nursery.cancel_scope)
                await self._requests(client, master, lock)
                nursery.cancel_scope.cancel()

    async def _requests(self, client, master, lock: trio.Lock) -> None:
        frames = _Frames(client)
        vetting = True  # until the first call that is neither hello nor the id check
        try:
            while (frame := await frames.read()) is not None:
                message = unpack_frame(frame[HEADER.size :])
                if message[0] != REQUEST or message[2] == "hello":
                    await master.send_all(frame)
                    continue
                if vetting and message[2] == "cluster_info":
                    await master.send_all(frame)
                    continue
                vetting = False
                index = len(self.calls)
                self.calls.append(message[2])
                if self._hold_from is not None and index >= self._hold_from:
                    continue  # never answered
                code = self._faults.get(index)
                if code is not None:
                    reply = [REPLY, message[1], [errno.errorcode[code], "injected"], None]
                    async with lock:
                        await client.send_all(encode(reply))
                    continue
                self.forwarded.append(message[2])
                await master.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _replies(self, master, client, lock: trio.Lock, scope: trio.CancelScope) -> None:
        frames = _Frames(master)
        try:
            while (frame := await frames.read()) is not None:
                async with lock:
                    await client.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # the master went away: so does the client's connection
