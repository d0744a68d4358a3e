"""The controller's Namespace for Curvine, on stand-in masters."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from curvine_standin import DirTree, StandinMaster

from fusecsi import engines
from fusecsi.engines.base import Cluster, Node, Unreachable
from fusecsi.engines.curvine.namespace import QUOTA_XATTR, CurvineNamespace

OWNER = b"trusted.fusecsi.owner"


def namespace(address: str, timeout: float = 5) -> CurvineNamespace:
    opened = engines.open_namespace(Cluster("curvine", address), timeout=timeout)
    assert isinstance(opened, CurvineNamespace)
    return opened


async def test_volume_directory_lifecycle(master):
    async with namespace(master.address) as ns:
        assert ns.quota_enforced is False
        await ns.mkdirs("/base/vols")
        await ns.mkdirs("/base/vols")  # idempotent
        await ns.mkdir_tagged("/base/vols/pvc-1", 0o2775, {OWNER: b"pvc-1"}, 5 << 30)
        # one Mkdir carried the tag and the recorded size: never there untagged
        assert [code for code, _ in master.requests] == [2, 2, 2]
        node = master.tree.nodes["/base/vols/pvc-1"]
        assert node.x_attr == {"trusted.fusecsi.owner": b"pvc-1", QUOTA_XATTR: b"5368709120"}
        assert node.mode == 0o2775
        assert await ns.lookup("/base/vols/pvc-1") == Node("/base/vols/pvc-1", True)
        assert await ns.lookup("/base/vols/pvc-2") is None
        assert await ns.listdir("/base/vols") == [Node("/base/vols/pvc-1", True)]
        assert await ns.get_tag("/base/vols/pvc-1", OWNER) == b"pvc-1"
        assert await ns.get_tag("/base/vols/pvc-1", b"user.other") is None
        assert await ns.get_quota("/base/vols/pvc-1") == 5 << 30
        await ns.set_quota("/base/vols/pvc-1", 8 << 30)
        assert await ns.get_quota("/base/vols/pvc-1") == 8 << 30
        await ns.set_tag("/base/vols/pvc-1", b"user.fusecsi.archived", b"2026")
        await ns.remove_tag("/base/vols/pvc-1", b"user.fusecsi.archived")
        assert await ns.get_tag("/base/vols/pvc-1", b"user.fusecsi.archived") is None
        await ns.sync()
        with pytest.raises(FileExistsError):
            await ns.mkdir_tagged("/base/vols/pvc-1", 0o755, {OWNER: b"other"}, None)
        assert await ns.get_tag("/base/vols/pvc-1", OWNER) == b"pvc-1"  # untouched
        await ns.mkdirs("/base/archive")
        await ns.rename("/base/vols/pvc-1", "/base/archive/pvc-1")
        assert await ns.lookup("/base/archive/pvc-1") == Node("/base/archive/pvc-1", True)
        assert await ns.lookup("/base/vols/pvc-1") is None


async def test_rename_never_replaces(master):
    async with namespace(master.address) as ns:
        await ns.mkdirs("/a/src")
        await ns.mkdirs("/a/dst")  # empty: a plain rename would replace it
        with pytest.raises(FileExistsError):
            await ns.rename("/a/src", "/a/dst")
        assert await ns.lookup("/a/src") is not None


async def test_rmdir_and_remove_tree(master):
    master.tree.add("/v", True)
    master.tree.add("/v/file", False, length=10)
    master.tree.add("/v/sub", True)
    master.tree.add("/v/sub/deep", False)
    async with namespace(master.address) as ns:
        with pytest.raises(OSError) as raised:
            await ns.rmdir("/v")
        assert raised.value.errno == errno.ENOTEMPTY
        with pytest.raises(NotADirectoryError):
            await ns.rmdir("/v/file")  # Delete would remove a file: rmdir must not
        assert "/v/file" in master.tree.nodes
        with pytest.raises(NotADirectoryError):
            await ns.listdir("/v/file")
        await ns.remove_tree("/v")
        assert set(master.tree.nodes) == {"/"}
        with pytest.raises(FileNotFoundError):
            await ns.rmdir("/v")
        with pytest.raises(OSError) as raised:
            await ns.remove_tree("/")
        assert raised.value.errno == errno.EPERM


async def test_capacity_from_filesystem_info(master):
    async with namespace(master.address) as ns:
        assert await ns.capacity("/base") == 60 << 30
        master.tree.available = 0
        assert await ns.capacity("/base") == 0


@pytest.mark.parametrize("path", ["relative", "/a/../b", "/a//b", "/a/", "/a/*", "/a/[x]", "/a\\b"])
async def test_paths_the_master_would_misread_are_refused(master, path):
    async with namespace(master.address) as ns:
        with pytest.raises(OSError) as raised:
            await ns.lookup(path)
    assert raised.value.errno == errno.EINVAL
    assert master.requests == []


async def test_unreadable_recorded_size(master):
    master.tree.add("/v", True, x_attr={QUOTA_XATTR: b"lots"})
    async with namespace(master.address) as ns:
        with pytest.raises(OSError) as raised:
            await ns.get_quota("/v")
    assert raised.value.errno == errno.EBADMSG


async def test_through_a_standby_first(pair):
    standby, leader = pair
    async with namespace(f"{standby.address},{leader.address}") as ns:
        await ns.mkdirs("/x")
        assert await ns.lookup("/x") == Node("/x", True)


async def test_no_master_is_unreachable():
    async with namespace("127.0.0.1:1", timeout=0.3) as ns:
        with pytest.raises(Unreachable):
            await ns.lookup("/")


async def test_mkdir_tagged_under_a_missing_parent_is_enoent(master):
    # the master answers only a Common error; the controller creates parents on ENOENT
    async with namespace(master.address) as ns:
        with pytest.raises(FileNotFoundError):
            await ns.mkdir_tagged("/base/pvc-1", 0o755, {OWNER: b"pvc-1"}, None)
        master.tree.add("/file", False)
        with pytest.raises(OSError) as raised:
            await ns.mkdir_tagged("/file/pvc-1", 0o755, {OWNER: b"pvc-1"}, None)
        assert raised.value.errno == errno.EIO  # the parent is there: the master's answer


async def test_a_master_on_a_directory_keeps_the_namespace_there(nursery, tmp_path):
    # DirTree: what the walkthrough's stand-in curvine-fuse passes through
    standin = StandinMaster(DirTree(tmp_path))
    await nursery.start(standin.serve)
    async with namespace(standin.address) as ns:
        await ns.mkdirs("/base")
        await ns.mkdir_tagged("/base/pvc-1", 0o2775, {OWNER: b"pvc-1"}, 5 << 30)
        real = tmp_path / "base" / "pvc-1"
        assert os.getxattr(real, OWNER) == b"pvc-1"
        assert stat.S_IMODE(real.stat().st_mode) == 0o2775
        (real / "data").write_text("x")  # as a pod writes through the mount
        assert await ns.listdir("/base/pvc-1") == [Node("/base/pvc-1/data", False)]
        with pytest.raises(OSError) as raised:
            await ns.rmdir("/base/pvc-1")
        assert raised.value.errno == errno.ENOTEMPTY
        with pytest.raises(FileExistsError):
            await ns.mkdir_tagged("/base/pvc-1", 0o755, {OWNER: b"other"}, None)
        await ns.rename("/base/pvc-1", "/base/pvc-1.archived")
        assert (tmp_path / "base" / "pvc-1.archived" / "data").read_text() == "x"
        await ns.remove_tag("/base/pvc-1.archived", OWNER)
        assert await ns.get_tag("/base/pvc-1.archived", OWNER) is None
        await ns.remove_tree("/base/pvc-1.archived")
        assert os.listdir(tmp_path / "base") == []
        with pytest.raises(OSError):
            await ns.lookup("/base/../../etc")  # refused before it reaches the master
