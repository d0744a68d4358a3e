"""Every argument check of Supervisor.publish, each with its exact errno and message.

mountd's Supervisor runs in the test's trio loop (arguments of any type reach it, as a
malformed RPC would deliver them); no stand-in: a target that is already a mount point is a
real tmpfs mount, and the checks all come before a daemon would start.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
import trio
from support.mountd import (  # noqa: F401 - fixtures
    TOKEN,
    cluster_fixture,
    make_dirs,
    supervisor_in_process,
)

from fusecsi.mountd import mounts

GOOD = {
    "volume_id": "vol-checks",
    "fs_path": "/checks",
    "subpath": "v",
    "options": "",
    "readonly": False,
    "secrets": {"token": TOKEN},
    "pod_namespace": None,
    "pod_name": None,
}


def occupied_target(sup) -> str:
    """A target inside the kubelet dir that is already a (foreign) tmpfs mount point."""
    target = os.path.join(
        sup.kubelet_dir, "pods", "p", "volumes", "kubernetes.io~csi", "v", "mount"
    )
    os.makedirs(target)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
    return target


async def publish(sup, cluster, target, **overrides):
    args = {**GOOD, **overrides}
    return await sup.publish(
        volume_id=args["volume_id"],
        cluster=args.get("master_addrs", cluster.master_addrs),
        fs_path=args["fs_path"],
        subpath=args["subpath"],
        options=args["options"],
        target=target,
        readonly=args["readonly"],
        secrets=args["secrets"],
        pod_namespace=args["pod_namespace"],
        pod_name=args["pod_name"],
        engine=args.get("engine", "embedded"),
    )


async def refused(sup, cluster, target, code: int, message: str, **overrides) -> None:
    with pytest.raises(OSError) as info:
        await publish(sup, cluster, target, **overrides)
    assert info.value.errno == code, (overrides, info.value)
    assert message in info.value.strerror, (overrides, info.value)


async def test_each_argument_is_checked_before_the_target_and_valid_ones_pass(tmp_path, cluster):
    async with supervisor_in_process(tmp_path / "node") as sup:
        target = occupied_target(sup)
        try:
            # valid arguments all get past the checks, up to the occupied target
            taken = "is already a mount point"
            await refused(sup, cluster, target, errno.EEXIST, taken)
            await refused(sup, cluster, target, errno.EEXIST, taken, secrets=None)
            await refused(sup, cluster, target, errno.EEXIST, taken, secrets={})
            await refused(sup, cluster, target, errno.EEXIST, taken, readonly=True)
            for name in ("a", "n" * 253):
                await refused(sup, cluster, target, errno.EEXIST, taken, pod_namespace=name)
                await refused(sup, cluster, target, errno.EEXIST, taken, pod_name=name)

            for volume_id in ("", 7, None):
                await refused(
                    sup, cluster, target, errno.EINVAL, "volume_id is empty", volume_id=volume_id
                )
            for readonly in ("false", 0, None):
                await refused(
                    sup,
                    cluster,
                    target,
                    errno.EINVAL,
                    "readonly must be a boolean",
                    readonly=readonly,
                )
            for secrets in ("token", {"token": 7}, {"token": b"bytes"}, {7: "x"}):
                await refused(
                    sup,
                    cluster,
                    target,
                    errno.EINVAL,
                    "secrets must be a map of strings",
                    secrets=secrets,
                )
            for engine in ("no-such-engine", "", None):
                await refused(sup, cluster, target, errno.EINVAL, "engine", engine=engine)
            short = "pod namespace and name must be short strings or None"
            for bad in ("", "n" * 254, 7):
                await refused(sup, cluster, target, errno.EINVAL, short, pod_namespace=bad)
                await refused(sup, cluster, target, errno.EINVAL, short, pod_name=bad)
            await refused(sup, cluster, target, errno.EINVAL, "subpath", subpath="../v")
            await refused(sup, cluster, target, errno.EINVAL, "", master_addrs="not an address")
            await refused(sup, cluster, target, errno.EINVAL, "", options="no-such-option=1")
            assert sup.table.entries == {}  # no check started a daemon
            assert mounts.stack_at(target)[-1].fstype == "tmpfs"  # nor touched the target
        finally:
            mounts.umount(target, lazy=True)


async def test_publishing_the_same_target_again_says_no_daemon_started(tmp_path, cluster):
    await make_dirs(cluster, "/checks/v")
    async with supervisor_in_process(tmp_path / "node") as sup:
        parent = os.path.join(sup.kubelet_dir, "pods", "p", "volumes", "kubernetes.io~csi", "v")
        os.makedirs(parent)
        target = os.path.join(parent, "mount")
        first = await publish(sup, cluster, target)
        again = await publish(sup, cluster, target)
        assert first["daemon_started"] is True and again["daemon_started"] is False
        assert again["key"] == first["key"]
        await refused(
            sup,
            cluster,
            target,
            errno.EEXIST,
            f"target {target} already holds volume vol-checks",
            volume_id="vol-other",
        )
        await refused(sup, cluster, target, errno.EEXIST, "already holds", readonly=True)
        assert len(mounts.stack_at(target)) == 1
        await sup.unpublish("vol-checks", target)
        assert mounts.stack_at(target) == []


async def test_a_bound_target_is_answered_while_its_key_is_busy(tmp_path, cluster):
    """kubelet repeats NodePublish; for a target that is bound already the answer must not
    wait for the key's lock (held for the whole of a recovery or another publish)."""
    await make_dirs(cluster, "/checks/v")
    async with supervisor_in_process(tmp_path / "node") as sup:
        parent = os.path.join(sup.kubelet_dir, "pods", "p", "volumes", "kubernetes.io~csi", "v")
        os.makedirs(parent)
        target = os.path.join(parent, "mount")
        first = await publish(sup, cluster, target)
        async with sup.key_locks.hold(first["key"]):
            with trio.fail_after(30):  # a hang, not a duration, fails this
                again = await publish(sup, cluster, target)
        assert again == {**first, "daemon_started": False}
        await sup.unpublish("vol-checks", target)
