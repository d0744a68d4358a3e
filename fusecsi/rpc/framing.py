"""Frames on a stream socket: a 4-byte big-endian length and a msgpack array.

Requests are `[0, id, method, args]`, replies `[1, id, error, result]`; a large bytes
value that ends a message is sent from the caller's buffer instead of being copied.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import struct
from typing import Any

import msgpack
import trio

from fusecsi.rpc.errors import ProtocolError, ReadTimeout, RPCError, RPCUnavailable

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
