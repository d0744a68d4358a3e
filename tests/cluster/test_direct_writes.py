"""Large aligned block writes go straight to the disk (O_DIRECT); everything else stays
buffered, and the file reads the same either way. Real files on the disk under /tmp."""

from __future__ import annotations

import errno
import os

import pytest

from fusecsi.cluster.worker import directio
from fusecsi.cluster.worker.directio import DIRECT_MIN, pwrite_all

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


def test_a_filesystem_without_o_direct_keeps_writes_buffered(disk_file, monkeypatch):
    """Every filesystem here takes O_DIRECT (tmpfs too, on this kernel), so the refusal some
    filesystems answer with (EINVAL at open) is injected."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "no direct I/O here")
        return real_open(path, flags, *args)

    monkeypatch.setattr(directio.os, "open", refusing_open)
    data = os.urandom(2 * MiB)
    pwrite_all(disk_file, data, 0)
    assert cached(disk_file, 0, 4096)
    assert os.pread(disk_file, 2 * MiB, 0) == data
