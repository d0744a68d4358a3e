"""Large aligned block writes and reads go straight to the disk (O_DIRECT); everything else
stays buffered, and the file reads the same either way. Real files on the disk under /tmp."""

from __future__ import annotations

import errno
import os

import pytest

from fusecsi.cluster.worker import directio
from fusecsi.cluster.worker.directio import DIRECT_MIN, pread_direct, pwrite_all

MiB = 1 << 20


def cached(fd: int, offset: int, size: int) -> bool:
    """Whether [offset, offset + size) is in the page cache (a read that may not wait)."""
    try:
        os.preadv(fd, [bytearray(size)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    return True


@pytest.fixture
def disk_file(tmp_path):
    fd = os.open(tmp_path / "block", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def test_large_aligned_pieces_bypass_the_page_cache(disk_file):
    fd = disk_file
    big = os.urandom(2 * MiB)
    pwrite_all(fd, big, 4 * MiB)
    assert not cached(fd, 4 * MiB, 4096)  # written past the cache
    small = os.urandom(5000)
    pwrite_all(fd, small, 100)  # small and unaligned: buffered
    assert cached(fd, 0, 4096)
    assert os.fstat(fd).st_size == 6 * MiB
    assert os.pread(fd, 2 * MiB, 4 * MiB) == big
    assert os.pread(fd, 5000, 100) == small
    assert os.pread(fd, 100, 0) == bytes(100)


@pytest.mark.parametrize("offset, size", [(4096 + 1, MiB), (0, MiB + 1), (0, DIRECT_MIN - 4096)])
def test_unaligned_or_small_pieces_stay_buffered(disk_file, offset, size):
    data = os.urandom(size)
    pwrite_all(disk_file, data, offset)
    assert cached(disk_file, offset - offset % 4096, 4096)
    assert os.pread(disk_file, size, offset) == data


def test_a_direct_write_over_cached_pages_is_read_back(disk_file):
    """The kernel drops cached pages a direct write overlaps: no stale read afterwards."""
    fd = disk_file
    pwrite_all(fd, b"a" * (2 * MiB + 10), 0)  # unaligned length: buffered, cached
    assert os.pread(fd, 10, MiB) == b"a" * 10
    pwrite_all(fd, b"b" * (2 * MiB), 0)  # direct
    assert os.pread(fd, 2 * MiB + 10, 0) == b"b" * (2 * MiB) + b"a" * 10


@pytest.fixture
def no_direct_io(monkeypatch):
    """Every filesystem here takes O_DIRECT (tmpfs too, on this kernel), so the refusal some
    filesystems answer with (EINVAL at open) is injected."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "no direct I/O here")
        return real_open(path, flags, *args)

    monkeypatch.setattr(directio.os, "open", refusing_open)


def test_a_filesystem_without_o_direct_keeps_writes_buffered(disk_file, no_direct_io):
    data = os.urandom(2 * MiB)
    pwrite_all(disk_file, data, 0)
    assert cached(disk_file, 0, 4096)
    assert os.pread(disk_file, 2 * MiB, 0) == data


def test_large_aligned_reads_leave_the_page_cache_alone(disk_file):
    fd = disk_file
    big = os.urandom(2 * MiB)
    pwrite_all(fd, big, 4 * MiB)
    assert pread_direct(fd, 2 * MiB, 4 * MiB) == big
    assert not cached(fd, 4 * MiB, 4096)
    assert pread_direct(fd, MiB, 5 * MiB) == big[MiB:]


def test_a_direct_read_stops_at_the_end_of_the_file(disk_file):
    """The last piece of a block is shorter than asked for; its tail was written buffered and
    is still dirty in the page cache (the kernel writes it back before reading past it)."""
    fd = disk_file
    data = os.urandom(MiB + 100)
    pwrite_all(fd, data, 0)
    assert pread_direct(fd, 2 * MiB, 0) == data
    assert pread_direct(fd, MiB, 2 * MiB) == b""


@pytest.mark.parametrize("offset, size", [(100, 2 * MiB), (0, DIRECT_MIN - 4096)])
def test_small_or_unaligned_reads_are_left_to_the_caller(disk_file, offset, size):
    pwrite_all(disk_file, os.urandom(4 * MiB), 0)
    assert pread_direct(disk_file, size, offset) is None


def test_a_direct_read_sees_buffered_writes(disk_file):
    fd = disk_file
    pwrite_all(fd, b"a" * (2 * MiB + 10), 0)  # unaligned length: buffered, dirty
    assert pread_direct(fd, 2 * MiB, 0) == b"a" * (2 * MiB)


def test_block_reads_go_direct_only_when_asked(tmp_path):
    """read_at(direct=True), as short-circuit readers call it, reads past the page cache (the
    reader's own FUSE page cache keeps the data); the TCP path stays buffered."""
    from fusecsi.cluster.worker import store

    fd = os.open(tmp_path / "block", os.O_RDWR | os.O_CREAT, 0o600)
    crc_fd = os.open(tmp_path / "block.crc", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        data = os.urandom(4 * MiB)
        store.write_at(fd, crc_fd, 0, data)  # direct: nothing cached
        assert store.read_at(fd, crc_fd, 0, 2 * MiB, direct=True) == data[: 2 * MiB]
        assert not cached(fd, 0, 4096)
        assert store.read_at(fd, crc_fd, 2 * MiB, 2 * MiB) == data[2 * MiB :]
        assert cached(fd, 2 * MiB, 4096)
        assert store.read_at(fd, crc_fd, 2 * MiB, 2 * MiB, direct=True) == data[2 * MiB :]
        assert store.read_at(fd, crc_fd, 100, 5000, direct=True) == data[100:5100]  # small
    finally:
        os.close(fd)
        os.close(crc_fd)


def test_a_filesystem_without_o_direct_reads_buffered(disk_file, no_direct_io):
    pwrite_all(disk_file, os.urandom(2 * MiB), 0)
    assert pread_direct(disk_file, 2 * MiB, 0) is None
