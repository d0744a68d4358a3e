"""Large aligned block writes and reads bypass the page cache (O_DIRECT).

Measured on the 2-core VM these run on: buffered writes of 2 MiB pieces swing between
0.4 and 4.8 GB/s with the state of the page cache and then need an fsync that waits for the
disk, while direct writes of the same pieces hold ~1.8 GB/s with the data already on disk.
Only pieces of at least DIRECT_MIN bytes that start and end on DIRECT_ALIGN boundaries go
direct; everything else (small writes, the unaligned tail of a file) stays buffered. Mixing
the two is safe: the kernel writes back and drops cached pages a direct write overlaps.
A filesystem without O_DIRECT (tmpfs) simply keeps every write buffered.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

DIRECT_MIN = 1 << 20
DIRECT_ALIGN = 4096
KEEP_BUFFERS = 2  # page-aligned staging buffers kept for the next writes


class _Buffers:
    """Page-aligned staging buffers (O_DIRECT needs aligned memory; bytes objects are not)."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        return mmap.mmap(-1, -(-size // DIRECT_MIN) * DIRECT_MIN)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < KEEP_BUFFERS:
                self._free.append(buf)
                return
        buf.close()


_buffers = _Buffers()


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of `data` at `offset` of the file open as `fd`, directly to the disk when the
    piece is large and aligned and the filesystem allows it."""
    view = memoryview(data).cast("B")
    size = view.nbytes
    if size >= DIRECT_MIN and offset % DIRECT_ALIGN == 0 and size % DIRECT_ALIGN == 0:
        if _write_direct(fd, view, offset):
            return
    done = 0
    while done < size:
        done += os.pwrite(fd, view[done:], offset + done)


def _write_direct(fd: int, view: memoryview, offset: int) -> bool:
    """False when the file refuses O_DIRECT: the caller writes it the ordinary way."""
    size = view.nbytes

    def write(direct: int, staged: memoryview) -> bool:
        staged[:] = view
        done = 0
        while done < size:
            done += os.pwrite(direct, staged[done:], offset + done)
        return True

    return _direct_io(fd, os.O_WRONLY, size, write) is not None


def pread_direct(fd: int, size: int, offset: int) -> bytes | None:
    """Up to `size` bytes from `offset` of the file open as `fd`, read past the page cache
    (short at the end of the file); None when the piece is small or unaligned or the
    filesystem refuses direct I/O. The caller reads those the ordinary way."""
    if size < DIRECT_MIN or offset % DIRECT_ALIGN:
        return None

    def read(direct: int, staged: memoryview) -> bytes:
        done = 0
        while done < size:
            got = os.preadv(direct, [staged[done:]], offset + done)
            done += got
            if got == 0 or done % DIRECT_ALIGN:
                break  # the end of the file
        return bytes(staged[: min(done, size)])

    # the aligned end may pass the end of the file
    return _direct_io(fd, os.O_RDONLY, -(-size // DIRECT_ALIGN) * DIRECT_ALIGN, read)


def reopen(fd: int, flags: int) -> int:
    """A second open file description of the file open as `fd`, with flags of its own (and,
    for flock, a lock of its own)."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def _direct_io(fd: int, flags: int, size: int, io):
    """`io(direct, staged)` on an O_DIRECT description of `fd`'s file (so the flag does not
    leak into the caller's descriptor, whose small I/O stays buffered) and a page-aligned
    staging buffer of `size` bytes; None when the filesystem refuses direct I/O. A write
    refused part-way is simply written again the ordinary way: the same bytes, same place."""
    try:
        direct = reopen(fd, flags | os.O_DIRECT)
    except OSError:
        return None
    buf = _buffers.take(size)
    try:
        with memoryview(buf)[:size] as staged:
            return io(direct, staged)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None  # the filesystem refuses direct I/O for this file
        raise
    finally:
        os.close(direct)
        _buffers.give(buf)
