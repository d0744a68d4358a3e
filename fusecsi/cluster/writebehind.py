"""Writes that are on their way to the workers, per file.

`ClusterClient.write` hands each block-sized piece to a background task and returns, so one
stream keeps several blocks in flight (the worker's disk, the network and both processes
work at once instead of taking turns). The rules that keep this safe:

- a window bounds the pieces in flight for the whole client;
- a piece waits for in-flight pieces of the same file whose byte ranges overlap it, so
  overlapping writes reach the worker in the order they were made;
- a failure is kept for its file as a `WriteLost` naming the lowest offset that was not
  stored, and raised by every later write, read and commit of that file until `forget`
  (commit is where the FUSE daemon reports write errors: flush, fsync, close; a commit never
  publishes a length past that offset);
- `drain(ino)` waits for the file's pieces: read and commit call it first.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

from fusecsi.locks import acquire
from fusecsi.rpc.errors import RPCError

log = logging.getLogger(__name__)

# Errors that mean "the worker did not answer", not "the worker refused".
TRANSIENT = frozenset(
    {
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENOTCONN,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ESHUTDOWN,
        errno.EAGAIN,
    }
)


class WriteLost(RPCError):
    """Data handed to the client for `ino` from `offset` on was not (all) stored."""

    def __init__(self, code: int, message: str, offset: int) -> None:
        super().__init__(code, message)
        self.offset = offset


class FileWrites:
    __slots__ = ("count", "idle", "error", "ranges")

    def __init__(self) -> None:
        self.count = 0
        self.idle = trio.Event()
        self.error: WriteLost | None = None
        self.ranges: list[tuple[int, int, trio.Event]] = []


class WriteBehind:
    def __init__(self, nursery: trio.Nursery, window: int) -> None:
        self.nursery = nursery
        self.window = trio.Semaphore(window)
        self.files: dict[int, FileWrites] = {}

    def check(self, ino: int) -> None:
        """Raise the loss kept for `ino`, if any."""
        state = self.files.get(ino)
        if state is not None and state.error is not None:
            raise state.error

    def lost(self, ino: int, offset: int, exc: OSError) -> WriteLost:
        """Keep (and return) a loss of the data of `ino` from `offset` on; the lowest offset
        and the first error win. A transient errno becomes EIO: the pieces were already
        retried for as long as the caller allows, so asking again cannot bring them back."""
        state = self.files.setdefault(ino, FileWrites())
        old = state.error
        code = exc.errno or errno.EIO
        if code in TRANSIENT:
            code = errno.EIO
        if old is not None:
            if old.offset <= offset:
                return old
            code, exc = old.errno, old.strerror
        state.error = WriteLost(code, f"data from offset {offset} not stored: {exc}", offset)
        return state.error

    def forget(self, ino: int) -> None:
        """Drop the loss kept for `ino` (its data was cut away, or nobody holds it open)."""
        state = self.files.get(ino)
        if state is not None:
            state.error = None
            if not state.count:
                del self.files[ino]

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
            self.lost(ino, entry[0], exc)
        except Exception as exc:  # never let one write take the client down
            log.exception("background write failed")
            self.lost(ino, entry[0], RPCError(errno.EIO, f"write failed: {exc!r}"))
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
