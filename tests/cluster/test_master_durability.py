"""The master's durability model: a mutation is acknowledged once its journal record is
written (it survives SIGKILL), and whatever must survive a power loss waits for the sync.

The in-process tests run the real MasterService, Namespace and Journal on a temporary
directory and stop the journal's syncer thread for a while, so "not yet on disk" is a state
the test holds still instead of a race it hopes to win.
"""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from fusecsi.cluster.client import ROOT_INO, ClusterClient, ClusterError
from fusecsi.cluster.local import LocalCluster
from fusecsi.cluster.master.journal import Journal, read_segment
from fusecsi.cluster.master.main import load_namespace
from fusecsi.cluster.master.service import MasterService
from fusecsi.rpc.pool import Pool

BLOCK = 1 << 20
TAG = b"trusted.fusecsi.volume"


class Master:
    """A MasterService in this process whose journal syncer can be paused and resumed."""

    def __init__(self, nursery: trio.Nursery, data_dir: Path) -> None:
        self.nursery = nursery
        self.journal = Journal(data_dir)
        ns, _ = load_namespace(self.journal, BLOCK)
        self.service = MasterService(ns, self.journal, Pool(nursery, timeout=2))
        self._syncer: tuple[trio.CancelScope, trio.Event] | None = None

    async def start(self) -> None:
        await self.resume_syncing()
        await self.nursery.start(self.service.run)

    async def resume_syncing(self) -> None:
        scope, ended = trio.CancelScope(), trio.Event()

        async def syncing(task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await self.journal.run(task_status=task_status)
            finally:
                ended.set()

        await self.nursery.start(syncing)
        self._syncer = (scope, ended)

    async def pause_syncing(self) -> None:
        scope, ended = self._syncer
        scope.cancel()
        await ended.wait()  # the syncer thread wrote out what was pending, then ended
        assert self.journal.synced == self.journal.written

    def close(self) -> None:
        self.journal.close()


async def in_process(tmp_path: Path, body) -> None:
    async with trio.open_nursery() as nursery:
        master = Master(nursery, tmp_path)
        try:
            await master.start()
            await body(master)
        finally:
            nursery.cancel_scope.cancel()
    master.close()


async def test_acknowledged_before_synced_and_sync_journal_waits(tmp_path):
    async def body(m: Master) -> None:
        await m.pause_syncing()
        attr = m.service.create(ROOT_INO, b"f", 0o644, 0, 0)  # answered inline
        assert m.journal.written > m.journal.synced
        done = []

        async def sync() -> None:
            await m.service.sync_journal()
            done.append(m.journal.synced)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync)
            await trio.testing.wait_all_tasks_blocked()
            assert not done, "sync_journal answered before the journal was synced"
            await m.resume_syncing()
        assert done[0] >= m.journal.written
        # the record is in the file on disk
        segment = tmp_path / f"journal-{m.journal.segment}.log"
        records, _, torn = read_segment(segment)
        assert not torn and any(r[0] == "mk" and r[3] == attr[0] for r in records)

    await in_process(tmp_path, body)


async def test_mkvolume_is_synced_before_it_answers(tmp_path):
    async def body(m: Master) -> None:
        await m.pause_syncing()
        made = []

        async def mkvolume() -> None:
            attr = await m.service.mkvolume(ROOT_INO, b"vol", 0o777, {TAG: b"id-1"}, 1 << 30)
            made.append((attr, m.journal.synced, m.journal.written))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(mkvolume)
            await trio.testing.wait_all_tasks_blocked()
            assert not made, "mkvolume answered before its record was synced"
            await m.resume_syncing()
        attr, synced, written = made[0]
        assert synced >= written
        ns = m.service.ns
        node = ns.inodes[attr[0]]
        assert stat.S_ISDIR(node.mode) and stat.S_IMODE(node.mode) == 0o777
        assert (node.uid, node.gid, node.xattrs, node.quota) == (
            0,
            0,
            {TAG: b"id-1"},
            [1 << 30, None],
        )

    await in_process(tmp_path, body)
    # replay gives the same directory, tags and quota
    journal = Journal(tmp_path)
    ns, _ = load_namespace(journal, BLOCK)
    journal.close()
    node = ns.child(ROOT_INO, b"vol")
    assert node.xattrs == {TAG: b"id-1"} and node.quota == [1 << 30, None]


async def test_block_deletions_wait_for_the_freeing_record_to_sync(tmp_path):
    async def body(m: Master) -> None:
        s = m.service
        await s.register("w1", "127.0.0.1:9", 1 << 40, 1 << 40, [])
        f = s.create(ROOT_INO, b"f", 0o644, 0, 0)
        g = s.create(ROOT_INO, b"g", 0o644, 0, 0)
        f_blocks = [b[1] for b in s.allocate(f[0], 0, 2, 2 * BLOCK)["blocks"]]
        g_blocks = [b[1] for b in s.allocate(g[0], 0, 1, BLOCK)["blocks"]]
        await m.pause_syncing()
        s.unlink(ROOT_INO, b"f")
        s.rename(ROOT_INO, b"g", ROOT_INO, b"g2")  # frees nothing
        assert s.heartbeat("w1", 1 << 40, 1 << 40)["delete"] == []
        # a worker registering now is not told to delete blocks the disk still knows
        registering = []

        async def register() -> None:
            registering.append(await s.register("w1", "127.0.0.1:9", 1, 1, f_blocks + [99999]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(register)
            await trio.testing.wait_all_tasks_blocked()
            assert not registering
            await m.resume_syncing()
            await s.sync_journal()
        assert sorted(registering[0]["delete"]) == sorted(f_blocks + [99999])
        assert sorted(s.heartbeat("w1", 1 << 40, 1 << 40)["delete"]) == sorted(f_blocks)
        assert g_blocks and s.heartbeat("w1", 1 << 40, 1 << 40)["delete"] == []

    await in_process(tmp_path, body)


@pytest.fixture
def lone_cluster(tmp_path):
    with LocalCluster(tmp_path, workers=1, block_size=BLOCK) as cluster:
        yield cluster


async def test_acknowledged_changes_survive_sigkill_right_after(lone_cluster, tmp_path):
    cluster = lone_cluster
    async with ClusterClient(cluster.master_addrs, timeout=5) as client:
        top = await client.mkdir(ROOT_INO, b"quick", 0o755, 0, 0)
        for i in range(300):
            attr = await client.create(top.ino, b"f%d" % i, 0o644, 0, 0)
            await client.setxattr(attr.ino, b"user.i", b"%d" % i)
            if i % 3 == 0:
                await client.unlink(top.ino, b"f%d" % i)
    await trio.to_thread.run_sync(cluster.kill_master)  # no chance to sync on the way out
    await trio.to_thread.run_sync(cluster.restart_master)
    async with ClusterClient(cluster.master_addrs, timeout=5) as client:
        top = await client.lookup(ROOT_INO, b"quick")
        names = {name for name, _, _ in await client.readdir(top.ino, 0, 1000)}
        assert names == {b"f%d" % i for i in range(300) if i % 3}
        for i in (1, 200, 299):
            attr = await client.lookup(top.ino, b"f%d" % i)
            assert await client.getxattr(attr.ino, b"user.i") == b"%d" % i


async def test_mkvolume_and_sync_journal_over_the_wire(lone_cluster):
    async with ClusterClient(lone_cluster.master_addrs, timeout=5) as client:
        tags = {TAG: b"v1", b"trusted.fusecsi.owner": b"pvc-1"}
        attr = await client.mkvolume(ROOT_INO, b"v1", 0o777, tags, 5 << 30)
        assert stat.S_ISDIR(attr.mode) and (attr.uid, attr.gid) == (0, 0)
        assert await client.getxattr(attr.ino, TAG) == b"v1"
        quota = await client.get_quota(attr.ino)
        assert (quota.ino, quota.max_bytes, quota.max_inodes) == (attr.ino, 5 << 30, None)
        with pytest.raises(ClusterError) as err:
            await client.mkvolume(ROOT_INO, b"v1", 0o777, tags, 1)
        assert err.value.errno == errno.EEXIST
        for xattrs, max_bytes in [({TAG: "text"}, 1), ({b"": b"x"}, 1), (tags, -1)]:
            with pytest.raises(ClusterError) as err:
                await client.mkvolume(ROOT_INO, b"bad", 0o777, xattrs, max_bytes)
            assert err.value.errno == errno.EINVAL
        with pytest.raises(ClusterError) as err:
            await client.lookup(ROOT_INO, b"bad")
        assert err.value.errno == errno.ENOENT
        # the parent by path, resolved by the master in the same step
        parent = await client.mkdirs("/by/path")
        attr = await client.mkvolume("/by/path", b"v2", 0o777, tags, 1 << 30)
        assert (await client.lookup(parent.ino, b"v2")).ino == attr.ino
        for path, code in [
            ("/missing", errno.ENOENT),
            ("/v1/..", errno.EINVAL),
            ("v1", errno.EINVAL),
        ]:
            with pytest.raises(ClusterError) as err:
                await client.mkvolume(path, b"v3", 0o777, tags, 1)
            assert err.value.errno == code, path
        await client.create(ROOT_INO, b"file", 0o644, 0, 0)
        with pytest.raises(ClusterError) as err:
            await client.mkvolume("/file", b"v3", 0o777, tags, 1)
        assert err.value.errno == errno.ENOTDIR
        await client.sync_journal()


async def test_a_new_length_from_setattr_is_synced_before_it_answers(tmp_path):
    async def body(m: Master) -> None:
        s = m.service
        f = s.create(ROOT_INO, b"f", 0o644, 0, 0)
        s.commit(f[0], 5000)  # a hole: no block to cut
        await m.pause_syncing()
        assert (await s.setattr(f[0], mode=0o600))[1] & 0o777 == 0o600  # no sync needed
        assert m.journal.written > m.journal.synced
        answered = []

        async def truncate() -> None:
            answered.append(await s.setattr(f[0], size=100))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(truncate)
            await trio.testing.wait_all_tasks_blocked()
            assert not answered, "a truncation answered before it was synced"
            await m.resume_syncing()
        assert answered[0][5] == 100 and m.journal.synced == m.journal.written

    await in_process(tmp_path, body)
