"""Directory quotas: limits, subtree usage, EDQUOT, renames across quota boundaries."""

from __future__ import annotations

import errno

import pytest

from fusecsi.cluster.client import ClusterError, Quota

BLOCK = 1 << 20  # the block size of the `cluster` fixture (conftest.py)


async def _file(client, parent, name, size):
    f = await client.create(parent, name, 0o644, 0, 0)
    if size:
        await client.write(f.ino, 0, b"z" * size)
        await client.commit(f.ino, size)
    return f


def _edquot():
    return pytest.raises(ClusterError, match="quota")


async def test_no_quota_is_enodata(client, top):
    with pytest.raises(ClusterError) as info:
        await client.get_quota(top.ino)
    assert info.value.errno == errno.ENODATA


async def test_inode_limit(client, top):
    q = await client.set_quota(top.ino, None, 3)
    assert q == Quota(top.ino, None, 3, 0, 0)
    d = await client.mkdir(top.ino, b"d", 0o755, 0, 0)
    await client.create(d.ino, b"a", 0o644, 0, 0)
    await client.symlink(top.ino, b"s", b"t", 0, 0)
    with _edquot() as info:
        await client.create(d.ino, b"b", 0o644, 0, 0)
    assert info.value.errno == errno.EDQUOT
    with _edquot():
        await client.mkdir(top.ino, b"e", 0o755, 0, 0)
    with _edquot():
        await client.create_batch(top.ino, [b"x", b"y"])
    assert (await client.get_quota(top.ino)).used_inodes == 3
    await client.unlink(top.ino, b"s")
    assert (await client.get_quota(top.ino)).used_inodes == 2
    await client.create(d.ino, b"b", 0o644, 0, 0)
    # a quota applies to everything below it: ask from a subdirectory or a file
    assert (await client.get_quota(d.ino)).ino == top.ino
    b = await client.lookup(d.ino, b"b")
    assert (await client.get_quota(b.ino)).used_inodes == 3


async def test_byte_limit_on_allocation_and_commit(client, top):
    await client.set_quota(top.ino, 2 * BLOCK, None)
    f = await _file(client, top.ino, b"f", BLOCK + 100)
    q = await client.get_quota(top.ino)
    assert (q.used_bytes, q.used_inodes) == (BLOCK + 100, 1)
    # growing past the limit fails at block allocation...
    with _edquot() as info:
        await client.write(f.ino, 2 * BLOCK + 5, b"x" * 10)
    assert info.value.errno == errno.EDQUOT
    # ...and at commit, when the block was already there
    await client.write(f.ino, BLOCK + 100, b"y" * 1000)
    g = await client.create(top.ino, b"g", 0o644, 0, 0)
    await client.write(g.ino, 0, b"g" * (BLOCK - 500))
    await client.commit(g.ino, BLOCK - 500)
    with _edquot():
        await client.commit(f.ino, BLOCK + 1100)
    with _edquot():
        await client.setattr(g.ino, size=BLOCK)
    # exactly at the limit is fine
    await client.setattr(g.ino, size=BLOCK - 100)
    q = await client.get_quota(top.ino)
    assert q.used_bytes == 2 * BLOCK == q.max_bytes
    # deleting gives the space back
    await client.unlink(top.ino, b"g")
    assert (await client.get_quota(top.ino)).used_bytes == BLOCK + 100
    await client.setattr(f.ino, size=10)
    assert (await client.get_quota(top.ino)).used_bytes == 10


async def test_nested_quotas_all_apply(client, top):
    inner = await client.mkdir(top.ino, b"inner", 0o755, 0, 0)
    await client.set_quota(top.ino, None, 5)
    await client.set_quota(inner.ino, None, 10)
    for i in range(4):
        await client.create(inner.ino, b"f%d" % i, 0o644, 0, 0)
    # the outer limit (5 entries, one of them `inner`) stops the fifth file
    with _edquot():
        await client.create(inner.ino, b"f4", 0o644, 0, 0)
    assert (await client.get_quota(inner.ino)) == Quota(inner.ino, None, 10, 0, 4)
    assert (await client.get_quota(top.ino)).used_inodes == 5


async def test_rename_across_quota_boundaries(client, top):
    a = await client.mkdir(top.ino, b"a", 0o755, 0, 0)
    b = await client.mkdir(top.ino, b"b", 0o755, 0, 0)
    await client.set_quota(a.ino, 10 * BLOCK, 100)
    await client.set_quota(b.ino, 3000, 100)
    sub = await client.mkdir(a.ino, b"sub", 0o755, 0, 0)
    await _file(client, sub.ino, b"x", 1000)
    await _file(client, sub.ino, b"y", 1500)
    assert (await client.get_quota(a.ino)).used_bytes == 2500
    assert (await client.get_quota(a.ino)).used_inodes == 3
    await client.rename(a.ino, b"sub", b.ino, b"sub")
    qa, qb = await client.get_quota(a.ino), await client.get_quota(b.ino)
    assert (qa.used_bytes, qa.used_inodes) == (0, 0)
    assert (qb.used_bytes, qb.used_inodes) == (2500, 3)
    # moving more in than the target allows fails and changes nothing
    await _file(client, a.ino, b"big", 1000)
    with _edquot():
        await client.rename(a.ino, b"big", b.ino, b"big")
    assert (await client.lookup(a.ino, b"big")).size == 1000
    assert (await client.get_quota(b.ino)).used_bytes == 2500
    # replacing a file in the target counts only the difference
    await client.rename(a.ino, b"big", sub.ino, b"y")
    assert (await client.get_quota(b.ino)).used_bytes == 2000
    assert (await client.get_quota(a.ino)).used_bytes == 0
    # hard links count once per name
    y = await client.lookup(sub.ino, b"y")
    await client.link(y.ino, a.ino, b"y-link")
    assert (await client.get_quota(a.ino)).used_bytes == 1000
    # removing the tree gives everything back
    await client.remove_tree(f"/{await _path(client, top.ino)}/b/sub")
    assert (await client.get_quota(b.ino)).used_bytes == 0
    assert (await client.get_quota(b.ino)).used_inodes == 0
    # changing and clearing a quota
    q = await client.set_quota(b.ino, 1, None)
    assert (q.max_bytes, q.max_inodes) == (1, None)
    await client.set_quota(b.ino, None, None)
    with pytest.raises(ClusterError) as info:
        await client.get_quota(b.ino)
    assert info.value.errno == errno.ENODATA


async def _path(client, ino):
    cookie = 0
    while page := await client.readdir(1, cookie, 1000):
        for name, attr, _ in page:
            if attr.ino == ino:
                return name.decode()
        cookie = page[-1][2]
    raise AssertionError("not found")


async def test_statfs_of_a_path_under_a_quota_shows_the_quota(client, top):
    cluster = await client.statfs()
    fs = await client.statfs(top.ino)  # no quota: the cluster's totals
    assert (fs["total_bytes"], fs["total_inodes"]) == (cluster["total_bytes"], 1 << 32)
    vol = await client.mkdir(top.ino, b"vol", 0o755, 0, 0)
    await client.set_quota(vol.ino, 5 * BLOCK, None)
    f = await _file(client, vol.ino, b"f", BLOCK // 2)
    for ino in (vol.ino, f.ino):  # a directory, or a file whose parent has the quota
        fs = await client.statfs(ino)
        assert (fs["total_bytes"], fs["free_bytes"]) == (5 * BLOCK, 5 * BLOCK - BLOCK // 2)
        assert fs["total_inodes"] == cluster["total_inodes"]  # no inode limit: the cluster's
    await client.set_quota(vol.ino, 1 << 60, 10)  # free never more than the cluster has
    fs = await client.statfs(vol.ino)
    assert fs["total_bytes"] == 1 << 60 and fs["free_bytes"] <= cluster["total_bytes"]
    assert (fs["total_inodes"], fs["free_inodes"]) == (10, 9)
