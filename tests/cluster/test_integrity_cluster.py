"""The embedded cluster never deletes or invents data (issue 14, items 3, 4, 5 and 7).

- a worker and a client refuse a master of another cluster (cluster id), so listing two
  independent masters never gets blocks deleted;
- a block that held data and is gone from every replica reads EIO, never zeros;
- a data dir is locked: a second master or worker on it exits at once;
- right after a master restart "no worker yet" is a wait, not ENOSPC.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest
import trio

from fusecsi.cluster.client import ROOT_INO, ClusterClient, ClusterError
from fusecsi.cluster.local import LocalCluster, free_port
from fusecsi.cluster.master.journal import Journal
from fusecsi.cluster.master.main import load_namespace
from fusecsi.cluster.master.service import MasterService
from fusecsi.rpc.blocking import call_sync
from fusecsi.rpc.pool import Pool

BLOCK = 1 << 20


def _block_files(cluster: LocalCluster, i: int) -> set[str]:
    root = cluster.base / f"worker{i}" / "blocks"
    return {p.name for p in root.rglob("*") if p.is_file() and p.name.isdigit()}


async def _wait_for(condition, what: str, tries: int = 300) -> None:
    for _ in range(tries):
        if await trio.to_thread.run_sync(condition):
            return
        await trio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def _put(client: ClusterClient, name: bytes, data: bytes, at: int = 0) -> int:
    f = await client.create(ROOT_INO, name, 0o644, 0, 0)
    await client.write(f.ino, at, data)
    await client.commit(f.ino, at + len(data), durable=True)
    return f.ino


@pytest.fixture
def lone(tmp_path):
    with LocalCluster(tmp_path / "a", workers=1, block_size=BLOCK) as cluster:
        yield cluster


# ---------------------------------------------------------------- item 3: cluster id


async def test_a_worker_and_a_client_refuse_a_master_of_another_cluster(tmp_path):
    data = os.urandom(2 * BLOCK + 99)
    with LocalCluster(tmp_path / "b", workers=0) as other:
        cluster = LocalCluster(tmp_path / "a", workers=1, block_size=BLOCK)
        both = f"{cluster.master_addrs},{other.master_addrs}"
        cluster.worker_args = ("--master-addrs", both)  # the last --master-addrs wins
        with cluster:
            async with ClusterClient(both, timeout=3) as client:
                ino = await _put(client, b"precious", data)
                blocks = _block_files(cluster, 0)
                assert len(blocks) == 3
                await trio.to_thread.run_sync(cluster.kill_master)

                def tried_other() -> bool:  # refused there, or (the bug) registered there
                    info = call_sync(other.master_addrs, "cluster_info", timeout=2)
                    refused = "refusing a master of another cluster"
                    return bool(info["workers"]) or refused in cluster.log_text("worker0")

                await _wait_for(tried_other, "the worker to try the other master")
                info = call_sync(other.master_addrs, "cluster_info", timeout=2)
                assert info["workers"] == [], "registered with another cluster's master"
                with pytest.raises(ClusterError) as raised:
                    await client.getattr(ROOT_INO)
                assert other.master_addrs in raised.value.strerror
                assert "belongs to cluster" in raised.value.strerror
                assert "refused a worker of another cluster" in other.log_text("master")
                assert _block_files(cluster, 0) == blocks  # nothing deleted

                await trio.to_thread.run_sync(cluster.restart_master)
                assert await client.read(ino, 0, len(data)) == data


# ---------------------------------------------------------------- item 4: lost blocks


async def test_blocks_lost_with_a_data_dir_read_eio_and_holes_stay_zeros(lone):
    cluster = lone
    data = os.urandom(2 * BLOCK + 5)
    async with ClusterClient(cluster.master_addrs, timeout=10) as client:
        ino = await _put(client, b"lost", data)
        # blocks 1 and 2 are allocated ahead of the write at block 3, never written
        sparse = await _put(client, b"sparse", b"s" * 100)
        await client.write(sparse, 3 * BLOCK, b"t" * 100)
        await client.commit(sparse, 3 * BLOCK + 100, durable=True)
        assert await client.read(sparse, BLOCK, 2 * BLOCK) == bytes(2 * BLOCK)

        await trio.to_thread.run_sync(cluster.kill_worker, 0)
        shutil.rmtree(cluster.base / "worker0")
        await trio.to_thread.run_sync(cluster.start_worker, 0)  # a new id, same address

        client.forget_layout(ino)
        with pytest.raises(ClusterError) as raised:
            await client.read(ino, 0, 100)
        assert raised.value.errno == errno.EIO
        with pytest.raises(ClusterError) as raised:
            await client.read(ino, BLOCK + 10, 2 * BLOCK)
        assert raised.value.errno == errno.EIO
        client.forget_layout(sparse)
        assert await client.read(sparse, BLOCK, 2 * BLOCK) == bytes(2 * BLOCK)  # still a hole
        _, rows = await client._call("layout", sparse, 0, 4, True, idempotent=True)
        assert [row[3] for row in rows] == [True, False, False, True]  # 1, 2: allocated ahead
    assert "blocks that held data have no copy here" in cluster.log_text("master")
    got = await trio.run_process(
        [sys.executable, "-m", "fusecsi", "fs", "--master-addrs", cluster.master_addrs]
        + ["get", "/lost", "-"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert got.returncode != 0 and b"EIO" in got.stderr


async def test_holds_data_marks_survive_replay_and_checkpoints_and_go_with_their_blocks(tmp_path):
    def reload():
        journal = Journal(tmp_path)
        try:
            return load_namespace(journal, BLOCK)[0].holding
        finally:
            journal.close()

    async with trio.open_nursery() as nursery:
        journal = Journal(tmp_path)
        ns, _ = load_namespace(journal, BLOCK)
        s = MasterService(ns, journal, Pool(nursery, timeout=1))
        await nursery.start(journal.run)
        await nursery.start(s.run)
        await s.register("w1", "127.0.0.1:9", 1 << 40, 1 << 40, [])
        f = s.create(ROOT_INO, b"f", 0o644, 0, 0)
        one, two = (row[1] for row in s.allocate(f[0], 0, 2, 2 * BLOCK)["blocks"])
        s.commit(f[0], 2 * BLOCK)
        assert s.heartbeat("w1", 1 << 40, 1 << 40, [one])["known"]
        await s.checkpoint()  # `one` is in the checkpoint, `two` only in the journal
        assert s.blocks_written("w1", [two]) and not s.blocks_written("w2", [two + 1])
        assert [row[3] for row in s.layout(f[0], 0, 2, True)[1]] == [True, True]
        assert all(len(row) == 3 for row in s.layout(f[0], 0, 2)[1])  # as older clients read
        await s.sync_journal()
        assert reload() == {one, two}
        await s.setattr(f[0], size=BLOCK)  # frees `two`
        await s.checkpoint()
        assert reload() == {one}
        nursery.cancel_scope.cancel()
    journal.close()


# ---------------------------------------------------------------- item 5: data dir lock


@pytest.mark.parametrize("role", ["master", "worker"])
def test_a_second_daemon_on_a_locked_data_dir_exits_at_once(lone, role):
    cluster = lone
    holder = cluster.master if role == "master" else cluster.workers[0]
    data_dir = cluster.base / ("master" if role == "master" else "worker0")
    args = ["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data_dir)]
    if role == "worker":
        args += ["--master-addrs", cluster.master_addrs, "--local-socket", ""]
    before = sorted(p.name for p in data_dir.iterdir())
    second = subprocess.run(
        [sys.executable, "-m", "fusecsi", role, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=cluster._env(),
    )
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and str(data_dir) in lines[0] and f"pid {holder.pid}" in lines[0]
    assert sorted(p.name for p in data_dir.iterdir()) == before  # nothing replayed or pruned


# ---------------------------------------------------------------- item 7: not ready != full


async def test_allocation_right_after_a_master_restart_waits_for_workers(lone):
    cluster = lone
    async with ClusterClient(cluster.master_addrs, timeout=30) as client:
        await _put(client, b"before", b"b" * 10)
        worker = cluster.workers[0]
        worker.send_signal(signal.SIGSTOP)  # it cannot re-register until resumed
        try:
            await trio.to_thread.run_sync(cluster.kill_master)
            await trio.to_thread.run_sync(cluster.start_master)
            async with trio.open_nursery() as nursery:

                async def resume() -> None:
                    await trio.sleep(1)
                    worker.send_signal(signal.SIGCONT)

                nursery.start_soon(resume)
                ino = await _put(client, b"after", b"a" * (BLOCK + 1))
        finally:
            worker.send_signal(signal.SIGCONT)
        assert await client.read(ino, 0, BLOCK + 1) == b"a" * (BLOCK + 1)
