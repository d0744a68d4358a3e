"""Read-ahead for one open file: sequential readers are served from windows fetched ahead.

Random reads go straight to the cluster. When the caller allows it (no writer on this
mount), a small random read fetches the aligned `around` bytes that hold it and hands the
surrounding pages to `store`, which puts them into the kernel's page cache: the same
round trip then answers later reads nearby without reaching the daemon at all. Once two reads in a row continue where the previous one ended, the
file is read in aligned windows of `window` bytes and the next `depth` windows are fetched
in the background, so the worker round trip overlaps with the kernel consuming data.
The kernel may deliver its own read-ahead requests out of order; any read that falls in a
window already fetched or in flight is served from it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio
from pyfuse3 import FUSEError

from fusecsi.metrics import Tally

log = logging.getLogger(__name__)

FetchFn = Callable[[int, int], Awaitable[bytes]]
# every reader in the daemon: served from a window already fetched or in flight, or not
COUNTS = Tally(
    "fusecsi_mount_readahead_total",
    "reads served from read-ahead windows (hit) or sent to the cluster (miss)",
    ["result"],
)


class _Window:
    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data = b""
        self.error: FUSEError | None = None


class ReadAhead:
    __slots__ = (
        "_fetch",
        "_window",
        "_depth",
        "_spawn",
        "_windows",
        "_expect",
        "_streak",
        "_version",
        "_around",
        "_store",
    )

    def __init__(
        self, fetch: FetchFn, window: int, depth: int, spawn, around: int = 0, store=None
    ) -> None:
        self._around = around if store is not None else 0
        self._store = store  # store(offset, data, skip_from, skip_to)
        self._fetch = fetch
        self._window = window
        self._depth = depth
        self._spawn = spawn
        self._windows: dict[int, _Window] = {}
        self._expect = -1
        self._streak = 0
        self._version = 0

    async def read(
        self, offset: int, size: int, version: int, file_size: int, around: bool = False
    ) -> bytes | memoryview:
        """`size` bytes at `offset` (a view of a window when they lie in one); `version`
        changes whenever this mount modified the file; `around`: nobody can be writing the
        file through this mount right now."""
        if version != self._version:
            self._windows.clear()
            self._version = version
        window = self._window
        first = offset // window
        sequential = offset == self._expect or first in self._windows
        self._expect = offset + size
        self._streak = self._streak + 1 if sequential else 0
        if self._streak < 1:
            COUNTS.add("miss")
            if self._windows:
                self._windows.clear()
            if around and size < self._around:
                start = offset - offset % self._around
                # a read may cross the aligned boundary: a short answer would read as EOF
                data = await self._fetch(start, max(self._around, offset + size - start))
                self._store(start, data, offset, offset + size)
                return data[offset - start : offset - start + size]
            return await self._fetch(offset, size)
        COUNTS.add("hit" if first in self._windows else "miss")
        last = (offset + size - 1) // window
        for index in range(first, last + 1 + self._depth):
            if index * window < file_size or index == first:
                self._start(index)
        for index in [i for i in self._windows if i < first]:
            del self._windows[index]
        parts = []
        for index in range(first, last + 1):
            win = self._windows[index]
            await win.done.wait()
            if win.error is not None:
                self._windows.pop(index, None)
                raise win.error
            lo = max(offset - index * window, 0)
            hi = min(offset + size - index * window, window)
            parts.append(memoryview(win.data)[lo:hi])  # a slice of bytes would copy it
            if len(win.data) < hi:
                break  # end of file
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _start(self, index: int) -> None:
        if index not in self._windows:
            win = self._windows[index] = _Window()
            self._spawn(self._load, index, win)

    async def _load(self, index: int, win: _Window) -> None:
        try:
            win.data = await self._fetch(index * self._window, self._window)
        except Exception as exc:
            if not isinstance(exc, FUSEError):
                log.exception("read from the cluster failed")
                exc = FUSEError(errno.EIO)
            win.error = exc
        finally:
            win.done.set()
