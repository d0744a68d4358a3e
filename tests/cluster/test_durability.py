"""Master crash safety: SIGKILL in the middle of a stream of mutations, then restart."""

from __future__ import annotations

import trio

from fusecsi.cluster.client import ROOT_INO, ClusterClient, ClusterError
from fusecsi.cluster.local import LocalCluster

WRITERS = 8


async def _listing(client, ino):
    out, cookie = {}, 0
    while page := await client.readdir(ino, cookie, 1000):
        out.update((name, attr) for name, attr, _ in page)
        cookie = page[-1][2]
    return out


async def test_acknowledged_mutations_survive_sigkill(tmp_path):
    # checkpoints every 200 records, so recovery reads a checkpoint plus a journal tail
    cluster = LocalCluster(tmp_path, workers=1, master_args=("--checkpoint-records", "200"))
    with cluster:
        expected: dict[bytes, tuple[int, bytes | None]] = {}  # acknowledged final state
        uncertain: set[bytes] = set()  # the call in flight when the master died
        async with ClusterClient(cluster.master_addrs, timeout=2) as client:
            top = await client.mkdir(ROOT_INO, b"stream", 0o755, 0, 0)
            await client.set_quota(top.ino, 1 << 40, 1 << 20)
            enough = trio.Event()

            async def writer(w: int) -> None:
                i = 0
                while True:
                    name = b"w%d-%d" % (w, i)
                    step = "create"
                    try:
                        attr = await client.create(top.ino, name, 0o644, 0, 0)
                        expected[name] = (attr.ino, None)
                        step = "xattr"
                        await client.setxattr(attr.ino, b"user.i", b"%d" % i)
                        expected[name] = (attr.ino, b"%d" % i)
                        if i % 3 == 0:
                            step = "rename"
                            new = b"r" + name
                            await client.rename(top.ino, name, top.ino, new)
                            expected[new] = expected.pop(name)
                            name = new
                        if i % 5 == 0:
                            step = "unlink"
                            await client.unlink(top.ino, name)
                            del expected[name]
                    except ClusterError:
                        uncertain.add(name)
                        if step == "rename":
                            uncertain.add(b"r" + name)
                        return
                    i += 1
                    if len(expected) >= 600:
                        enough.set()

            async with trio.open_nursery() as nursery:
                for w in range(WRITERS):
                    nursery.start_soon(writer, w)
                # kill once enough has been acknowledged to span a few checkpoints
                with trio.fail_after(120):
                    await enough.wait()
                await trio.to_thread.run_sync(cluster.kill_master)

        journal_dir = tmp_path / "master"
        assert list(journal_dir.glob("checkpoint-*.mp")), "no checkpoint was taken"
        # a record torn by the crash (length says more than was written) is dropped on replay
        newest = max(int(p.stem.split("-")[1]) for p in journal_dir.glob("*-*.*"))
        torn = journal_dir / f"journal-{newest}.log"
        torn.write_bytes((torn.read_bytes() if torn.exists() else b"") + b"\x00\x00\x10\x00garbage")

        await trio.to_thread.run_sync(cluster.restart_master)
        async with ClusterClient(cluster.master_addrs) as client:
            top = await client.lookup(ROOT_INO, b"stream")
            listing = await _listing(client, top.ino)
            for name, (ino, xattr) in expected.items():
                if name in uncertain:
                    continue
                assert name in listing, f"acknowledged {name!r} lost"
                assert listing[name].ino == ino
                if xattr is not None:
                    assert await client.getxattr(ino, b"user.i") == xattr
            stray = set(listing) - set(expected)
            assert stray <= uncertain, f"unacknowledged entries appeared: {stray - uncertain}"
            # the namespace is consistent: usage matches the entries, counters moved on
            quota = await client.get_quota(top.ino)
            assert quota.used_inodes == len(listing)
            newest = max(attr.ino for attr in listing.values())
            fresh = await client.create(top.ino, b"after-restart", 0o644, 0, 0)
            assert fresh.ino > newest
            assert (await client.getattr(top.ino)).nlink == 2


async def test_master_restart_keeps_data_and_clients_reconnect(tmp_path):
    with LocalCluster(tmp_path, workers=1) as cluster:
        async with ClusterClient(cluster.master_addrs, timeout=20) as client:
            f = await client.create(ROOT_INO, b"f", 0o644, 0, 0)
            await client.write(f.ino, 0, b"persist" * 1000)
            await client.commit(f.ino, 7000)
            await client.setxattr(f.ino, b"user.k", b"v")
            await trio.to_thread.run_sync(cluster.stop_master)
            # an idempotent call waits for the master to come back
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, cluster.restart_master)
                attr = await client.getattr(f.ino)
            assert attr.size == 7000
            assert await client.read(f.ino, 0, 7000) == b"persist" * 1000
            assert await client.getxattr(f.ino, b"user.k") == b"v"
            g = await client.create(ROOT_INO, b"g", 0o644, 0, 0)
            assert g.ino > f.ino
