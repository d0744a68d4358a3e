"""Writes that are on their way to the workers, per file.

`ClusterClient.write` hands each block-sized piece to a background task and returns, so one
stream keeps several blocks in flight (the worker's disk, the network and both processes
work at once instead of taking turns). The rules that keep this safe:

- a window bounds the pieces in flight for the whole client;
- a piece waits for in-flight pieces of the same file whose byte ranges overlap it, so
  overlapping writes reach the worker in the order they were made;
- a failure is kept for its file and raised by the next write, read or commit of that file
  (commit is where the FUSE daemon reports write errors: flush, fsync, close);
- `drain(ino)` waits for the file's pieces: read and commit call it first.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

from fusecsi.cluster.protocol import RPCError
from fusecsi.locks import acquire

log = logging.getLogger(__name__)


class FileWrites:
    __slots__ = ("count", "idle", "error", "ranges")

    def __init__(self) -> None:
        self.count = 0
        self.idle = trio.Event()
        self.error: RPCError | None = None
        self.ranges: list[tuple[int, int, trio.Event]] = []


class WriteBehind:
    def __init__(self, nursery: trio.Nursery, window: int) -> None:
        self.nursery = nursery
        self.window = trio.Semaphore(window)
        self.files: dict[int, FileWrites] = {}

    def check(self, ino: int, *, clear: bool = False) -> None:
        """Raise the failure kept for `ino`, if any (and forget it when `clear`)."""
        state = self.files.get(ino)
        if state is not None and state.error is not None:
            error = state.error
            if clear:
                state.error = None
                if not state.count:
                    del self.files[ino]
            raise error

    async def submit(self, ino: int, lo: int, hi: int, send: Callable[[], Awaitable]) -> None:
        """Start `send()` for the byte range [lo, hi) of `ino` once it may go."""
        self.check(ino)
        while True:
            state = self.files.setdefault(ino, FileWrites())
            before = [done for a, b, done in state.ranges if a < hi and lo < b]
            if not before:
                break
            await before[0].wait()
        # claim the range before waiting for the window, so later overlapping writes queue
        # behind this one
        entry = (lo, hi, trio.Event())
        state.ranges.append(entry)
        if state.count == 0:
            state.idle = trio.Event()
        state.count += 1
        try:
            await acquire(self.window)  # the caller's reply waits for this
        except BaseException:
            self._finish(ino, state, entry)
            raise
        self.nursery.start_soon(self._run, ino, state, entry, send)

    async def _run(self, ino: int, state: FileWrites, entry, send) -> None:
        try:
            await send()
        except RPCError as exc:
            state.error = state.error or exc
        except Exception as exc:  # never let one write take the client down
            log.exception("background write failed")
            state.error = state.error or RPCError(errno.EIO, f"write failed: {exc}")
        finally:
            self.window.release()
            self._finish(ino, state, entry)

    def _finish(self, ino: int, state: FileWrites, entry) -> None:
        state.ranges.remove(entry)
        entry[2].set()
        state.count -= 1
        if state.count == 0:
            state.idle.set()
            if state.error is None and self.files.get(ino) is state:
                del self.files[ino]

    async def drain(self, ino: int) -> None:
        state = self.files.get(ino)
        if state is not None and state.count:
            await state.idle.wait()
