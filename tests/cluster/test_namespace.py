"""Namespace semantics against a real master (and workers) on loopback."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from fusecsi.cluster.client import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    Attr,
    ClusterClient,
    ClusterError,
    ClusterUnavailable,
)
from fusecsi.cluster.local import free_port


def raises(code):
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(ClusterError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            result = self.ctx.__exit__(*exc)
            assert self.info.value.errno == code, (
                f"expected {errno.errorcode[code]}, got {self.info.value!r}"
            )
            return result

    return Check()


async def test_create_lookup_getattr_and_errors(client, top):
    d = await client.mkdir(top.ino, b"dir", 0o750, 1000, 1000)
    assert isinstance(d, Attr) and stat.S_ISDIR(d.mode) and stat.S_IMODE(d.mode) == 0o750
    assert (d.uid, d.gid, d.nlink) == (1000, 1000, 2)
    f = await client.create(d.ino, b"file", 0o640, 1, 2)
    assert stat.S_ISREG(f.mode) and f.size == 0 and f.nlink == 1
    assert await client.lookup(d.ino, b"file") == await client.getattr(f.ino)
    with raises(errno.EEXIST):
        await client.create(d.ino, b"file", 0o644, 0, 0)
    with raises(errno.EEXIST):
        await client.mkdir(d.ino, b"file", 0o755, 0, 0)
    with raises(errno.ENOENT):
        await client.lookup(d.ino, b"missing")
    with raises(errno.ENOTDIR):
        await client.create(f.ino, b"x", 0o644, 0, 0)
    with raises(errno.ENOENT):
        await client.getattr(1 << 62)
    with raises(errno.EISDIR):
        await client.unlink(top.ino, b"dir")
    with raises(errno.ENOTDIR):
        await client.rmdir(d.ino, b"file")
    with raises(errno.ENOTEMPTY):
        await client.rmdir(top.ino, b"dir")
    sub = await client.mkdir(d.ino, b"sub", 0o755, 0, 0)
    assert (await client.getattr(d.ino)).nlink == 3
    await client.rmdir(d.ino, b"sub")
    assert (await client.getattr(d.ino)).nlink == 2
    with raises(errno.ENOENT):
        await client.getattr(sub.ino)
    await client.unlink(d.ino, b"file")
    await client.rmdir(top.ino, b"dir")
    assert await client.readdir(top.ino) == []


@pytest.mark.parametrize(
    "name, code",
    [
        (b"a/b", errno.EINVAL),
        (b"a\0b", errno.EINVAL),
        (b".", errno.EINVAL),
        (b"..", errno.EINVAL),
        (b"", errno.EINVAL),
        (b"x" * 256, errno.ENAMETOOLONG),
    ],
)
async def test_bad_names_are_refused(client, top, name, code):
    for call in (
        client.create(top.ino, name, 0o644, 0, 0),
        client.mkdir(top.ino, name, 0o755, 0, 0),
        client.symlink(top.ino, name, b"target", 0, 0),
    ):
        with raises(code):
            await call
    assert await client.readdir(top.ino) == []


async def test_longest_name_and_wrong_argument_types(client, top):
    longest = b"n" * 255
    assert (await client.create(top.ino, longest, 0o644, 0, 0)).size == 0
    assert (await client.lookup(top.ino, longest)).nlink == 1
    with raises(errno.EINVAL):
        await client._call("create", top.ino, "text-not-bytes", 0o644, 0, 0)
    with raises(errno.EINVAL):
        await client._call("getattr", "1")
    with raises(errno.EINVAL):
        await client._call("getattr")
    with raises(errno.ENOSYS):
        await client._call("no_such_call")


async def test_inode_numbers_are_never_reused(client, top):
    seen = set()
    for _ in range(20):
        attr = await client.create(top.ino, b"f", 0o644, 0, 0)
        assert attr.ino not in seen and attr.ino > 1
        seen.add(attr.ino)
        await client.unlink(top.ino, b"f")


async def test_rename_edge_cases(client, top):
    p = top.ino
    a = await client.create(p, b"a", 0o644, 0, 0)
    b = await client.create(p, b"b", 0o644, 0, 0)
    d1 = await client.mkdir(p, b"d1", 0o755, 0, 0)
    d2 = await client.mkdir(p, b"d2", 0o755, 0, 0)
    await client.create(d2.ino, b"inside", 0o644, 0, 0)

    # replacing an existing file
    await client.rename(p, b"a", p, b"b")
    assert (await client.lookup(p, b"b")).ino == a.ino
    with raises(errno.ENOENT):
        await client.getattr(b.ino)
    # no-replace
    c = await client.create(p, b"c", 0o644, 0, 0)
    with raises(errno.EEXIST):
        await client.rename(p, b"c", p, b"b", RENAME_NOREPLACE)
    await client.rename(p, b"c", p, b"c2", RENAME_NOREPLACE)
    # file over directory, directory over file, directory over non-empty directory
    with raises(errno.EISDIR):
        await client.rename(p, b"b", p, b"d1")
    with raises(errno.ENOTDIR):
        await client.rename(p, b"d1", p, b"b")
    with raises(errno.ENOTEMPTY):
        await client.rename(p, b"d1", p, b"d2")
    # a directory may replace an empty directory
    d3 = await client.mkdir(p, b"d3", 0o755, 0, 0)
    await client.rename(p, b"d3", p, b"d1")
    assert (await client.lookup(p, b"d1")).ino == d3.ino
    with raises(errno.ENOENT):
        await client.getattr(d1.ino)
    # a directory into its own subtree
    with raises(errno.EINVAL):
        await client.rename(p, b"d2", d2.ino, b"x")
    inner = await client.mkdir(d2.ino, b"inner", 0o755, 0, 0)
    with raises(errno.EINVAL):
        await client.rename(p, b"d2", inner.ino, b"x")
    # exchange a file and a directory
    await client.rename(p, b"b", p, b"d2", RENAME_EXCHANGE)
    assert (await client.lookup(p, b"d2")).ino == a.ino
    assert (await client.lookup(p, b"b")).ino == d2.ino
    with raises(errno.ENOENT):
        await client.rename(p, b"b", p, b"nothing", RENAME_EXCHANGE)
    with raises(errno.EINVAL):
        await client.rename(p, b"b", p, b"d2", RENAME_NOREPLACE | RENAME_EXCHANGE)
    # moving a directory updates link counts of both parents
    before = (await client.getattr(p)).nlink
    await client.rename(p, b"b", d3.ino, b"moved")
    assert (await client.getattr(p)).nlink == before - 1
    assert (await client.getattr(d3.ino)).nlink == 3
    # renaming onto a hard link of the same file is a no-op that keeps both names
    await client.link(c.ino, p, b"c-link")
    await client.rename(p, b"c2", p, b"c-link")
    assert (await client.lookup(p, b"c2")).ino == c.ino
    assert (await client.getattr(c.ino)).nlink == 2
    # rename to itself
    await client.rename(p, b"c2", p, b"c2")
    assert (await client.lookup(p, b"c2")).ino == c.ino
    with raises(errno.ENOENT):
        await client.rename(p, b"missing", p, b"x")


async def test_readdir_paging_is_stable(client, top):
    names = [b"e%05d" % i for i in range(2500)]
    assert await client.create_batch(top.ino, names) == 2500
    seen, cookie, pages = [], 0, 0
    while True:
        page = await client.readdir(top.ino, cookie, 1000)
        if not page:
            break
        pages += 1
        assert len(page) <= 1000
        seen.extend(name for name, _, _ in page)
        cookie = page[-1][2]
        if pages == 1:
            # deleting entries already returned must not shift the next page
            for name in seen[:500]:
                await client.unlink(top.ino, name)
    assert pages == 3
    assert seen == names
    rest = await client.readdir(top.ino, 0, 10_000)
    assert [n for n, _, _ in rest] == names[500:]
    for name, attr, _ in rest[:5]:
        assert (await client.lookup(top.ino, name)).ino == attr.ino


@pytest.mark.slow
async def test_readdir_of_100k_entries_pages(client, top):
    total = 100_000
    for start in range(0, total, 20_000):
        names = [b"n%06d" % i for i in range(start, start + 20_000)]
        await client.create_batch(top.ino, names)
    count, cookie, biggest, previous = 0, 0, 0, None
    while True:
        page = await client.readdir(top.ino, cookie, 5000)
        if not page:
            break
        biggest = max(biggest, len(page))
        count += len(page)
        assert previous is None or page[0][0] > previous
        previous = page[-1][0]
        cookie = page[-1][2]
    assert count == total
    assert biggest == 5000  # never the whole directory in one reply
    big = await client.readdir(top.ino, 0, 1_000_000)
    assert len(big) == 10_000  # the server caps a page
    await client.remove_tree(f"/{(await _name_of(client, top.ino)).decode()}")


async def _name_of(client, ino):
    cookie = 0
    while page := await client.readdir(ROOT_INO, cookie, 1000):
        for name, attr, _ in page:
            if attr.ino == ino:
                return name
        cookie = page[-1][2]
    raise AssertionError("not found")


async def test_symlinks_and_hard_links(client, top):
    s = await client.symlink(top.ino, b"s", b"../some/where", 5, 6)
    assert stat.S_ISLNK(s.mode) and s.size == len(b"../some/where") and s.uid == 5
    assert await client.readlink(s.ino) == b"../some/where"
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    with raises(errno.EINVAL):
        await client.readlink(f.ino)
    linked = await client.link(f.ino, top.ino, b"g")
    assert linked.ino == f.ino and linked.nlink == 2
    await client.write(f.ino, 0, b"shared")
    await client.commit(f.ino, 6)
    await client.unlink(top.ino, b"f")
    g = await client.lookup(top.ino, b"g")
    assert g.nlink == 1 and g.size == 6
    assert await client.read(g.ino, 0, 100) == b"shared"
    d = await client.mkdir(top.ino, b"d", 0o755, 0, 0)
    with raises(errno.EPERM):
        await client.link(d.ino, top.ino, b"dlink")
    with raises(errno.EEXIST):
        await client.link(g.ino, top.ino, b"d")


async def test_special_files_are_inodes_without_data(client, top):
    fifo = await client.mknod(top.ino, b"fifo", stat.S_IFIFO | 0o640, 0, 5, 6)
    assert stat.S_ISFIFO(fifo.mode) and stat.S_IMODE(fifo.mode) == 0o640 and fifo.rdev == 0
    assert (fifo.uid, fifo.gid, fifo.nlink, fifo.size) == (5, 6, 1, 0)
    sock = await client.mknod(top.ino, b"sock", stat.S_IFSOCK | 0o755, 0, 0, 0)
    assert stat.S_ISSOCK(sock.mode)
    dev = os.makedev(8, 1)
    blk = await client.mknod(top.ino, b"blk", stat.S_IFBLK | 0o600, dev, 0, 0)
    chr_ = await client.mknod(top.ino, b"chr", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0)
    assert stat.S_ISBLK(blk.mode) and blk.rdev == dev and chr_.rdev == os.makedev(1, 3)
    assert await client.lookup(top.ino, b"blk") == blk
    assert [a.rdev for _, a, _ in await client.readdir(top.ino)] == [0, 0, dev, os.makedev(1, 3)]
    linked = await client.link(blk.ino, top.ino, b"blk2")
    assert linked.nlink == 2 and linked.rdev == dev
    await client.rename(top.ino, b"fifo", top.ino, b"fifo2")
    changed = await client.setattr(sock.ino, mode=0o600, uid=9, mtime_ns=10**9)
    assert stat.S_ISSOCK(changed.mode) and stat.S_IMODE(changed.mode) == 0o600
    with raises(errno.EINVAL):  # no data: no length
        await client.setattr(blk.ino, size=0)
    for mode in (stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777):
        with raises(errno.EINVAL):
            await client.mknod(top.ino, b"x", mode, 0, 0, 0)
    with raises(errno.EEXIST):
        await client.mknod(top.ino, b"sock", stat.S_IFIFO | 0o644, 0, 0, 0)
    for name in (b"fifo2", b"sock", b"blk", b"blk2", b"chr"):
        await client.unlink(top.ino, name)
    assert await client.readdir(top.ino) == []
    with raises(errno.ENOENT):
        await client.getattr(blk.ino)


async def test_xattrs(client, top):
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    assert await client.listxattr(f.ino) == []
    with raises(errno.ENODATA):
        await client.getxattr(f.ino, b"user.a")
    await client.setxattr(f.ino, b"user.a", b"1")
    await client.setxattr(f.ino, b"trusted.fusecsi.volume", b"pvc-1")
    assert await client.getxattr(f.ino, b"user.a") == b"1"
    assert sorted(await client.listxattr(f.ino)) == [b"trusted.fusecsi.volume", b"user.a"]
    with raises(errno.EEXIST):
        await client.setxattr(f.ino, b"user.a", b"2", 1)  # XATTR_CREATE
    with raises(errno.ENODATA):
        await client.setxattr(f.ino, b"user.b", b"2", 2)  # XATTR_REPLACE
    await client.setxattr(f.ino, b"user.a", b"2", 2)
    assert await client.getxattr(f.ino, b"user.a") == b"2"
    with raises(errno.E2BIG):
        await client.setxattr(f.ino, b"user.big", b"x" * (64 * 1024 + 1))
    await client.removexattr(f.ino, b"user.a")
    with raises(errno.ENODATA):
        await client.removexattr(f.ino, b"user.a")
    assert await client.listxattr(f.ino) == [b"trusted.fusecsi.volume"]


async def test_setattr(client, top):
    f = await client.create(top.ino, b"f", 0o644, 0, 0)
    a = await client.setattr(f.ino, mode=0o600, uid=7, gid=8, atime_ns=10**9, mtime_ns=2 * 10**9)
    assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == 0o600
    assert (a.uid, a.gid, a.atime_ns, a.mtime_ns) == (7, 8, 10**9, 2 * 10**9)
    assert a.ctime_ns > f.ctime_ns
    d = await client.setattr(top.ino, mode=0o700)
    assert stat.S_ISDIR(d.mode) and stat.S_IMODE(d.mode) == 0o700
    with raises(errno.EISDIR):
        await client.setattr(top.ino, size=0)
    with raises(errno.EINVAL):
        await client.setattr(f.ino, size=-1)


async def test_paths_statfs_and_remove_tree(client, top):
    name = (await _name_of(client, top.ino)).decode()
    leaf = await client.mkdirs(f"/{name}/a/b/c")
    assert (await client.resolve(f"/{name}/a/b/c")).ino == leaf.ino
    assert (await client.mkdirs(f"/{name}/a/b/c")).ino == leaf.ino
    f = await client.create(leaf.ino, b"file", 0o644, 0, 0)
    await client.write(f.ino, 0, b"x" * 1000)
    await client.commit(f.ino, 1000)
    with raises(errno.ENOTDIR):
        await client.mkdirs(f"/{name}/a/b/c/file/d")
    with raises(errno.ENOENT):
        await client.resolve(f"/{name}/nope")
    await client.remove_tree(f"/{name}/a")
    await client.remove_tree(f"/{name}/a")  # already gone: nothing to do
    with raises(errno.ENOENT):
        await client.getattr(f.ino)
    assert (await client.resolve("/")).ino == ROOT_INO
    fs = await client.statfs()
    assert set(fs) == {"total_bytes", "free_bytes", "total_inodes", "free_inodes", "block_size"}
    assert 0 < fs["free_bytes"] <= fs["total_bytes"] and fs["free_inodes"] < fs["total_inodes"]


async def test_client_fails_over_to_a_listed_master(cluster):
    dead = f"127.0.0.1:{free_port()}"
    async with ClusterClient([dead, cluster.master_addrs], timeout=10) as client:
        assert (await client.getattr(ROOT_INO)).ino == ROOT_INO
        await client.mkdir(ROOT_INO, b"failover", 0o755, 0, 0)  # not sent to `dead`: safe
        await client.rmdir(ROOT_INO, b"failover")
    async with ClusterClient(dead, timeout=1) as client:
        with pytest.raises(ClusterUnavailable) as info:
            await client.getattr(ROOT_INO)
        assert info.value.errno == errno.ECONNREFUSED
