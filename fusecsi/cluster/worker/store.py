"""Blocks on local disk: one data file per block and a sidecar of CRC32s, one per 64 KiB chunk.

Chunk checksums let a ranged write update only the chunks it touches and let a ranged read
verify only the chunks it returns; a mismatch is reported as EIO so the client can go to
another replica. Every function here blocks: the service runs them in threads.

The block-file functions (`write_at`, `read_at`, `truncate_at`) work on a pair of open file
descriptors, so the worker and a short-circuit client on the same host (which got the
descriptors from the worker, see fusecsi/cluster/shortcircuit.py) run the same code. Both
sides lock the checksum file with flock(2) around every update (exclusive) and every verified
read (shared): flock locks belong to an open file description, so they exclude other
processes and every separately opened descriptor, but not users of one shared descriptor
(those serialise among themselves).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import secrets
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from fusecsi.cluster.worker.directio import pread_direct, pwrite_all

try:  # the same CRC-32 as zlib's, with SIMD: ~8x faster, a third of a GiB read's CPU before
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover (a dependency; zlib gives the same checksums)
    from zlib import crc32

CHUNK = 64 << 10
SYNC_THREADS = 16
CRC_SIZE = 4
_ZERO_CRC = crc32(bytes(CHUNK))
MAX_EXTERNAL = 4096  # blocks handed out for short-circuit writes whose size is re-read


def _pread(
    fd: int,
    size: int,
    offset: int,
    cached: bool,
    direct: bool = False,
    into: memoryview | None = None,
) -> bytes | memoryview:
    if not cached:
        if into is not None and size <= into.nbytes:
            return _pread_into(fd, size, offset, into)
        data = pread_direct(fd, size, offset) if direct else None
        return os.pread(fd, size, offset) if data is None else data
    buf = bytearray(size)
    got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)  # EAGAIN: not in the page cache
    if got < size:
        if size == 0 or os.fstat(fd).st_size > offset + got:
            raise BlockingIOError(errno.EAGAIN, "partly in the page cache")
        del buf[got:]
    return bytes(buf)


def _pread_into(fd: int, size: int, offset: int, into: memoryview) -> memoryview:
    """Up to `size` bytes from `offset` read into `into` (short at the end of the file)."""
    done = 0
    while done < size:
        got = os.preadv(fd, [into[done:size]], offset + done)
        if got == 0:
            break
        done += got
    return into[:done]


def _lock(crc_fd: int, exclusive: bool, wait: bool) -> None:
    """Lock the block (BlockingIOError when `wait` is false and someone holds it)."""
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    fcntl.flock(crc_fd, op if wait else op | fcntl.LOCK_NB)


def _unlock(crc_fd: int) -> None:
    fcntl.flock(crc_fd, fcntl.LOCK_UN)


def write_at(fd: int, crc_fd: int, offset: int, data, *, wait: bool = True) -> tuple[int, int]:
    """Write `data` at `offset` and update the checksums of the chunks it touches (and of a
    hole it opens). Returns the block's (old length, new length). `wait=False` raises
    BlockingIOError instead of waiting for another user of the block."""
    _lock(crc_fd, True, wait)
    try:
        old_len = os.fstat(fd).st_size
        view = memoryview(data)
        pwrite_all(fd, view, offset)
        end = offset + len(view)
        new_len = max(old_len, end)
        first = min(old_len, offset) // CHUNK
        last = (end - 1) // CHUNK
        crcs = array.array("I", bytes(CRC_SIZE * (last - first + 1)))
        for i in range(first, last + 1):
            start, stop = i * CHUNK, min((i + 1) * CHUNK, new_len)
            if offset <= start and stop <= end:
                crcs[i - first] = crc32(view[start - offset : stop - offset])
            elif old_len <= start and stop <= offset and stop - start == CHUNK:
                crcs[i - first] = _ZERO_CRC  # a whole chunk of the hole the write opened
            else:
                crcs[i - first] = crc32(os.pread(fd, stop - start, start))
        os.pwrite(crc_fd, memoryview(crcs).cast("B"), first * CRC_SIZE)
        return old_len, new_len
    finally:
        _unlock(crc_fd)


def read_at(
    fd: int,
    crc_fd: int,
    offset: int,
    size: int,
    *,
    name: object = "",
    wait: bool = True,
    cached: bool | None = None,
    direct: bool = False,
    into: memoryview | None = None,
) -> bytes | memoryview:
    """Up to `size` bytes from `offset` (short at the block's end), after verifying the
    checksum of every chunk they touch: EIO on a mismatch. `wait=False` raises
    BlockingIOError instead of waiting for a writer, and `cached` (default: `not wait`)
    instead of waiting for the disk (data not in the page cache): the caller can go to a
    thread. `direct` reads large aligned pieces past the page cache: a short-circuit reader
    keeps them in its own FUSE page cache, and a second copy here only costs memory. With
    `into` (memory of at least `read_span` bytes) what is read from the disk goes into it
    (through the page cache) and comes back as a memoryview of it: no further copy."""
    if cached is None:
        cached = not wait
    _lock(crc_fd, False, wait)
    try:
        length = os.fstat(fd).st_size
        end = min(offset + size, length)
        if offset >= end:
            return b""
        first = offset // CHUNK
        start = first * CHUNK
        stop = min(((end - 1) // CHUNK + 1) * CHUNK, length)
        data = _pread(fd, stop - start, start, cached, direct, into)
        count = (stop - 1) // CHUNK + 1 - first
        crcs = array.array("I")
        crcs.frombytes(_pread(crc_fd, count * CRC_SIZE, first * CRC_SIZE, cached))
    finally:
        _unlock(crc_fd)
    view = memoryview(data)
    for k in range((stop - start + CHUNK - 1) // CHUNK):
        lo = k * CHUNK
        if k >= len(crcs) or crc32(view[lo : lo + CHUNK]) != crcs[k]:
            raise OSError(errno.EIO, f"block {name}: checksum mismatch in chunk {first + k}")
    if offset == start and end == stop:
        return data
    return data[offset - start : end - start]


def read_now(
    fd: int, crc_fd: int, offset: int, size: int, scratch: memoryview, disk: bool
) -> tuple[bytes, bool]:
    """`read_at` for a small piece on the caller's thread, never waiting: up to `size` bytes
    from `offset` (short at the block's end), copied out of `scratch` (at least
    `read_span(offset, size)` bytes, used again by the next call) once the checksum of every
    chunk they touch matched (EIO otherwise), and whether the block was deleted meanwhile
    (st_nlink 0). BlockingIOError when a writer holds the block or, unless `disk`, the bytes
    are not all in the page cache. One fstat gives the length and the link count, after
    the read and under the lock (what `read_at` and a later fstat give separately)."""
    _lock(crc_fd, False, False)
    try:
        first = offset // CHUNK
        start = first * CHUNK
        span = read_span(offset, size)
        got = os.preadv(fd, [scratch[:span]], start, 0 if disk else os.RWF_NOWAIT)
        st = os.fstat(fd)
        end = min(offset + size, st.st_size)
        if offset >= end:
            return b"", st.st_nlink == 0
        stop = min(start + span, st.st_size)
        if got < stop - start:
            raise BlockingIOError(errno.EAGAIN, "partly in the page cache")
        count = (stop - 1) // CHUNK + 1 - first
        crcs = array.array("I")
        crcs.frombytes(_pread(crc_fd, count * CRC_SIZE, first * CRC_SIZE, not disk))
    finally:
        _unlock(crc_fd)
    if len(crcs) < count:
        raise OSError(errno.EIO, f"block: {count - len(crcs)} checksums missing")
    for k in range(count):
        lo = start + k * CHUNK
        if crc32(scratch[lo - start : min(lo + CHUNK, stop) - start]) != crcs[k]:
            raise OSError(errno.EIO, f"block: checksum mismatch in chunk {first + k}")
    return bytes(scratch[offset - start : end - start]), st.st_nlink == 0


def read_span(offset: int, size: int) -> int:
    """The most bytes `read_at` reads from the disk for `size` bytes at `offset`: whole
    checksum chunks."""
    return ((offset + size - 1) // CHUNK + 1 - offset // CHUNK) * CHUNK


def truncate_at(fd: int, crc_fd: int, length: int) -> tuple[int, int]:
    """Cut the block to `length` (never grows it). Returns (old length, new length)."""
    _lock(crc_fd, True, True)
    try:
        old_len = os.fstat(fd).st_size
        if length >= old_len:
            return old_len, old_len
        os.ftruncate(fd, length)
        chunks = (length + CHUNK - 1) // CHUNK
        os.ftruncate(crc_fd, chunks * CRC_SIZE)
        if length % CHUNK:
            start = (chunks - 1) * CHUNK
            crc = array.array("I", [crc32(os.pread(fd, length - start, start))])
            os.pwrite(crc_fd, memoryview(crc).cast("B"), (chunks - 1) * CRC_SIZE)
        return old_len, length
    finally:
        _unlock(crc_fd)


def _sync_path(path: Path, how) -> None:
    """Sync a file or directory by path; one that is gone has nothing left to lose."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        how(fd)
    finally:
        os.close(fd)


class BlockStore:
    def __init__(self, data_dir: Path, capacity: int | None = None) -> None:
        self.root = data_dir / "blocks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_limit = capacity
        self.worker_id = self._worker_id(data_dir)
        self._cluster_path = data_dir / "cluster.id"
        try:
            self.cluster_id: str | None = self._cluster_path.read_text().strip() or None
        except FileNotFoundError:
            self.cluster_id = None  # recorded at the first registration
        self.used = sum(self._size(p) for p in self._block_paths())
        self._accounting = threading.Lock()
        # blocks handed to short-circuit writers -> the size `used` counts for them; they
        # grow behind the worker's back, so refresh() reads their sizes again
        self.external: OrderedDict[int, int] = OrderedDict()

    @staticmethod
    def _worker_id(data_dir: Path) -> str:
        path = data_dir / "worker.id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            worker_id = secrets.token_hex(8)
            tmp = data_dir / "worker.id.tmp"
            tmp.write_text(worker_id + "\n")
            tmp.rename(path)
            return worker_id

    def adopt_cluster(self, cluster_id: str) -> None:
        """Record (durably) the cluster this worker first registered with; from then on it
        serves no master of another cluster."""
        tmp = self._cluster_path.with_name("cluster.id.tmp")
        with open(tmp, "w") as f:
            f.write(cluster_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(self._cluster_path)
        _sync_path(self._cluster_path.parent, os.fsync)
        self.cluster_id = cluster_id

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def _block_paths(self):
        for sub in self.root.iterdir():
            for p in sub.iterdir():
                if p.name.isdigit():
                    yield p

    def count_blocks(self) -> int:
        """Counted on the disk (at scrape time, on the metrics thread): no bookkeeping in the
        write path."""
        return sum(1 for _ in self._block_paths())

    def block_ids(self) -> list[int]:
        return [int(p.name) for p in self._block_paths()]

    def path(self, block_id: int) -> Path:
        return self.root / f"{block_id & 0xFF:02x}" / str(block_id)

    def space(self) -> tuple[int, int]:
        """(capacity, free) in bytes."""
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        if self.capacity_limit is not None:
            total = min(total, self.capacity_limit)
            free = min(free, max(0, self.capacity_limit - self.used))
        return total, free

    def _account(self, block_id: int, old: int, new: int) -> None:
        with self._accounting:
            known = self.external.get(block_id)
            if known is not None:
                old = known
                self.external[block_id] = new
            self.used += new - old

    def refresh(self) -> None:
        """Count what short-circuit writers added to the blocks they hold."""
        for block_id in list(self.external):
            size = self._size(self.path(block_id))
            with self._accounting:
                known = self.external.get(block_id)
                if known is not None:  # else deleted meanwhile (and uncounted)
                    self.external[block_id] = size
                    self.used += size - known

    # ------------------------------------------------------------ files

    @staticmethod
    def _crc_path(path: Path) -> Path:
        return path.with_name(path.name + ".crc")

    def open_block(
        self, block_id: int, writable: bool, create: bool | None = None
    ) -> tuple[int, int]:
        """Fresh (data, checksum) descriptors of a block; ENOENT when it does not exist unless
        `create` (default: `writable`). The checksum file is created first, so a reader that
        finds the data file always finds its checksums."""
        if create is None:
            create = writable
        path = self.path(block_id)
        crc_path = self._crc_path(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
            try:
                crc_fd = os.open(crc_path, flags, 0o600)
            except FileNotFoundError:
                path.parent.mkdir(exist_ok=True)
                crc_fd = os.open(crc_path, flags, 0o600)
            try:
                fd = os.open(path, flags, 0o600)
            except BaseException:
                os.close(crc_fd)
                raise
            return fd, crc_fd
        try:
            fd = os.open(path, flags)
            try:
                crc_fd = os.open(crc_path, flags)
            except BaseException:  # FileNotFoundError: deleted between the two opens
                os.close(fd)
                raise
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"no block {block_id}") from None
        return fd, crc_fd

    def hand_out(self, block_id: int, writable: bool) -> tuple[int, int]:
        """`open_block` for a short-circuit client; a writable block's growth is counted."""
        fds = self.open_block(block_id, writable)
        if writable:
            with self._accounting:
                if block_id not in self.external:
                    self.external[block_id] = os.fstat(fds[0]).st_size
                self.external.move_to_end(block_id)
                while len(self.external) > MAX_EXTERNAL:
                    # counted once more, then no longer followed
                    oldest, known = self.external.popitem(last=False)
                    self.used += self._size(self.path(oldest)) - known
        return fds

    def _with_block(self, block_id: int, writable: bool, create: bool, fn, *args):
        fd, crc_fd = self.open_block(block_id, writable, create)
        try:
            return fn(fd, crc_fd, *args)
        finally:
            os.close(fd)
            os.close(crc_fd)

    # ------------------------------------------------------------ operations

    def write(self, block_id: int, offset: int, data: bytes) -> None:
        if data:
            self._account(block_id, *self._with_block(block_id, True, True, write_at, offset, data))

    def read(self, block_id: int, offset: int, size: int) -> bytes:
        return self._with_block(
            block_id, False, False, partial(read_at, name=block_id), offset, size
        )

    def truncate(self, block_id: int, length: int) -> None:
        try:
            sizes = self._with_block(block_id, True, False, truncate_at, length)
        except FileNotFoundError:
            return
        self._account(block_id, *sizes)

    def sync(self, block_ids: list[int]) -> None:
        """Flush the blocks' data, checksums and directory entries to disk. The files are
        synced SYNC_THREADS at a time: the filesystem commits its journal once for all the
        syncs waiting together, instead of once per file."""
        paths = []
        for block_id in block_ids:
            path = self.path(block_id)
            paths += [(path, os.fdatasync), (self._crc_path(path), os.fdatasync)]
        # the directory entries of new block files
        paths += [(parent, os.fsync) for parent in {self.path(b).parent for b in block_ids}]
        if not paths:
            return
        with ThreadPoolExecutor(min(SYNC_THREADS, len(paths))) as pool:
            list(pool.map(lambda item: _sync_path(*item), paths))  # list(): raise a failure

    def delete(self, block_id: int) -> None:
        path = self.path(block_id)
        size = self._size(path)
        self._account(block_id, size, 0)
        with self._accounting:
            self.external.pop(block_id, None)
        for p in (path, self._crc_path(path)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
