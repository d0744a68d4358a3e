"""Short-circuit block I/O: a client on a worker's host uses the block files the worker hands it
over its unix socket (real worker processes, real unix sockets, real descriptor passing)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat

import pytest
import trio

from fusecsi.cluster import shortcircuit
from fusecsi.cluster.client import ROOT_INO, ClusterClient, ClusterError
from fusecsi.cluster.local import LocalCluster
from fusecsi.cluster.readmemory import ReadMemory
from fusecsi.cluster.worker.store import CHUNK
from fusecsi.rpc.blocking import call_sync

BLOCK = 1 << 20  # the block size of the `cluster` fixture (conftest.py)
TOKEN = "short-circuit-secret"
ROUNDS = 150


def _block_paths(cluster, i: int) -> dict[int, object]:
    root = cluster.base / f"worker{i}" / "blocks"
    return {int(p.name): p for p in root.rglob("*") if p.is_file() and p.name.isdigit()}


def _held(client: ClusterClient, writable: bool | None = None) -> set[int]:
    """Blocks the client holds descriptors of (through short-circuit)."""
    entries = client._sc.files.entries.values()
    return {e.block_id for e in entries if writable is None or e.writable == writable}


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    base = tmp_path_factory.mktemp("sc-replicated")
    with LocalCluster(base, workers=2, replication=2, block_size=BLOCK) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """One worker with a token and a capacity limit."""
    base = tmp_path_factory.mktemp("sc-guarded")
    with LocalCluster(
        base, workers=1, token=TOKEN, block_size=BLOCK, worker_capacity=64 * BLOCK
    ) as cluster:
        yield cluster


async def test_round_trip_with_holes_goes_through_the_files(cluster, top):
    async with ClusterClient(cluster.master_addrs, timeout=20, short_circuit=True) as client:
        f = await client.create(top.ino, b"sparse", 0o644, 0, 0)
        head = os.urandom(CHUNK + 123)  # ends inside the second chunk
        tail = os.urandom(BLOCK // 2)  # straddles blocks 2 and 3
        tail_at = 2 * BLOCK + BLOCK // 2 + 7
        await client.write(f.ino, 0, head)
        await client.write(f.ino, tail_at, tail)
        await client.write(f.ino, 10, b"overwritten")  # a small write on the event loop
        size = tail_at + len(tail)
        await client.commit(f.ino, size, durable=True)
        expect = bytearray(size)
        expect[: len(head)] = head
        expect[10:21] = b"overwritten"
        expect[tail_at:] = tail
        assert await client.read(f.ino, 0, size + 100) == bytes(expect)
        assert await client.read(f.ino, BLOCK + 5, 4096) == bytes(4096)  # a hole block
        assert await client.read(f.ino, CHUNK + 100, 100) == bytes(
            expect[CHUNK + 100 : CHUNK + 200]
        )
        assert len(_held(client, writable=True)) == 3  # blocks 0, 2, 3; block 1 is a hole
        # what the client wrote into the files carries valid checksums: the worker's own read
        # path (which verifies every chunk it returns) gives the same bytes
        async with ClusterClient(cluster.master_addrs, short_circuit=False) as tcp:
            assert tcp._sc is None
            assert await tcp.read(f.ino, 0, size) == bytes(expect)


async def test_disabled_short_circuit_still_works(cluster, top, monkeypatch):
    monkeypatch.setenv("FUSECSI_SHORT_CIRCUIT", "0")
    async with ClusterClient(cluster.master_addrs, timeout=20) as client:
        assert client._sc is None and not client.short_circuit
        f = await client.create(top.ino, b"tcp", 0o644, 0, 0)
        data = os.urandom(BLOCK + 999)
        await client.write(f.ino, 0, data)
        await client.commit(f.ino, len(data), durable=True)
        assert await client.read(f.ino, 0, len(data)) == data


async def test_corrupted_chunk_falls_back_to_the_other_replica(replicated):
    async with ClusterClient(replicated.master_addrs, timeout=20) as client:
        f = await client.create(ROOT_INO, b"corrupt", 0o644, 0, 0)
        data = os.urandom(3 * CHUNK)
        await client.write(f.ino, 0, data)
        await client.commit(f.ino, len(data))
        assert await client.read(f.ino, 0, len(data)) == data
        (block_id,) = _held(client)
        assert len(client._sc.local) == 2  # both workers are on this host
        assert len(client._sc.files.entries) == 2  # a descriptor pair from each
        # the same bad byte in the copy read first, then in the other one
        first = client._read_maps[f.ino].blocks[0][1][0]
        order = sorted(range(2), key=lambda i: first != f"127.0.0.1:{replicated.worker_ports[i]}")
        for i in order:
            path = _block_paths(replicated, i)[block_id]
            raw = bytearray(path.read_bytes())
            raw[CHUNK + 5] ^= 0x40
            fd = os.open(path, os.O_WRONLY)  # in place: the client's descriptor sees it
            try:
                os.pwrite(fd, raw, 0)
            finally:
                os.close(fd)
            if i == order[0]:
                assert await client.read(f.ino, CHUNK, 4096) == data[CHUNK : CHUNK + 4096]
                assert await client.read(f.ino, 0, len(data)) == data
        with pytest.raises(ClusterError) as info:  # no good copy left: an error, never bytes
            await client.read(f.ino, CHUNK, 4096)
        assert info.value.errno == errno.EIO
        assert await client.read(f.ino, 0, 4096) == data[:4096]  # other chunks still verify


async def test_short_circuit_and_tcp_writers_share_a_block(cluster, top):
    """A short-circuit client and a TCP client keep rewriting the two halves of a file whose
    middle 64 KiB chunk they share, while both keep reading that chunk: the checksum lock keeps
    every read consistent (a torn data/checksum pair would read as EIO) and the final
    checksums right."""
    half = 2 * CHUNK + CHUNK // 3  # each side's piece spans three chunks; they share one
    async with (
        ClusterClient(cluster.master_addrs, timeout=20, short_circuit=True) as local,
        ClusterClient(cluster.master_addrs, timeout=20, short_circuit=False) as remote,
    ):
        f = await local.create(top.ino, b"shared", 0o644, 0, 0)
        await local.write(f.ino, 0, bytes(2 * half))
        await local.commit(f.ino, 2 * half)
        last = {}

        async def writer(client: ClusterClient, offset: int, mark: int) -> None:
            for rnd in range(ROUNDS):
                last[mark] = bytes([(rnd + mark) % 250 + 1]) * half
                await client.write(f.ino, offset, last[mark])
                await client.commit(f.ino, 2 * half)

        async def reader(client: ClusterClient) -> None:
            for _ in range(ROUNDS):
                client.forget_layout(f.ino)
                assert len(await client.read(f.ino, CHUNK, 3 * CHUNK)) == 3 * CHUNK

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, local, 0, 0)
            nursery.start_soon(writer, remote, half, 1)
            nursery.start_soon(reader, local)
            nursery.start_soon(reader, remote)
        assert _held(local, writable=True)  # the local writer did use the block file
        assert await remote.read(f.ino, 0, 2 * half) == last[0] + last[1]  # worker verifies
        local.forget_layout(f.ino)
        assert await local.read(f.ino, 0, 2 * half) == last[0] + last[1]  # client verifies


async def test_large_reads_of_one_block_do_not_wait_their_turn(cluster, top):
    """Read-ahead windows of one block are read side by side: a large read locks a checksum
    descriptor of its own instead of queueing on the block's lock (held here, as a long write
    through this client would hold it), while a small read still waits for its turn."""
    async with ClusterClient(cluster.master_addrs, timeout=20, short_circuit=True) as client:
        f = await client.create(top.ino, b"side-by-side", 0o644, 0, 0)
        data = os.urandom(BLOCK)
        await client.write(f.ino, 0, data)
        await client.commit(f.ino, BLOCK)
        (entry,) = client._sc.files.entries.values()
        got = {}

        async def read(offset: int) -> None:
            got[offset] = await client.read(f.ino, offset, 4096 if offset == 4096 else 256 << 10)

        async with entry.lock:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for offset in (0, 256 << 10, 512 << 10):
                        nursery.start_soon(read, offset)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, 4096)  # small: waits for the lock
                await trio.sleep(0.5)
                assert 4096 not in got
                nursery.cancel_scope.cancel()
        assert got == {o: data[o : o + (256 << 10)] for o in got}
        assert await client.read(f.ino, 0, 4096) == data[:4096]


async def test_deleted_block_is_not_written_again(cluster, top, monkeypatch):
    monkeypatch.setattr(shortcircuit, "SWEEP_INTERVAL", 3600)  # keep the stale descriptor
    async with (
        ClusterClient(cluster.master_addrs, timeout=20) as client,
        ClusterClient(cluster.master_addrs, timeout=20) as other,
    ):
        f = await client.create(top.ino, b"freed", 0o644, 0, 0)
        await client.write(f.ino, 0, b"1" * 5000)
        await client.commit(f.ino, 5000)
        (old,) = _held(client, writable=True)
        worker_index = next(i for i in range(2) if old in _block_paths(cluster, i))
        owner = client._sc.local[f"127.0.0.1:{cluster.worker_ports[worker_index]}"]
        await other.setattr(f.ino, size=0)  # the master frees the block...
        for _ in range(100):  # ...and the worker deletes it with its next heartbeat
            if old not in _block_paths(cluster, worker_index):
                break
            await trio.sleep(0.1)
        assert old not in _block_paths(cluster, worker_index)
        assert old in _held(client)  # still held: a write through it comes next
        # a late write through the descriptor still held goes to a fresh block instead
        await client.write(f.ino, 0, b"2" * 50)
        await client.commit(f.ino, 50)
        assert old not in _block_paths(cluster, worker_index)
        assert await client.read(f.ino, 0, 100) == b"2" * 50
        assert await other.read(f.ino, 0, 100) == b"2" * 50
        assert old not in _held(client)
        # and the worker refuses to hand out the deleted block again, even for writing
        with pytest.raises(ClusterError) as info:
            await owner.open(old, True)
        assert info.value.errno == errno.ENOENT
        assert old not in _block_paths(cluster, worker_index)


async def test_descriptors_of_deleted_blocks_are_let_go(cluster, top):
    """An open descriptor would keep a freed block's disk space: the client closes it soon
    after the worker deletes the block, without touching the file again."""
    async with ClusterClient(cluster.master_addrs, timeout=20) as client:
        f = await client.create(top.ino, b"let-go", 0o644, 0, 0)
        await client.write(f.ino, 0, b"x" * (2 * BLOCK))
        await client.commit(f.ino, 2 * BLOCK)
        held = [e for e in client._sc.files.entries.values() if e.block_id in _held(client)]
        assert len(held) == 2
        await client.unlink(top.ino, b"let-go")
        for _ in range(100):  # deleted at the worker's next heartbeat, let go at the next sweep
            if all(e.fd == -1 for e in held):
                break
            await trio.sleep(0.1)
        assert all(e.fd == -1 for e in held) and not _held(client)


async def test_worker_restart_while_descriptors_are_cached(guarded):
    cluster = guarded
    async with ClusterClient(cluster.master_addrs, token=TOKEN, timeout=5) as client:
        f = await client.create(ROOT_INO, b"restart", 0o644, 0, 0)
        data = os.urandom(2 * BLOCK + 77)
        await client.write(f.ino, 0, data)
        await client.commit(f.ino, len(data))
        assert await client.read(f.ino, 0, len(data)) == data
        before = set(client._sc.files.entries.values())
        assert len(before) == 3
        await trio.to_thread.run_sync(cluster.stop_worker, 0)
        try:
            # descriptors do not outlive the worker that handed them out
            with pytest.raises(ClusterError):
                await client.read(f.ino, 0, 100)
        finally:
            await trio.to_thread.run_sync(cluster.start_worker, 0)
        client._sc.retry_at.clear()  # do not wait DISCOVERY_RETRY seconds to look again
        assert await client.read(f.ino, 0, len(data)) == data
        await client.write(f.ino, len(data), b"more")
        await client.commit(f.ino, len(data) + 4)
        assert await client.read(f.ino, len(data) - 3, 10) == data[-3:] + b"more"
        after = set(client._sc.files.entries.values())
        assert len(after) == 3 and not before & after
        assert all(e.fd == -1 for e in before)  # closed


async def test_socket_is_private_and_needs_the_token(guarded):
    address = f"127.0.0.1:{guarded.worker_ports[0]}"
    info = call_sync(address, "worker_info", token=TOKEN)
    path = info["local_socket"]
    assert stat.S_ISSOCK(os.stat(path).st_mode) and os.stat(path).st_mode & 0o777 == 0o600
    from fusecsi.cluster.shortcircuit import LocalWorker

    with pytest.raises(ClusterError) as err:
        await LocalWorker.connect(address, path, "wrong")
    assert err.value.errno == errno.EACCES
    for junk in (b"\x00\x00\x00\x03\xc1\xc1\xc1", b"\x00\x00\x00\x02\x01\x02", b"\xff" * 8):
        with socket.socket(socket.AF_UNIX) as raw:  # malformed frames: that client is dropped
            raw.connect(path)
            raw.sendall(junk)
            raw.settimeout(5)
            assert raw.recv(100) == b""  # closed by the worker
    worker = await LocalWorker.connect(address, path, TOKEN)  # the others are still served
    try:
        assert worker.worker_id == info["id"]
        with pytest.raises(ClusterError) as err:
            await worker.open(0, False)  # the TCP path's checks: block ids start at 1
        assert err.value.errno == errno.EINVAL
        with pytest.raises(ClusterError) as err:
            await worker.open(123456789, False)  # reading a block that does not exist
        assert err.value.errno == errno.ENOENT
    finally:
        worker.close()


async def test_short_circuit_writes_count_against_capacity(guarded):
    address = f"127.0.0.1:{guarded.worker_ports[0]}"
    async with ClusterClient(guarded.master_addrs, token=TOKEN, timeout=20) as client:
        f = await client.create(ROOT_INO, b"counted", 0o644, 0, 0)
        await client.write(f.ino, 0, b"c" * (3 * BLOCK))
        await client.commit(f.ino, 3 * BLOCK)
        assert len(_held(client, writable=True)) == 3
        stored = sum(p.stat().st_size for p in _block_paths(guarded, 0).values())
        assert stored >= 3 * BLOCK
        for _ in range(50):  # the worker re-reads the sizes with each heartbeat
            free = call_sync(address, "worker_info", token=TOKEN)["free"]
            if free == 64 * BLOCK - stored:
                break
            await trio.sleep(0.1)
        assert free == 64 * BLOCK - stored


def test_block_checksums_stay_zlibs_crc32(tmp_path):
    """Blocks written before the checksums went to ISA-L (zlib's CRC-32) read back, and
    those written now verify with zlib: the two are the same function."""
    import array
    import zlib

    from fusecsi.cluster.worker import store

    data = os.urandom(3 * store.CHUNK + 1000)
    with open(tmp_path / "b", "wb+") as f, open(tmp_path / "b.crc", "wb+") as c:
        store.write_at(f.fileno(), c.fileno(), 0, data)
        crcs = array.array("I", (tmp_path / "b.crc").read_bytes())
        chunks = [data[i : i + store.CHUNK] for i in range(0, len(data), store.CHUNK)]
        assert list(crcs) == [zlib.crc32(chunk) for chunk in chunks]
        assert store.read_at(f.fileno(), c.fileno(), 100, 200_000) == data[100:200_100]
    assert store.crc32(data, 7) == zlib.crc32(data, 7)


def test_read_memory_is_lent_again_only_when_no_view_is_left():
    """Large reads go straight into memory kept for them and on to FUSE as views: a buffer
    is lent again only once nothing refers to it, or bytes a reader holds would change."""
    memory = ReadMemory(buffer=1 << 20, keep=2)
    first = memory.take(1 << 20)
    first[:4] = b"keep"
    held = first[:4]  # a slice, as handed on to FUSE
    del first
    second = memory.take(4096)
    second[:4] = b"over"
    assert bytes(held) == b"keep"  # still in use: another buffer was lent
    assert held.obj is not second.obj
    third = memory.take(4096)  # both kept ones in use: fresh memory, not kept
    assert third.obj is not held.obj and third.obj is not second.obj
    kept = held.obj
    del held
    again = memory.take(8192)
    assert again.obj is kept  # nothing refers to it any more: lent again
    assert memory.take(2 << 20).nbytes == 2 << 20  # larger than a buffer: memory of its own


def test_read_memory_not_lent_for_a_while_is_unmapped():
    memory = ReadMemory(buffer=1 << 20, keep=2)
    held = memory.take(4096)
    memory.take(4096)  # dropped at once: the second kept buffer is free
    memory.trim(3600)  # taken just now: kept
    assert len(memory._kept) == 2
    memory.trim(0)
    assert memory._kept == [held.obj]  # the one still referred to stays
    assert bytes(held[:1]) == b"\0"


async def test_small_reads_answered_at_once_are_verified_and_give_way(cluster, top):
    """A small read of a block whose descriptors the client holds is answered without an
    await (`read_now`, the FUSE daemon's path for small random reads). Whatever would
    wait or fails is left to `read` (None): a bad chunk is EIO there, never bytes."""
    async with ClusterClient(cluster.master_addrs, timeout=20) as client:
        f = await client.create(top.ino, b"now", 0o644, 0, 0)
        data = os.urandom(3 * CHUNK + 100)
        await client.write(f.ino, 0, data)
        await client.commit(f.ino, len(data), durable=True)
        assert client.read_now(f.ino, 0, 4096) is None  # no block map or descriptors yet
        assert await client.read(f.ino, 0, 4096) == data[:4096]
        assert client.read_now(f.ino, 100, 4096) == data[100:4196]
        assert client.read_now(f.ino, CHUNK - 10, 4096) == data[CHUNK - 10 : CHUNK + 4086]
        assert client.read_now(f.ino, 3 * CHUNK, 100) == data[3 * CHUNK :]  # the short chunk
        assert client.read_now(f.ino, 3 * CHUNK, 4096) is None  # past the known length
        (block_id,) = _held(client)
        (entry,) = client._sc.files.entries.values()
        async with entry.lock:  # a task of this client is using the block
            assert client.read_now(f.ino, 0, 4096) is None
        (path,) = [p[block_id] for i in range(2) if block_id in (p := _block_paths(cluster, i))]
        crc = os.open(path.with_name(path.name + ".crc"), os.O_RDONLY)
        try:
            fcntl.flock(crc, fcntl.LOCK_EX)  # a writer elsewhere holds the block
            assert client.read_now(f.ino, 0, 4096) is None
        finally:
            os.close(crc)
        assert client.read_now(f.ino, 0, 4096) == data[:4096]
        fd = os.open(path, os.O_WRONLY)  # in place: the client's descriptor sees it
        try:
            os.pwrite(fd, bytes([data[2 * CHUNK + 5] ^ 0x40]), 2 * CHUNK + 5)
        finally:
            os.close(fd)
        assert client.read_now(f.ino, 2 * CHUNK, 4096) is None
        assert client.read_now(f.ino, 2 * CHUNK - 100, 200) is None  # touches the bad chunk
        with pytest.raises(ClusterError) as info:
            await client.read(f.ino, 2 * CHUNK, 4096)
        assert info.value.errno == errno.EIO
        assert client.read_now(f.ino, CHUNK, 4096) == data[CHUNK : CHUNK + 4096]
        os.unlink(path)  # the block is gone (as when the master frees it): never read from
        assert client.read_now(f.ino, 0, 4096) is None


async def test_an_open_cancelled_before_its_reply_does_not_answer_the_next(guarded):
    """One request at a time goes over a worker's local socket. An open cancelled after its
    request went out (a sibling read failed, a deadline passed) leaves a reply behind that
    must never be taken for the next open's: that one would get another block's
    descriptors, and its checksums too, so wrong bytes would pass as verified."""
    async with ClusterClient(guarded.master_addrs, token=TOKEN, timeout=5) as client:
        f = await client.create(ROOT_INO, b"cancelled-open", 0o644, 0, 0)
        data = os.urandom(2 * BLOCK)
        await client.write(f.ino, 0, data)
        await client.commit(f.ino, len(data))
        assert await client.read(f.ino, 0, 4096) == data[:4096]
        first, addrs = client._read_maps[f.ino].blocks[0][:2]  # one worker holds both blocks
        sc = client._sc
        worker = sc.local[addrs[0]]
        sc.files.close()  # every block is opened afresh

        async def reply_not_awaited():
            await trio.sleep_forever()

        worker.channel.receive = reply_not_awaited  # the request goes out, then a cancel
        with trio.move_on_after(0.1) as scope:
            await sc._entry(worker, first, False)
        assert scope.cancelled_caught
        del worker.channel.receive
        assert await client.read(f.ino, BLOCK, 4096) == data[BLOCK : BLOCK + 4096]
        assert await client.read(f.ino, 0, 4096) == data[:4096]
