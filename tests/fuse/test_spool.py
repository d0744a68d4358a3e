"""The write journal of a kept connection (fusecsi/fuse/spool.py), on real files: what a
replacement daemon finds after a death at any point, and what a commit drops."""

from __future__ import annotations

import os

from fusecsi.fuse.spool import GEN, HEADER, START, SpoolDir


def replayed(path, ino: int) -> list[tuple[int, bytes]]:
    """What a replacement daemon would replay for `ino`."""
    spools = SpoolDir(str(path))
    seqs = spools.segments().get(ino, [])
    return list(spools.spool(ino, seqs).old_records())


def test_a_replacement_finds_every_journaled_write_in_order(tmp_path):
    spool = SpoolDir(str(tmp_path)).spool(7)
    writes = [(0, b"a" * 10), (5, b"b" * 3), (4096, b"c")]
    for offset, data in writes:
        assert spool.append(offset, data)
    assert replayed(tmp_path, 7) == writes
    assert replayed(tmp_path, 8) == []


def test_a_torn_last_record_was_never_acknowledged_and_is_skipped(tmp_path):
    spool = SpoolDir(str(tmp_path)).spool(7)
    assert spool.append(0, b"kept")
    assert spool.append(4, b"torn write")
    path = tmp_path / "7.0"
    os.truncate(path, path.stat().st_size - 3)  # the daemon died inside the second pwritev
    assert replayed(tmp_path, 7) == [(0, b"kept")]
    os.truncate(path, START + HEADER.size + 4 + GEN + 5)  # ...or inside its header
    assert replayed(tmp_path, 7) == [(0, b"kept")]


def test_a_reused_segment_shows_none_of_its_older_records(tmp_path):
    spool = SpoolDir(str(tmp_path)).spool(7)
    for i in range(3):
        spool.append(i * 100, b"old %d" % i)
    spool.covered(spool.mark())  # committed: the segment is reused in place
    assert replayed(tmp_path, 7) == []
    assert spool.append(0, b"new")  # shorter than what follows it in the file
    assert os.listdir(tmp_path) == ["7.0"]
    assert replayed(tmp_path, 7) == [(0, b"new")]
    # a record torn by the daemon's death: its header and first bytes are there, the rest
    # of the place holds what the older records left
    path = tmp_path / "7.0"
    gen = path.read_bytes()[:GEN]
    with open(path, "r+b") as f:
        f.seek(START + HEADER.size + 3 + GEN)
        f.write(HEADER.pack(100, 10, gen) + b"torn")
    assert replayed(tmp_path, 7) == [(0, b"new")]


def test_a_commit_drops_what_it_covered_and_keeps_writes_made_meanwhile(tmp_path):
    spool = SpoolDir(str(tmp_path)).spool(7)
    spool.append(0, b"one")
    spool.append(3, b"two")
    mark = spool.mark()  # a commit starts...
    spool.append(6, b"three")  # ...a write lands while it is in flight...
    spool.covered(mark)  # ...and it succeeds
    assert replayed(tmp_path, 7) == [(6, b"three")]
    mark = spool.mark()
    spool.covered(mark)  # nothing written meanwhile: the journal is empty
    assert replayed(tmp_path, 7) == []
    assert spool.total == 0
    spool.append(0, b"four")  # and goes on in the same segment
    assert replayed(tmp_path, 7) == [(0, b"four")]


def test_a_failed_commit_drops_nothing(tmp_path):
    spool = SpoolDir(str(tmp_path)).spool(7)
    spool.append(0, b"one")
    spool.mark()  # the commit fails: `covered` is never called
    spool.append(3, b"two")
    assert replayed(tmp_path, 7) == [(0, b"one"), (3, b"two")]
    spool.covered(spool.mark())  # the next commit covers both
    assert replayed(tmp_path, 7) == []


def test_a_replacement_continues_after_the_old_segments_and_drops_them_at_its_commit(tmp_path):
    old = SpoolDir(str(tmp_path)).spool(7)
    old.append(0, b"old")
    spools = SpoolDir(str(tmp_path))
    assert spools.existed
    new = spools.spool(7, spools.segments()[7])
    assert list(new.old_records()) == [(0, b"old")]
    mark = new.mark()  # the replay's commit
    new.append(9, b"new")  # a resent write, after the replay
    new.covered(mark)
    assert replayed(tmp_path, 7) == [(9, b"new")]


def test_the_last_close_removes_the_journal(tmp_path):
    spool = SpoolDir(str(tmp_path)).spool(7)
    spool.append(0, b"one")
    spool.mark()
    spool.append(3, b"two")  # two segments
    spool.drop()
    assert os.listdir(tmp_path) == []
