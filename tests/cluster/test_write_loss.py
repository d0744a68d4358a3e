"""The client's write contract (issue 14): a refused write changes nothing and a write that
crosses a quota is cut to what fits; a piece that could not be stored is kept as a loss that
every later write and commit reports, and no commit publishes a length past it."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from fusecsi.cluster.client import ROOT_INO, ClusterClient, ClusterError, WriteLost
from fusecsi.cluster.local import LocalCluster

BLOCK = 1 << 20


async def test_reserve_cuts_a_write_at_the_quota(client, top):
    await client.set_quota(top.ino, 2 * BLOCK, None)
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    assert await client.reserve(f.ino, 0, BLOCK) == BLOCK
    await client.write(f.ino, 0, b"a" * BLOCK)
    assert await client.reserve(f.ino, BLOCK + BLOCK // 2, BLOCK) == BLOCK // 2
    with pytest.raises(ClusterError) as caught:
        await client.reserve(f.ino, 2 * BLOCK, 1)
    assert caught.value.errno == errno.EDQUOT
    await client.write(f.ino, BLOCK, b"b" * BLOCK)  # up to the limit exactly
    await client.commit(f.ino, 2 * BLOCK)
    assert await client.read(f.ino, 0, 3 * BLOCK) == b"a" * BLOCK + b"b" * BLOCK


async def test_a_lost_piece_caps_the_commit_and_is_kept_until_forgotten(tmp_path):
    with LocalCluster(tmp_path, workers=1, block_size=BLOCK) as cluster:
        async with ClusterClient(cluster.master_addrs, timeout=2) as client:
            f = await client.create(ROOT_INO, b"f", 0o644, 0, 0)
            first = os.urandom(BLOCK)
            await client.write(f.ino, 0, first)
            await client.read(f.ino, 0, 1)  # waits until the piece is stored
            await trio.to_thread.run_sync(cluster.kill_worker, 0)
            await client.write(f.ino, BLOCK, b"x" * BLOCK)  # on its way, then lost
            for _ in range(2):  # every commit reports it, none publishes past it
                with pytest.raises(WriteLost) as caught:
                    await client.commit(f.ino, 2 * BLOCK)
                assert caught.value.errno == errno.EIO and caught.value.offset == BLOCK
                assert (await client.getattr(f.ino)).size == BLOCK  # what was stored stays
            with pytest.raises(WriteLost):
                await client.write(f.ino, 2 * BLOCK, b"y")
            await trio.to_thread.run_sync(cluster.start_worker, 0)
            client.forget_writes(f.ino)
            await client.write(f.ino, BLOCK, b"z" * 10)
            await client.commit(f.ino, BLOCK + 10)
            assert await client.read(f.ino, 0, 2 * BLOCK) == first + b"z" * 10
