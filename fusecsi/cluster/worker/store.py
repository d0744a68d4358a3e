"""Blocks on local disk: one data file per block and a sidecar of CRC32s, one per 64 KiB chunk.

Chunk checksums let a ranged write update only the chunks it touches and let a ranged read
verify only the chunks it returns; a mismatch is reported as EIO so the client can go to
another replica. Every method here blocks: the service runs them in threads.
"""

from __future__ import annotations

import array
import errno
import os
import secrets
import zlib
from pathlib import Path

CHUNK = 64 << 10


def _crc_array(data: bytes = b"") -> array.array:
    crcs = array.array("I")
    crcs.frombytes(data)
    return crcs


class BlockStore:
    def __init__(self, data_dir: Path, capacity: int | None = None) -> None:
        self.root = data_dir / "blocks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_limit = capacity
        self.worker_id = self._worker_id(data_dir)
        self.used = sum(self._size(p) for p in self._block_paths())

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

    # ------------------------------------------------------------ checksums

    @staticmethod
    def _crc_path(path: Path) -> Path:
        return path.with_name(path.name + ".crc")

    def _load_crcs(self, path: Path) -> array.array:
        try:
            return _crc_array(self._crc_path(path).read_bytes())
        except FileNotFoundError:
            return _crc_array()

    def _save_crcs(self, path: Path, crcs: array.array, first: int = 0) -> None:
        """Write the checksums from chunk `first` on, and cut the file to their number."""
        fd = os.open(self._crc_path(path), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, memoryview(crcs)[first:].cast("B"), first * crcs.itemsize)
            os.ftruncate(fd, len(crcs) * crcs.itemsize)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ operations

    def write(self, block_id: int, offset: int, data: bytes) -> None:
        if not data:
            return
        path = self.path(block_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            old_len = os.fstat(fd).st_size
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
            end = offset + len(data)
            new_len = max(old_len, end)
            self.used += new_len - old_len
            first = min(old_len, offset) // CHUNK
            crcs = self._load_crcs(path) if first or end < old_len else _crc_array()
            chunks = (new_len + CHUNK - 1) // CHUNK
            if len(crcs) < chunks:
                crcs.extend([0] * (chunks - len(crcs)))
            for i in range(first, (end - 1) // CHUNK + 1):
                start, stop = i * CHUNK, min((i + 1) * CHUNK, new_len)
                if offset <= start and stop <= end:
                    crcs[i] = zlib.crc32(view[start - offset : stop - offset])
                else:
                    crcs[i] = zlib.crc32(os.pread(fd, stop - start, start))
            self._save_crcs(path, crcs, first)
        finally:
            os.close(fd)

    def read(self, block_id: int, offset: int, size: int) -> bytes:
        path = self.path(block_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"no block {block_id}") from None
        try:
            length = os.fstat(fd).st_size
            end = min(offset + size, length)
            if offset >= end:
                return b""
            first = offset // CHUNK
            start = first * CHUNK
            stop = min(((end - 1) // CHUNK + 1) * CHUNK, length)
            data = os.pread(fd, stop - start, start)
        finally:
            os.close(fd)
        crcs = self._load_crcs(path)
        view = memoryview(data)
        for i in range(first, (stop - 1) // CHUNK + 1):
            lo = i * CHUNK - start
            if i >= len(crcs) or zlib.crc32(view[lo : lo + CHUNK]) != crcs[i]:
                raise OSError(errno.EIO, f"block {block_id}: checksum mismatch in chunk {i}")
        if offset == start and end == stop:
            return data
        return data[offset - start : end - start]

    def truncate(self, block_id: int, length: int) -> None:
        path = self.path(block_id)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            old_len = os.fstat(fd).st_size
            if length >= old_len:
                return
            os.ftruncate(fd, length)
            self.used -= old_len - length
            crcs = self._load_crcs(path)
            chunks = (length + CHUNK - 1) // CHUNK
            del crcs[chunks:]
            if length % CHUNK and chunks:
                start = (chunks - 1) * CHUNK
                crcs[chunks - 1] = zlib.crc32(os.pread(fd, length - start, start))
            self._save_crcs(path, crcs)
        finally:
            os.close(fd)

    def sync(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            path = self.path(block_id)
            for p in (path, self._crc_path(path)):
                try:
                    fd = os.open(p, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        for parent in {self.path(b).parent for b in block_ids}:
            try:
                fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)  # new block files' directory entries
            finally:
                os.close(fd)

    def delete(self, block_id: int) -> None:
        path = self.path(block_id)
        self.used -= self._size(path)
        for p in (path, self._crc_path(path)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
