"""Workers: replication, failover to a replica, restarts, placement and capacity."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from fusecsi.cluster.client import ROOT_INO, ClusterClient, ClusterError
from fusecsi.cluster.local import LocalCluster

BLOCK = 1 << 20


def _blocks(cluster, i) -> set:
    root = cluster.base / f"worker{i}" / "blocks"
    return {p.name for p in root.rglob("*") if p.is_file() and p.name.isdigit()}


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    base = tmp_path_factory.mktemp("replicated")
    with LocalCluster(base, workers=2, replication=2, block_size=BLOCK) as cluster:
        yield cluster


async def test_two_replicas_keep_data_readable(replicated):
    cluster = replicated
    data = os.urandom(3 * BLOCK + 17)
    async with ClusterClient(cluster.master_addrs, timeout=20) as client:
        f = await client.create(ROOT_INO, b"replicated", 0o644, 0, 0)
        await client.write(f.ino, 0, data)
        await client.commit(f.ino, len(data))
        both = _blocks(cluster, 0) & _blocks(cluster, 1)
        assert len(both) >= 4, "every block should be on both workers"

        # a corrupted copy is detected and the other copy is read
        victim = next(p for p in (cluster.base / "worker0" / "blocks").rglob("*") if p.name in both)
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 1
        victim.write_bytes(bytes(raw))
        assert await client.read(f.ino, 0, len(data)) == data

        # one worker stopped: still readable, and new files land on the survivor
        await trio.to_thread.run_sync(cluster.stop_worker, 0)
        assert await client.read(f.ino, 0, len(data)) == data
        g = await client.create(ROOT_INO, b"while-degraded", 0o644, 0, 0)
        await client.write(g.ino, 0, b"d" * 5000)
        await client.commit(g.ino, 5000)
        assert await client.read(g.ino, 0, 5000) == b"d" * 5000
        info = await client.cluster_info()
        assert sum(w["live"] for w in info["workers"]) == 1
        await trio.to_thread.run_sync(cluster.start_worker, 0)
        assert await client.read(f.ino, 0, len(data)) == data


async def test_worker_restart_keeps_blocks(cluster):
    async with ClusterClient(cluster.master_addrs, timeout=20) as client:
        data = os.urandom(2 * BLOCK + 5)
        f = await client.create(ROOT_INO, b"survives-restart", 0o644, 0, 0)
        await client.write(f.ino, 0, data)
        await client.commit(f.ino, len(data))
        for i in range(2):
            await trio.to_thread.run_sync(cluster.stop_worker, i)
            await trio.to_thread.run_sync(cluster.start_worker, i)
        assert await client.read(f.ino, 0, len(data)) == data


async def test_all_workers_down_is_an_error_not_zeros(cluster):
    async with ClusterClient(cluster.master_addrs, timeout=5) as client:
        f = await client.create(ROOT_INO, b"needs-workers", 0o644, 0, 0)
        await client.write(f.ino, 0, b"x" * 100)
        await client.commit(f.ino, 100)
        for i in range(2):
            await trio.to_thread.run_sync(cluster.stop_worker, i)
        try:
            with pytest.raises(ClusterError) as info:
                await client.read(f.ino, 0, 100)
            assert info.value.errno in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EIO)
            with pytest.raises(ClusterError) as info:
                g = await client.create(ROOT_INO, b"no-space", 0o644, 0, 0)
                await client.write(g.ino, 0, b"y")
            assert info.value.errno == errno.ENOSPC
            fs = await client.statfs()
            assert fs["total_bytes"] == 0
        finally:
            for i in range(2):
                await trio.to_thread.run_sync(cluster.start_worker, i)
        assert await client.read(f.ino, 0, 100) == b"x" * 100


async def test_deleted_files_free_their_blocks(cluster):
    async with ClusterClient(cluster.master_addrs, timeout=20) as client:
        before = _blocks(cluster, 0) | _blocks(cluster, 1)
        f = await client.create(ROOT_INO, b"short-lived", 0o644, 0, 0)
        await client.write(f.ino, 0, b"z" * (2 * BLOCK))
        await client.commit(f.ino, 2 * BLOCK)
        mine = (_blocks(cluster, 0) | _blocks(cluster, 1)) - before
        assert len(mine) == 2
        await client.unlink(ROOT_INO, b"short-lived")
        for _ in range(100):  # delivered with the next heartbeat (every second)
            if not mine & (_blocks(cluster, 0) | _blocks(cluster, 1)):
                break
            await trio.sleep(0.1)
        assert not mine & (_blocks(cluster, 0) | _blocks(cluster, 1))


async def test_worker_failure_surfaces_at_commit(cluster):
    async with ClusterClient(cluster.master_addrs, timeout=5) as client:
        f = await client.create(ROOT_INO, b"lost-write", 0o644, 0, 0)
        await client.write(f.ino, 0, b"a" * 10)  # blocks allocated while both workers live
        await client.commit(f.ino, 10)
        for i in range(2):
            await trio.to_thread.run_sync(cluster.kill_worker, i)
        try:
            await client.write(f.ino, 10, b"b" * 10)
            with pytest.raises(ClusterError) as info:
                await client.commit(f.ino, 20)
            # retried until the timeout, then kept: every later commit reports it
            assert info.value.errno == errno.EIO
            assert (await client.getattr(f.ino)).size == 10
        finally:
            for i in range(2):
                await trio.to_thread.run_sync(cluster.start_worker, i)
        with pytest.raises(ClusterError) as info:
            await client.commit(f.ino, 20)
        assert info.value.errno == errno.EIO
        assert (await client.getattr(f.ino)).size == 10  # never past the lost bytes
        client.forget_writes(f.ino)  # (the FUSE daemon: at the last close) the file works again
        await client.write(f.ino, 10, b"c" * 10)
        await client.commit(f.ino, 20)
        assert await client.read(f.ino, 0, 20) == b"a" * 10 + b"c" * 10


async def test_full_workers_give_enospc(tmp_path):
    with LocalCluster(tmp_path, workers=1, block_size=BLOCK, worker_capacity=3 * BLOCK) as cluster:
        async with ClusterClient(cluster.master_addrs, timeout=10) as client:
            fs = await client.statfs()
            assert fs["total_bytes"] == 3 * BLOCK
            f = await client.create(ROOT_INO, b"fill", 0o644, 0, 0)
            await client.write(f.ino, 0, b"x" * (3 * BLOCK))
            await client.commit(f.ino, 3 * BLOCK)
            with pytest.raises(ClusterError) as info:
                await client.write(f.ino, 3 * BLOCK, b"y")
            assert info.value.errno == errno.ENOSPC
            assert await client.read(f.ino, 0, 3 * BLOCK) == b"x" * (3 * BLOCK)
            # freeing space makes room again (once the worker reports it)
            await client.setattr(f.ino, size=BLOCK)
            g = await client.create(ROOT_INO, b"after", 0o644, 0, 0)
            for _ in range(50):
                try:
                    await client.write(g.ino, 0, b"z" * BLOCK)
                    break
                except ClusterError as exc:
                    assert exc.errno == errno.ENOSPC
                    await trio.sleep(0.1)
            await client.commit(g.ino, BLOCK)
            assert await client.read(g.ino, 0, BLOCK) == b"z" * BLOCK
