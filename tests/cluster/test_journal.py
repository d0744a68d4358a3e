"""The journal and checkpoints in process: replaying records rebuilds the same namespace."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import msgpack
import pytest
import trio

from fusecsi.cluster.master.journal import Journal, read_segment
from fusecsi.cluster.master.namespace import Namespace


def _records(ns: Namespace) -> list[list]:
    """A mixed history built through plan/apply, as the master does it."""
    out = []

    def do(record):
        ns.apply(record)
        out.append(record)

    do(ns.plan_mk(1, b"d", 10, stat.S_IFDIR | 0o755, 0, 0, 1))
    do(ns.plan_mk(10, b"f", 11, stat.S_IFREG | 0o644, 5, 6, 2))
    do(ns.plan_mk(10, b"s", 12, stat.S_IFLNK | 0o777, 0, 0, 3, b"target"))
    do(ns.plan_quota(10, 1 << 20, 100))
    do(["alloc", 11, [[0, 20, ["w1"]], [1, 21, ["w1", "w2"]]]])
    do(ns.plan_commit(11, 5000, None, 4))
    do(ns.plan_xset(11, b"user.a", b"1", 0, 5))
    do(ns.plan_ln(11, 1, b"hard", 6))
    do(ns.plan_batch(10, [b"b%d" % i for i in range(50)], 30, stat.S_IFREG | 0o600, 0, 0, 7))
    do(ns.plan_rm(10, b"b7", False, 8))
    do(ns.plan_mv(10, b"b8", 1, b"moved", 0, 9))
    do(ns.plan_attr(11, 0o600, None, None, 10, None, 77, 10))
    do(ns.plan_mk(10, b"dev", 13, stat.S_IFCHR | 0o600, 0, 0, 11, None, 0x10305))
    do(ns.plan_mk(10, b"fifo", 14, stat.S_IFIFO | 0o644, 0, 0, 12))
    do(["worker", "w1", "127.0.0.1:1"])
    do(["ids", 1000])
    return out


def _dump(ns: Namespace) -> bytes:
    return msgpack.packb(ns.dump(), use_bin_type=True)


def test_checkpoint_roundtrip_is_exact():
    ns = Namespace(1 << 20)
    _records(ns)
    data = msgpack.unpackb(_dump(ns), raw=False, strict_map_key=False)
    again = Namespace.load(data)
    assert _dump(again) == _dump(ns)
    q = again.nearest_quota(11)
    assert again.quota_info(q) == ns.quota_info(ns.nearest_quota(11))
    # cookies survive: the listing continues where it was
    assert again.readdir(10, 0, 5) == ns.readdir(10, 0, 5)
    assert again.get(13).attr() == ns.get(13).attr() and again.get(13).attr()[9] == 0x10305


async def test_replay_rebuilds_the_same_state(tmp_path):
    records = _records(Namespace(1 << 20))
    ns = Namespace(1 << 20)
    journal = Journal(tmp_path)
    assert journal.recover() == (None, [])
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for record in records[:7]:
            ns.apply(record)
            await journal.write(record)
        journal.rotate()
        await journal.checkpoint(ns.dump)
        for record in records[7:]:
            ns.apply(record)
            await journal.write(record)
        nursery.cancel_scope.cancel()
    journal.close()
    # the checkpoint covers everything before it; the tail is replayed on top of it
    state, tail = Journal(tmp_path).recover()
    assert state is not None and len(tail) == len(records) - 7
    rebuilt = Namespace.load(state)
    for record in tail:
        rebuilt.apply(record)
    assert _dump(rebuilt) == _dump(ns)


async def test_a_torn_older_segment_keeps_only_the_prefix_before_it(tmp_path):
    """After a power loss an older segment may miss its tail while a newer one has records:
    none of those was ever reported synced, so recovery stops at the tear, cuts the segment
    there and sets the newer segments aside; the next recovery sees a clean journal."""
    records = _records(Namespace(1 << 20))
    journal = Journal(tmp_path)
    journal.recover()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for record in records[:6]:
            journal.append(record)
        journal.rotate()
        for record in records[6:]:
            journal.append(record)
        await journal.sync_all()
        nursery.cancel_scope.cancel()
    journal.close()
    first, second = (tmp_path / f"journal-{n}.log" for n in (0, 1))
    whole = first.read_bytes()
    _, good, _ = read_segment(first)
    assert good == len(whole)
    first.write_bytes(whole[:-3])  # the last record of the older segment is torn

    recovered = Journal(tmp_path)
    state, replayed = recovered.recover()
    recovered.close()
    assert state is None and replayed == records[:5]
    assert first.read_bytes() == whole[: read_segment(first)[1]]
    assert not second.exists() and (tmp_path / "journal-1.log.dropped").exists()
    # what was replayed is now a clean prefix: recovering again finds the same, no error
    again = Journal(tmp_path)
    assert again.recover() == (None, records[:5])
    again.close()


async def test_a_crash_while_cutting_a_torn_segment_leaves_no_gap(tmp_path, monkeypatch):
    """Recovery sets the newer segments aside before it cuts the torn one: if it dies in
    between, the next recovery finds the tear again and still replays only the prefix (cut
    first, it would find a clean older segment and replay the newer one after a gap)."""
    records = _records(Namespace(1 << 20))
    journal = Journal(tmp_path)
    journal.recover()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for record in records[:6]:
            journal.append(record)
        journal.rotate()
        for record in records[6:]:
            journal.append(record)
        await journal.sync_all()
        nursery.cancel_scope.cancel()
    journal.close()
    first = tmp_path / "journal-0.log"
    first.write_bytes(first.read_bytes()[:-3])

    def crash(self, target):
        raise OSError(errno.EIO, "power lost")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", crash)
        with pytest.raises(OSError):
            Journal(tmp_path).recover()
    recovered = Journal(tmp_path)
    assert recovered.recover() == (None, records[:5])
    recovered.close()
