"""EmbeddedNamespace (fusecsi/engines/embedded/namespace.py) against a real cluster: the
Namespace contract of fusecsi/engines/base.py as the volume rules rely on it."""

from __future__ import annotations

import errno
import os

import pytest
import trio
from support.controller import GiB, cluster, open_client, unique

from fusecsi.cluster.local import free_port
from fusecsi.csi.controller.volume_rules import TAG_VOLUME, VolumeRules
from fusecsi.csi.volumes import VolumeRef, name_digest
from fusecsi.engines import open_namespace
from fusecsi.engines.base import Cluster, Node, Unreachable

__all__ = ["cluster"]  # fixture


def namespace_of(cluster, **secrets):
    return open_namespace(Cluster("embedded", cluster.master_addrs, secrets), timeout=3)


async def test_the_contract_on_the_real_cluster(cluster):
    base = unique("/ns")
    async with namespace_of(cluster) as ns, open_client(cluster.master_addrs) as client:
        assert ns.quota_enforced
        assert await ns.lookup(base) is None
        await ns.mkdirs(base + "/a")
        await ns.mkdirs(base + "/a")  # existing is fine
        assert await ns.lookup(base + "/a") == Node(base + "/a", True)
        tags = {TAG_VOLUME: b"v", b"trusted.fusecsi.owner": b"o"}
        await ns.mkdir_tagged(base + "/a/vol", 0o777, tags, 2 * GiB)
        with pytest.raises(OSError) as err:
            await ns.mkdir_tagged(base + "/a/vol", 0o777, tags, GiB)
        assert err.value.errno == errno.EEXIST
        with pytest.raises(OSError) as err:
            await ns.mkdir_tagged(base + "/missing/vol", 0o777, tags, GiB)
        assert err.value.errno == errno.ENOENT
        assert await ns.get_tag(base + "/a/vol", TAG_VOLUME) == b"v"
        assert await ns.get_tag(base + "/a", TAG_VOLUME) is None
        with pytest.raises(OSError) as err:
            await ns.get_tag(base + "/gone", TAG_VOLUME)
        assert err.value.errno == errno.ENOENT
        # a quota is the directory's own: one above does not count
        assert await ns.get_quota(base + "/a/vol") == 2 * GiB
        await ns.mkdirs(base + "/a/vol/inside")
        assert await ns.get_quota(base + "/a/vol/inside") is None
        await ns.set_quota(base + "/a/vol", 3 * GiB)
        assert await ns.get_quota(base + "/a/vol") == 3 * GiB
        await ns.set_tag(base + "/a/vol", b"trusted.fusecsi.owner", b"p")
        await ns.remove_tag(base + "/a/vol", b"trusted.fusecsi.owner")
        with pytest.raises(OSError) as err:
            await ns.remove_tag(base + "/a/vol", b"trusted.fusecsi.owner")
        assert err.value.errno == errno.ENODATA
        # capacity: the cluster's free bytes, capped by the nearest quota at or above
        free = (await client.statfs())["free_bytes"]
        assert abs(await ns.capacity(base) - free) < 64 << 20
        assert await ns.capacity(base + "/a/vol/inside") == min(3 * GiB, free)
        # rename never replaces
        await ns.mkdirs(base + "/b")
        with pytest.raises(OSError) as err:
            await ns.rename(base + "/a", base + "/b")
        assert err.value.errno == errno.EEXIST
        await ns.rename(base + "/a/vol", base + "/b/vol")
        assert [n.path for n in await ns.listdir(base + "/b")] == [base + "/b/vol"]
        with pytest.raises(OSError) as err:
            await ns.rmdir(base + "/b")
        assert err.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
        await ns.remove_tree(base + "/b")
        await ns.remove_tree(base + "/b")  # nothing there is fine
        await ns.rmdir(base + "/a")
        await ns.sync()
        assert [n.path for n in await ns.listdir(base)] == []


async def test_names_that_are_not_utf8_inside_a_volume(cluster):
    """A pod may name a directory with any bytes: the nested-volume scan still reads it, and
    the volume is released."""
    rules = VolumeRules(call_timeout=5)
    base, name = unique("/raw"), unique("pv")
    ref = VolumeRef(cluster.master_addrs, base, name, "delete", name_digest(name))
    async with namespace_of(cluster) as ns, open_client(cluster.master_addrs) as client:
        await rules.ensure(ns, ref, name, GiB)
        volume = await client.resolve(ref.path)
        odd = await client.mkdir(volume.ino, b"\xff\xfe-not-utf8", 0o755, 0, 0)
        await client.mkdir(odd.ino, b"deeper", 0o755, 0, 0)
        assert await rules.release(ns, ref) == "deleted"
        assert await ns.lookup(ref.path) is None


async def test_no_master_is_unreachable(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    async with open_namespace(Cluster("embedded", address), timeout=1) as ns:
        with trio.fail_after(10), pytest.raises(Unreachable) as err:
            await ns.lookup("/x")
    assert err.value.errno in (errno.ECONNREFUSED, errno.ETIMEDOUT)
    assert "\n" not in str(err.value)


async def test_the_token_is_the_secret(tmp_path):
    from fusecsi.cluster.local import LocalCluster

    token = os.urandom(8).hex()
    with LocalCluster(tmp_path / "c", workers=1, token=token) as secured:
        async with namespace_of(secured, token=token) as ns:
            await ns.mkdirs("/ok")
        async with namespace_of(secured, token="wrong") as ns:
            with trio.fail_after(15), pytest.raises(OSError) as err:
                await ns.lookup("/ok")
            assert token not in str(err.value)
