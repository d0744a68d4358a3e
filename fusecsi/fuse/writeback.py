"""Write-back buffering: many FUSE writes become few block-sized writes to the workers.

One buffer per open inode collects contiguous writes and hands them to the cluster client
once a piece reaches `limit` bytes, cut at multiples of `limit` (the cluster block size or
less), so every piece lands inside one block. The client sends pieces in the background
(a bounded window per client) and reports a failed one at the file's next write, read or
commit, so the kernel's next request is not held up by the network; this buffer adds no
second layer of background sends. A refused piece (EDQUOT, ENOSPC) fails the write that
completed it, or the flush/fsync/close that sends the remainder.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from fusecsi.locks import acquire

SendFn = Callable[[int, bytes], Awaitable[None]]


class WriteBuffer:
    __slots__ = (
        "size", "written", "committed", "sizing", "_send", "_limit", "_start", "_chunks", "_len",
        "_lock",
    )  # fmt: skip

    def __init__(self, send: SendFn, limit: int, size: int) -> None:
        self.size = size  # the file's length as this mount sees it
        # Writes are counted; `committed` is the count the last successful commit covered.
        # A commit in flight does not make the file clean: writes may land meanwhile, and
        # until the master has the length, only `size` is the truth.
        self.written = 0
        self.committed = 0
        self._send = send
        self._limit = limit
        self._start = 0
        self._chunks: list[bytes] = []
        self._len = 0
        self._lock = trio.Lock()  # pieces of one file go out in order
        # Held by a commit and by a truncate for their whole round trip: a commit that read
        # `size` before a truncate must not reach the master after it (the length would grow
        # back over the cut, as zeros).
        self.sizing = trio.Lock()

    async def write(self, offset: int, data: bytes) -> None:
        await acquire(self._lock)  # the kernel waits for this reply
        try:
            if self._len and offset != self._start + self._len:
                await self._send_buffered()
            if not self._len:
                self._start = offset
            self._chunks.append(data)
            self._len += len(data)
            self.written += 1
            while self._len:
                boundary = (self._start // self._limit + 1) * self._limit
                if self._start + self._len < boundary:
                    break
                await self._send_buffered(boundary)
            # only a write that did not fail may grow the file (the cluster client keeps the
            # loss of a failed one and publishes no length past it)
            self.size = max(self.size, offset + len(data))
        finally:
            self._lock.release()

    async def drain(self) -> None:
        """Hand everything buffered to the cluster client."""
        async with self._lock:
            if self._len:
                await self._send_buffered()

    @property
    def dirty(self) -> bool:
        """Written since the last successful commit."""
        return self.written != self.committed

    def truncated(self, size: int) -> None:
        """The file was cut or extended to `size` (only after `drain`)."""
        self.size = size
        self.committed = self.written

    async def _send_buffered(self, cut: int | None = None) -> None:
        """Send the buffer up to offset `cut` (all of it when None); keep the rest."""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        start = self._start
        keep = b""
        if cut is not None and start + len(data) > cut:
            split = cut - start
            data, keep = data[:split], data[split:]
        self._chunks = [keep] if keep else []
        self._len = len(keep)
        self._start = start + len(data)
        await self._send(start, data)
