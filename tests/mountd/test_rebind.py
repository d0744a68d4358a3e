"""Re-binding after a daemon died, with a fault at one exact point: mountd's Supervisor runs
in the test's trio loop and `mounts.bind_beneath` is wrapped (the only stand-in here).
Takeover is off: a re-bind is what happens without it (older kernels, or when it fails)."""

from __future__ import annotations

import errno
import os
import signal

import pytest
from support.mountd import (  # noqa: F401 - fixtures
    TOKEN,
    cluster_fixture,
    eventually,
    make_dirs,
    read_text,
    read_write,
    supervisor_in_process,
)

from fusecsi.mountd import mounts, publishing


async def publish(sup, cluster, fs_path: str, subpath: str, pod: str) -> str:
    target = os.path.join(sup.kubelet_dir, "pods", pod, "volumes", "kubernetes.io~csi", "v")
    os.makedirs(target)
    target = os.path.join(target, "mount")
    await sup.publish(
        volume_id=f"vol-{pod}",
        cluster=cluster.master_addrs,
        fs_path=fs_path,
        subpath=subpath,
        target=target,
        readonly=False,
        secrets={"token": TOKEN},
    )
    return target


async def kill_daemon_and_wait(sup, restarts: int) -> None:
    [entry] = sup.table.entries.values()
    os.kill(entry.pid, signal.SIGKILL)

    def replaced():
        rt = sup.key_states[entry.key.id]
        return (
            entry.restarts == restarts
            and rt.state == "running"
            and not sup.key_locks.busy(entry.key.id)
        )

    await eventually(replaced, deadline=30, what=f"replacement {restarts}")


async def test_subpath_gone_during_a_rebind_leaves_the_dead_mount_never_an_empty_dir(
    tmp_path, cluster, monkeypatch
):
    await make_dirs(cluster, "/gone/v")
    async with supervisor_in_process(tmp_path / "node", takeover=False) as sup:
        target = await publish(sup, cluster, "/gone", "v", "pod-1")
        assert read_write(target, "f", "still on the cluster")
        bind, moved = mounts.bind_beneath, []

        def bind_after_the_subpath_went(base, subpath, target, **flags):
            if not moved:  # the volume's directory is renamed away by someone, right now
                os.rename(os.path.join(base, subpath), os.path.join(base, "v-away"))
                moved.append(base)
            return bind(base, subpath, target, **flags)

        monkeypatch.setattr(mounts, "bind_beneath", bind_after_the_subpath_went)
        await kill_daemon_and_wait(sup, restarts=1)
        assert moved
        # the target still shows the dead mount: never the empty local directory below it
        with pytest.raises(OSError) as info:
            os.listdir(target)
        assert info.value.errno == errno.ENOTCONN
        stats = await sup.stats(target)
        assert not stats["healthy"] and "is missing" in stats["message"], stats
        # the directory comes back: a later retry serves it
        os.rename(os.path.join(moved[0], "v-away"), os.path.join(moved[0], "v"))
        await eventually(
            lambda: read_text(os.path.join(target, "f")) == "still on the cluster",
            deadline=30,
            what="re-bind once the subpath is back",
        )
        assert (await sup.stats(target))["healthy"]
        await sup.unpublish("vol-pod-1", target)
        assert mounts.stack_at(target) == []


async def test_stacked_layers_are_capped_and_the_target_reset_past_the_cap(
    tmp_path, cluster, monkeypatch
):
    monkeypatch.setattr(publishing, "MAX_LAYERS", 2)
    await make_dirs(cluster, "/cap/v")
    async with supervisor_in_process(tmp_path / "node", takeover=False) as sup:
        target = await publish(sup, cluster, "/cap", "v", "pod-1")
        assert read_write(target, "f", "layers")
        await kill_daemon_and_wait(sup, restarts=1)
        assert len(mounts.stack_at(target)) == 2  # the new mount on top of the dead one
        await kill_daemon_and_wait(sup, restarts=2)
        assert len(mounts.stack_at(target)) == 1  # at the cap: reset, not a third layer
        await eventually(
            lambda: read_text(os.path.join(target, "f")) == "layers",
            deadline=30,
            what="served after the reset",
        )
        await sup.unpublish("vol-pod-1", target)
        assert mounts.stack_at(target) == []
