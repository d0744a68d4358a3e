"""The daemon's bookkeeping pieces on their own: lookup counts, complete listings and the
scans that build them, the write-back buffer, read-ahead, xattr rules, mount option and mountinfo handling. The cluster side is an
in-memory byte array here (these pieces only see an async send/fetch function); the real
cluster is exercised by the mount tests."""

from __future__ import annotations

import errno
import stat
import time

import pytest
import trio
import trio.lowlevel
from pyfuse3 import FUSEError

from fusecsi import mount_options
from fusecsi.cluster.client import Attr
from fusecsi.fuse import kernel, xattrs
from fusecsi.fuse.inodes import ROOT_INODE, InodeMap, LookupCounts
from fusecsi.fuse.listings import MAX_NAMES, MIN_USES, Listings
from fusecsi.fuse.main import normalize_fs_path
from fusecsi.fuse.readahead import ReadAhead
from fusecsi.fuse.writeback import WriteBuffer

MiB = 1 << 20


def test_lookup_counts_follow_lookups_and_forgets():
    counts = LookupCounts()
    counts.add(5)
    counts.add(5)
    counts.add(7, 3)
    counts.add(ROOT_INODE)  # never counted: the kernel holds the root for the mount's life
    assert counts.get(5) == 2 and counts.get(7) == 3 and ROOT_INODE not in counts
    assert counts.forget(5, 1) is False and counts.get(5) == 1
    assert counts.forget(5, 1) is True and 5 not in counts
    assert counts.forget(7, 5) is True  # a forget larger than the count clears it
    assert len(counts) == 0
    assert counts.forget(ROOT_INODE, 1) is False


def _file(ino: int, nlink: int = 1, mode: int = stat.S_IFREG | 0o644) -> Attr:
    return Attr(ino, mode, nlink, 0, 0, 0, 0, 0, 0)


def _names(*names: bytes) -> dict:
    return dict.fromkeys(names)


def test_listings_answer_only_while_trusted_and_follow_changes():
    listings = Listings(ttl=60)
    assert listings.absent(9, b"x") == 0  # nothing known
    listings.establish(9, _names(b"a"), time.monotonic())
    assert listings.absent(9, b"a") == 0 and 59 < listings.absent(9, b"x") <= 60
    assert listings.known(9, b"a") is None  # present, attributes unknown: ask the cluster
    listings.added(9, b"x")
    listings.removed(9, b"a")
    assert listings.absent(9, b"x") == 0 and listings.absent(9, b"a") > 0
    listings.forget(9)  # a change with an unknown outcome
    assert listings.absent(9, b"a") == 0 and 9 not in listings
    listings.establish(9, {}, time.monotonic() - 61)  # checked longer ago than the ttl
    assert listings.absent(9, b"a") == 0 and 9 not in listings
    listings.establish(9, _names(*(b"%d" % i for i in range(MAX_NAMES + 1))), time.monotonic())
    assert 9 not in listings  # too big to keep
    listings.establish(9, _names(*(b"%d" % i for i in range(MAX_NAMES))), time.monotonic())
    listings.added(9, b"one more")
    assert 9 not in listings
    off = Listings(ttl=0)  # entry-timeout=0: nothing is ever trusted
    off.establish(9, {}, time.monotonic())
    assert off.absent(9, b"a") == 0


def test_a_scan_of_a_directory_establishes_its_listing():
    """Pages in cookie order make a listing as of the scan's start; changes made through
    the mount meanwhile are replayed onto it; an unknown outcome or a gap spoils it. Entries
    are (name, attr, cookie) as the cluster's readdir gives them (their cookies unused)."""
    listings = Listings(ttl=60, attr_ttl=30)
    whole = listings.begin(1)
    dir_attr = _file(12, 2, stat.S_IFDIR | 0o755)
    page0 = [
        (b"a", _file(10), 0),
        (b"b", _file(11), 0),
        (b"d", dir_attr, 0),
        (b"h", _file(13, 2), 0),
    ]
    assert listings.page(whole, 0, page0, 4)
    listings.added(1, b"new")  # made here while the scan runs: may be on a page or not
    listings.removed(1, b"a")  # already read: must not stay in the set
    listings.touched(11)  # its attributes changed after its page was read
    assert not listings.page(whole, 4, [(b"c", _file(14), 0), (b"new", _file(15), 0)], None)
    assert listings.absent(1, b"a") > 0 and listings.absent(1, b"zzz") > 0
    assert all(listings.absent(1, n) == 0 for n in (b"b", b"c", b"d", b"h", b"new"))
    attr, entry_left, attr_left = listings.known(1, b"c")
    assert attr == _file(14) and 59 < entry_left <= 60 and 29 < attr_left <= 30
    # kept only for files with one link that nothing here changed meanwhile
    assert all(listings.known(1, n) is None for n in (b"b", b"d", b"h", b"new"))
    listings.touched(14)
    assert listings.known(1, b"c") is None
    spoiled = listings.begin(2)
    listings.page(spoiled, 0, [(b"a", _file(20), 0)], 1)
    listings.forget(2)  # a change there whose outcome is unknown
    assert not listings.page(spoiled, 1, [(b"b", _file(21), 0)], None) and 2 not in listings
    gap = listings.begin(3)
    listings.page(gap, 0, [(b"a", _file(30), 0)], 1)
    assert not listings.page(gap, 7, [(b"b", _file(31), 0)], None) and 3 not in listings
    renamed = listings.begin(4)
    listings.page(renamed, 0, [(b"x", _file(40), 0), (b"y", _file(41), 0)], None)
    assert listings.known(4, b"y")[0] == _file(41)
    listings.added(4, b"y")  # x renamed over y: y's file is gone, x's has a new ctime
    listings.removed(4, b"x")
    assert listings.known(4, b"y") is None and listings.absent(4, b"x") > 0


def test_a_listing_in_use_is_due_for_a_new_read_before_it_expires():
    listings = Listings(ttl=1)
    listings.establish(4, _names(b"a"), time.monotonic())
    for i in range(MIN_USES):
        assert listings.absent(4, b"x%d" % i) > 0
    assert not listings.due(4)  # still fresh
    listings.establish(4, _names(b"a"), time.monotonic() - 0.7)  # less than half of its time left
    assert not listings.due(4)  # not used enough to be worth a read
    for i in range(MIN_USES):
        listings.absent(4, b"x%d" % i)
    assert listings.due(4) and not listings.due(4)  # once: a read is under way
    scan = listings.begin(4)
    listings.end(scan)  # abandoned: it may be tried again
    assert listings.due(4)


def test_inode_map_swaps_only_the_base():
    inodes = InodeMap(42)
    assert inodes.to_cluster(ROOT_INODE) == 42 and inodes.to_kernel(42) == ROOT_INODE
    assert inodes.to_cluster(43) == 43 and inodes.to_kernel(43) == 43
    same = InodeMap(1)
    assert same.to_cluster(1) == 1 and same.to_kernel(1) == 1


class Sink:
    """Stands in for the cluster's data path: records each send, can fail on demand."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.sends: list[tuple[int, int]] = []
        self.fail_with: int | None = None

    async def send(self, offset: int, data: bytes) -> None:
        await trio.sleep(0.001)
        if self.fail_with is not None:
            raise FUSEError(self.fail_with)
        self.sends.append((offset, len(data)))
        end = offset + len(data)
        if len(self.data) < end:
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data


async def test_write_buffer_batches_at_aligned_boundaries():
    sink = Sink()
    buf = WriteBuffer(sink.send, 4 * MiB, 0)
    payload = bytes(range(256)) * (4096 * 11)  # 11 MiB
    step = 300_000  # not a divisor of the block: pieces must still line up
    for off in range(0, len(payload), step):
        await buf.write(off, payload[off : off + step])
    assert buf.size == len(payload) and buf.dirty
    assert sink.sends == [(0, 4 * MiB), (4 * MiB, 4 * MiB)]  # the tail is still buffered
    await buf.drain()
    assert bytes(sink.data) == payload
    assert sink.sends[2] == (8 * MiB, 3 * MiB)


async def test_write_buffer_non_contiguous_writes_and_holes():
    sink = Sink()
    buf = WriteBuffer(sink.send, MiB, 0)
    await buf.write(10, b"abc")
    await buf.write(5000, b"xyz")  # a jump: the first piece goes out on its own
    assert sink.sends == [(10, 3)]
    await buf.write(0, b"0")
    await buf.drain()
    assert sink.data[10:13] == b"abc" and sink.data[5000:5003] == b"xyz"
    assert sink.data[0:1] == b"0" and buf.size == 5003


async def test_write_buffer_refused_piece_fails_the_write_that_sends_it():
    sink = Sink()
    sink.fail_with = errno.EDQUOT
    buf = WriteBuffer(sink.send, MiB, 0)
    await buf.write(0, bytes(MiB // 2))  # buffered: nothing sent yet
    with pytest.raises(FUSEError) as caught:
        await buf.write(MiB // 2, bytes(MiB // 2))  # completes a block: sent, refused
    assert caught.value.errno == errno.EDQUOT
    await buf.write(MiB, b"x")
    with pytest.raises(FUSEError) as caught:  # and the remainder at flush/close
        await buf.drain()
    assert caught.value.errno == errno.EDQUOT


class Source:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.fetches: list[tuple[int, int]] = []

    async def fetch(self, offset: int, size: int) -> bytes:
        self.fetches.append((offset, size))
        await trio.lowlevel.checkpoint()
        return self.data[offset : offset + size]


async def test_read_ahead_random_reads_fetch_exactly():
    src = Source(bytes(range(256)) * 40960)
    async with trio.open_nursery() as nursery:
        reader = ReadAhead(src.fetch, MiB, 2, nursery.start_soon)
        for off in (700_000, 12_288, 5_000_000, 4096):
            got = await reader.read(off, 4096, 0, len(src.data))
            assert got == src.data[off : off + 4096]
    assert src.fetches == [(700_000, 4096), (12_288, 4096), (5_000_000, 4096), (4096, 4096)]


async def test_read_ahead_sequential_reads_use_windows_and_stop_at_eof():
    size = 5 * MiB + 123
    src = Source(bytes(range(251)) * (size // 251 + 1))
    src.data = src.data[:size]
    async with trio.open_nursery() as nursery:
        reader = ReadAhead(src.fetch, MiB, 2, nursery.start_soon)
        out = bytearray()
        off = 0
        while True:
            chunk = await reader.read(off, 256 * 1024, 0, size)
            if not chunk:
                break
            out += chunk
            off += len(chunk)
    assert bytes(out) == src.data
    windowed = [f for f in src.fetches if f[1] == MiB]
    assert len(windowed) >= 5 and all(o % MiB == 0 for o, _ in windowed)
    assert all(o < size for o, _ in windowed)  # nothing fetched past the end


async def test_read_ahead_drops_windows_when_the_file_changes():
    src = Source(b"a" * (3 * MiB))
    async with trio.open_nursery() as nursery:
        reader = ReadAhead(src.fetch, MiB, 1, nursery.start_soon)
        await reader.read(0, 4096, 0, len(src.data))
        await reader.read(4096, 4096, 0, len(src.data))
        src.data = b"b" * (3 * MiB)
        assert await reader.read(8192, 4096, 1, len(src.data)) == b"b" * 4096


def test_xattr_rules():
    for name in (xattrs.QUOTA, b"trusted.fusecsi.volume"):
        with pytest.raises(FUSEError) as caught:
            xattrs.check_writable(name)
        assert caught.value.errno == errno.EPERM
    with pytest.raises(FUSEError):
        xattrs.check_readable(b"trusted.fusecsi.volume")
    xattrs.check_readable(xattrs.QUOTA)
    xattrs.check_writable(b"user.mine")
    names = [b"user.a", b"trusted.fusecsi.volume", b"trusted.other"]
    assert xattrs.visible(names) == [b"user.a", b"trusted.other"]


def test_fuse_options_escape_commas_and_follow_mount_options():
    opts = mount_options.parse_arg("read-only=true,allow-other=false")
    got = kernel.fuse_options("h1:8995,h2:8995", "/base", opts)
    assert "fsname=fusecsi:h1:8995\\,h2:8995:/base" in got
    assert {"subtype=fusecsi", "ro", "default_permissions"} <= got
    assert "allow_other" not in got


def test_mountinfo_lookup(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw - proc proc rw\n"
        "40 22 0:47 / /mnt/with\\040space rw - fuse.fusecsi fusecsi:h:8995:/b rw\n"
    )
    assert kernel.mount_device("/mnt/with space", str(info)) == "0:47"
    assert kernel.mount_device("/nowhere", str(info)) is None


@pytest.mark.parametrize(
    "text,want",
    [("/", "/"), ("/a/b/", "/a/b")],
)
def test_fs_path_normalised(text, want):
    assert normalize_fs_path(text) == want


# the daemon applies the rule of fusecsi/csi/volumes.py: empty segments are refused too,
# as mountd and the node plugin refuse them before a daemon is started
@pytest.mark.parametrize("text", ["a/b", "/a/../b", "/a/./b", "", "//a//b"])
def test_fs_path_rejected(text):
    with pytest.raises(ValueError):
        normalize_fs_path(text)


async def test_read_around_covers_a_read_that_crosses_its_boundary():
    """A short answer reads as EOF (and as zeros under the writeback cache): the fetch
    must reach the end of the request even past the aligned read-around block."""
    src = Source(bytes(range(256)) * 4096)  # 1 MiB
    stored: list[tuple[int, int]] = []
    async with trio.open_nursery() as nursery:
        reader = ReadAhead(
            src.fetch, MiB, 1, nursery.start_soon, 128 * 1024,
            lambda start, data, lo, hi: stored.append((start, len(data))),
        )  # fmt: skip
        off = 128 * 1024 - 4096
        got = await reader.read(off, 16384, 0, len(src.data), around=True)
        assert got == src.data[off : off + 16384]
        got = await reader.read(300_000, 4096, 0, len(src.data), around=False)
        assert got == src.data[300_000:304_096]
    assert src.fetches == [(0, 128 * 1024 + 12288), (300_000, 4096)]
    assert stored == [(0, 128 * 1024 + 12288)]


async def test_read_around_pages_queue_only_up_to_the_backlog():
    """Pieces a read-around would push into the kernel wait for one thread; when they pile
    up past STORE_BACKLOG bytes, new ones are dropped rather than held in memory, and the
    room comes back as queued pieces finish (here: skipped because the file changed)."""
    from fusecsi.fuse.handles import OpenInode
    from fusecsi.fuse.operations import READ_AROUND, STORE_BACKLOG, Operations

    ops = Operations(None, ROOT_INODE, mount_options.parse_arg(""))
    spawned = []
    ops.spawn = lambda fn, *args: spawned.append((fn, args))
    node = OpenInode(ino=5, size=64 * MiB)
    piece = bytes(READ_AROUND)
    fits = STORE_BACKLOG // (READ_AROUND - 4096)
    for i in range(fits + 3):
        ops._store_around(node, i * READ_AROUND, piece, i * READ_AROUND, i * READ_AROUND + 4096)
    assert len(spawned) == fits
    assert 0 < ops._store_backlog <= STORE_BACKLOG
    node.version += 1  # a write: the queued pages are stale and are not pushed
    for fn, args in spawned:
        await fn(*args)
    assert ops._store_backlog == 0
    ops._store_around(node, 0, piece, 0, 4096)
    assert len(spawned) == fits + 1


def test_the_one_master_calls_are_declared_on_the_client():
    # fusecsi/fuse/calls.py lets these run their first attempt under the client's own
    # deadline: the mark is where each call is defined, not a list of names to keep in step
    from fusecsi.cluster.client import ClusterClient

    marked = {
        n
        for n in dir(ClusterClient)
        if getattr(getattr(ClusterClient, n), "one_master_call", False)
    }
    assert marked == set(
        "lookup getattr mkdir create unlink rmdir rename readdir symlink readlink link".split()
    )
    assert not getattr(ClusterClient.read, "one_master_call", False)  # workers, not one call
