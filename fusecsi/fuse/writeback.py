"""Write-back buffering: many FUSE writes become few large writes to the workers.

One buffer per open inode collects contiguous writes and sends them once `limit` bytes
have gathered (cut at multiples of `limit`, so sends line up with cluster blocks when the
block size is a multiple of it). One send is in flight while the next buffer fills, which
overlaps the network with the kernel's next request. A failed send (EDQUOT, ENOSPC, EIO)
is remembered and reported by the next write, flush or fsync: data the application was
told is written may then be lost, exactly as with any write-back cache, which is why
fsync and close wait for everything.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio
from pyfuse3 import FUSEError

log = logging.getLogger(__name__)

SendFn = Callable[[int, bytes], Awaitable[None]]


class WriteBuffer:
    __slots__ = (
        "size",
        "dirty",
        "_send_fn",
        "_limit",
        "_spawn",
        "_start",
        "_chunks",
        "_len",
        "_inflight",
        "_error",
        "_lock",
    )

    def __init__(self, send: SendFn, limit: int, spawn, size: int) -> None:
        self.size = size  # the file's length as this mount sees it
        self.dirty = False  # written since the last commit
        self._send_fn = send
        self._limit = limit
        self._spawn = spawn  # nursery.start_soon of the daemon
        self._start = 0
        self._chunks: list[bytes] = []
        self._len = 0
        self._inflight: trio.Event | None = None
        self._error: FUSEError | None = None
        self._lock = trio.Lock()

    @property
    def pending(self) -> bool:
        return bool(self._len) or self._inflight is not None

    async def write(self, offset: int, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        async with self._lock:
            if self._len and offset != self._start + self._len:
                await self._send_buffered()
            if not self._len:
                self._start = offset
            self._chunks.append(data)
            self._len += len(data)
            self.dirty = True
            end = offset + len(data)
            if end > self.size:
                self.size = end
            while self._len:
                boundary = (self._start // self._limit + 1) * self._limit
                if self._start + self._len < boundary:
                    break
                await self._send_buffered(boundary)

    async def drain(self) -> None:
        """Send everything buffered and wait for it; raise (once) the first failure."""
        async with self._lock:
            if self._len:
                await self._send_buffered()
            await self._wait_inflight()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def truncated(self, size: int) -> None:
        """The file was cut or extended to `size` (only after `drain`)."""
        self.size = size

    async def _wait_inflight(self) -> None:
        if self._inflight is not None:
            await self._inflight.wait()

    async def _send_buffered(self, cut: int | None = None) -> None:
        """Hand the buffer (up to offset `cut`) to a background send."""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        start = self._start
        keep = b""
        if cut is not None and start + len(data) > cut:
            split = cut - start
            data, keep = data[:split], data[split:]
        self._chunks = [keep] if keep else []
        self._len = len(keep)
        self._start = start + len(data)
        await self._wait_inflight()
        done = self._inflight = trio.Event()
        self._spawn(self._send, start, data, done)

    async def _send(self, start: int, data: bytes, done: trio.Event) -> None:
        try:
            await self._send_fn(start, data)
        except Exception as exc:
            if not isinstance(exc, FUSEError):
                log.exception("write to the cluster failed")
                exc = FUSEError(errno.EIO)
            if self._error is None:
                self._error = exc
        finally:
            if self._inflight is done:
                self._inflight = None
            done.set()
