"""File data: writes straight to workers, visibility at commit, holes, truncation, checksums."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from fusecsi.cluster.client import ClusterClient, ClusterError

BLOCK = 1 << 20  # the block size of the `cluster` fixture (conftest.py)


async def test_write_read_across_blocks(client, top):
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    data = os.urandom(3 * BLOCK + 12345)
    # unaligned pieces that straddle block boundaries
    pos = 0
    for size in (1000, BLOCK, BLOCK - 1, 7, BLOCK + 12345 - 6):
        piece = data[pos : pos + size]
        await client.write(f.ino, pos, piece)
        pos += len(piece)
    assert pos == len(data)
    await client.commit(f.ino, len(data), durable=True)  # workers flush the blocks (fsync)
    assert (await client.getattr(f.ino)).size == len(data)
    assert await client.read(f.ino, 0, len(data)) == data
    assert await client.read(f.ino, BLOCK - 10, 20) == data[BLOCK - 10 : BLOCK + 10]
    assert await client.read(f.ino, len(data) - 5, 100) == data[-5:]  # short at EOF
    assert await client.read(f.ino, len(data), 100) == b""
    # overwrite in the middle of a block
    await client.write(f.ino, BLOCK + 3, b"XYZ")
    expect = data[: BLOCK + 3] + b"XYZ" + data[BLOCK + 6 :]
    assert await client.read(f.ino, 0, len(data)) == expect


async def test_holes_read_as_zeros(client, top):
    f = await client.create(top.ino, b"sparse", 0o644, 0, 0)
    await client.write(f.ino, 2 * BLOCK + 100, b"end")
    await client.commit(f.ino, 2 * BLOCK + 103)
    data = await client.read(f.ino, 0, 3 * BLOCK)
    assert len(data) == 2 * BLOCK + 103
    assert data[: 2 * BLOCK + 100] == bytes(2 * BLOCK + 100) and data[-3:] == b"end"


async def test_uncommitted_length_is_invisible_to_others(cluster, client, top):
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    async with ClusterClient(cluster.master_addrs) as other:
        await client.write(f.ino, 0, b"a" * 5000)
        assert await client.read(f.ino, 0, 10_000) == b"a" * 5000  # the writer sees its data
        assert await other.read(f.ino, 0, 10_000) == b""
        assert (await other.getattr(f.ino)).size == 0
        attr = await client.commit(f.ino, 5000, mtime_ns=123)
        assert attr.size == 5000 and attr.mtime_ns == 123
        assert await other.read(f.ino, 0, 10_000) == b"a" * 5000


async def test_writer_that_vanishes_leaves_no_visible_length(cluster, client, top):
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    with trio.CancelScope() as scope:
        async with ClusterClient(cluster.master_addrs) as writer:
            await writer.write(f.ino, 0, os.urandom(BLOCK + 10))
            scope.cancel()  # gone without committing
    assert (await client.getattr(f.ino)).size == 0
    assert await client.read(f.ino, 0, 100) == b""
    # growing the file later does not expose the abandoned bytes
    await client.setattr(f.ino, size=BLOCK + 10)
    assert await client.read(f.ino, 0, BLOCK + 10) == bytes(BLOCK + 10)


async def test_truncate_frees_and_zeroes(client, top):
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    data = os.urandom(2 * BLOCK + 10)
    await client.write(f.ino, 0, data)
    await client.commit(f.ino, len(data))
    attr = await client.setattr(f.ino, size=BLOCK // 2)
    assert attr.size == BLOCK // 2
    assert await client.read(f.ino, 0, 3 * BLOCK) == data[: BLOCK // 2]
    attr = await client.setattr(f.ino, size=2 * BLOCK)
    grown = await client.read(f.ino, 0, 3 * BLOCK)
    assert grown == data[: BLOCK // 2] + bytes(2 * BLOCK - BLOCK // 2)
    # a write after the truncation lands in fresh blocks
    await client.write(f.ino, 2 * BLOCK - 3, b"abc")
    await client.commit(f.ino, 2 * BLOCK)
    assert (await client.read(f.ino, 2 * BLOCK - 3, 10)) == b"abc"
    await client.setattr(f.ino, size=0)
    assert await client.read(f.ino, 0, 100) == b""


async def test_truncate_by_another_client_invalidates_cached_blocks(cluster, client, top):
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    await client.write(f.ino, 0, b"1" * 100)
    await client.commit(f.ino, 100)
    async with ClusterClient(cluster.master_addrs) as other:
        await other.setattr(f.ino, size=0)
    await client.write(f.ino, 0, b"2" * 50)
    await client.commit(f.ino, 50)
    assert await client.read(f.ino, 0, 100) == b"2" * 50


def _block_files(cluster) -> list:
    out = []
    for i in range(len(cluster.workers)):
        root = cluster.base / f"worker{i}" / "blocks"
        out += [p for p in root.rglob("*") if p.is_file() and p.name.isdigit()]
    return out


async def test_corrupted_block_reads_as_eio(cluster, client, top):
    before = set(_block_files(cluster))
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    await client.write(f.ino, 0, b"q" * 200_000)
    await client.commit(f.ino, 200_000)
    (path,) = set(_block_files(cluster)) - before
    raw = bytearray(path.read_bytes())
    raw[150_000] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert await client.read(f.ino, 0, 1000) == b"q" * 1000  # other chunks still verify
    with pytest.raises(ClusterError) as info:
        await client.read(f.ino, 140_000, 20_000)
    assert info.value.errno == errno.EIO


async def test_concurrent_writers_to_distinct_files(client, top):
    blobs = {i: os.urandom(BLOCK // 3 * (i + 1)) for i in range(6)}

    async def one(i):
        f = await client.create(top.ino, b"c%d" % i, 0o644, 0, 0)
        await client.write(f.ino, 0, blobs[i])
        await client.commit(f.ino, len(blobs[i]))

    async with trio.open_nursery() as nursery:
        for i in blobs:
            nursery.start_soon(one, i)
    for i, blob in blobs.items():
        attr = await client.lookup(top.ino, b"c%d" % i)
        assert await client.read(attr.ino, 0, len(blob) + 1) == blob


async def test_overlapping_writes_in_flight_keep_their_order(client, top):
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    expect = bytearray(2 * BLOCK)
    for i in range(40):
        offset = (i * 77_777) % (BLOCK + BLOCK // 2)
        piece = bytes([i + 1]) * (BLOCK // 2 + i)
        await client.write(f.ino, offset, piece)  # returns before the worker has it
        expect[offset : offset + len(piece)] = piece
    await client.commit(f.ino, len(expect))
    assert await client.read(f.ino, 0, len(expect)) == bytes(expect)
