"""Memory for large short-circuit reads, used again once nothing refers to it.

A read-ahead window is read from the block file straight into this memory and handed on to
FUSE as views of it, without a copy. Fresh memory for every window costs a page fault per
page on this VM (~8 ms for 4 MiB, as much as the disk read itself), and the heap gives it
back and faults it in again as windows come and go; a few buffers kept mapped do not.
A buffer is lent again only once no view of it is left anywhere (an mmap refuses to resize
while any exists), so bytes a reader still holds are never overwritten.
"""

from __future__ import annotations

import mmap
import time

BUFFER = 4 << 20  # the largest read-ahead window (READ_WINDOW, fusecsi/fuse/operations.py)
KEEP = 5  # buffers kept mapped: one sequential reader's windows (1 in use, 3 ahead, 1 spare)


def _unused(buf: mmap.mmap) -> bool:
    try:
        buf.resize(len(buf))  # BufferError while any view of it exists
    except (BufferError, OSError, ValueError, SystemError):
        return False
    return True


class ReadMemory:
    """Lends `size`-byte memoryviews; used from one thread (the event loop)."""

    def __init__(self, buffer: int = BUFFER, keep: int = KEEP) -> None:
        self._buffer = buffer
        self._keep = keep
        self._kept: list[mmap.mmap] = []
        self._taken = 0.0  # time.monotonic() of the last take

    def take(self, size: int) -> memoryview:
        self._taken = time.monotonic()
        if size > self._buffer:
            return memoryview(bytearray(size))  # not a read-ahead window: not kept
        for buf in self._kept:
            if _unused(buf):
                return memoryview(buf)[:size]  # the view marks it lent until it is gone
        buf = mmap.mmap(-1, self._buffer)
        if len(self._kept) < self._keep:
            self._kept.append(buf)
        return memoryview(buf)[:size]

    def trim(self, idle: float) -> None:
        """Unmap the kept buffers no view refers to once nothing was taken for `idle`
        seconds: the memory of a burst of sequential reads does not stay resident."""
        if self._kept and time.monotonic() - self._taken >= idle:
            for buf in [b for b in self._kept if _unused(b)]:
                self._kept.remove(buf)
                buf.close()
