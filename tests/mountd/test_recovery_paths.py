"""Publish and recovery when one step goes wrong at one exact point: mountd's Supervisor
runs in the test's trio loop; the stand-ins (monkeypatch) are a `_ensure_daemon` whose
mount is unmounted right after it returned, a `mounts.bind_beneath` that mounts a tmpfs
instead of the volume or fails with EPERM, a bind or read-only remount held in its thread
while the publish is cancelled, a `_start_daemon` that fails, and a lowered `MAX_LAYERS`.
Daemons, mounts and the cluster are real; pod events are read from the log (no Kubernetes
API)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import threading
from functools import partial

import pytest
import trio
from support.mountd import (  # noqa: F401 - fixtures
    TOKEN,
    cluster_fixture,
    eventually,
    exists,
    make_dirs,
    mountd_fixture,
    read_text,
    read_write,
    supervisor_in_process,
)

from fusecsi.mountd import mounts, publishing


def target_of(sup, pod: str) -> str:
    parent = os.path.join(sup.kubelet_dir, "pods", pod, "volumes", "kubernetes.io~csi", "v")
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, "mount")


async def publish(sup, cluster, fs_path: str, target: str, volume_id: str = "vol-paths"):
    return await sup.publish(
        volume_id=volume_id,
        cluster=cluster.master_addrs,
        fs_path=fs_path,
        subpath="v",
        target=target,
        readonly=False,
        secrets={"token": TOKEN},
    )


def wrong_bind(base, subpath, target, **flags):
    """A bind that produces some other mount than the volume's."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)


async def test_a_mount_gone_before_the_bind_fails_the_publish_with_eio(
    tmp_path, cluster, monkeypatch
):
    await make_dirs(cluster, "/paths-a/v")
    async with supervisor_in_process(tmp_path / "node") as sup:
        ensure = sup._ensure_daemon

        async def ensure_then_lose_the_mount(key, secrets):
            entry, started = await ensure(key, secrets)
            mounts.umount(entry.mountpoint, lazy=True)
            return entry, started

        monkeypatch.setattr(sup, "_ensure_daemon", ensure_then_lose_the_mount)
        target = target_of(sup, "pod-a")
        with pytest.raises(OSError) as info:
            await publish(sup, cluster, "/paths-a", target)
        assert info.value.errno == errno.EIO
        assert "is not a live fuse.fusecsi mount" in info.value.strerror, info.value
        assert not exists(target)  # nothing bound, not even the directory made
        assert sup.table.entries == {}  # the daemon started for it is released


async def test_a_bind_that_shows_another_mount_is_undone_and_fails_with_eio(
    tmp_path, cluster, monkeypatch
):
    await make_dirs(cluster, "/paths-b/v")
    async with supervisor_in_process(tmp_path / "node") as sup:
        monkeypatch.setattr(mounts, "bind_beneath", wrong_bind)
        target = target_of(sup, "pod-b")
        with pytest.raises(OSError) as info:
            await publish(sup, cluster, "/paths-b", target)
        assert info.value.errno == errno.EIO
        assert f"bind onto {target} did not produce the expected mount" in info.value.strerror
        assert mounts.stack_at(target) == []  # the wrong mount is gone again
        assert sup.table.entries == {}


async def test_a_failed_rebind_keeps_the_dead_mount_and_a_later_one_ends_the_outage(
    tmp_path, cluster, monkeypatch, caplog
):
    await make_dirs(cluster, "/paths-c/v")
    async with supervisor_in_process(tmp_path / "node") as sup:
        target = target_of(sup, "pod-c")
        await publish(sup, cluster, "/paths-c", target)
        assert read_write(target, "f", "across a failed re-bind")
        [entry] = sup.table.entries.values()
        rt = sup.key_states[entry.key.id]
        real_bind = mounts.bind_beneath
        monkeypatch.setattr(mounts, "bind_beneath", wrong_bind)
        os.kill(entry.pid, signal.SIGKILL)
        await eventually(lambda: target in rt.broken_targets, deadline=30, what="a failed re-bind")
        assert "did not produce the expected mount" in rt.broken_targets[target]
        # the first attempt already undid its wrong mount and said why: nothing went wrong
        # inside the clean-up itself
        errors = {r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR}
        assert errors == {"re-bind failed"}, caplog.text
        # only the wrong mount was undone: the target still shows the dead one, never the
        # empty local directory under it
        with pytest.raises(OSError) as info:
            os.listdir(target)
        assert info.value.errno == errno.ENOTCONN
        assert rt.cause in ("daemon_exited", "mount_broken") and rt.broken_since > 0  # goes on
        assert target in rt.told_broken

        monkeypatch.setattr(mounts, "bind_beneath", real_bind)
        await eventually(
            lambda: not rt.broken_targets and not sup.key_locks.busy(entry.key.id),
            deadline=30,
            what="a re-bind once binds work again",
        )
        assert read_text(os.path.join(target, "f")) == "across a failed re-bind"
        assert rt.cause == "" and rt.broken_since == 0.0  # the outage is over
        assert rt.told_broken == set()  # a next outage is told again
        await sup.unpublish("vol-paths", target)
        assert mounts.stack_at(target) == []


async def test_a_failed_restart_is_broken_with_its_reason_and_backs_off(
    tmp_path, cluster, monkeypatch
):
    await make_dirs(cluster, "/paths-d/v")
    async with supervisor_in_process(tmp_path / "node") as sup:
        target = target_of(sup, "pod-d")
        await publish(sup, cluster, "/paths-d", target)
        [entry] = sup.table.entries.values()
        rt = sup.key_states[entry.key.id]
        attempts = []

        async def failing_start(entry, secrets=None):
            attempts.append(entry.key.id)
            raise OSError(errno.EIO, "no daemon today")

        monkeypatch.setattr(sup, "_start_daemon", failing_start)
        os.kill(entry.pid, signal.SIGKILL)
        await eventually(lambda: attempts and rt.state == "broken", deadline=30, what="broken")
        assert rt.message.endswith("; restart failed: no daemon today"), rt.message
        assert rt.backoff >= 2.0  # the next attempt waits
        assert entry.restarts == 0  # nothing was re-bound on top of a failed restart
        assert target in rt.told_broken
        with pytest.raises(OSError) as info:
            os.listdir(target)
        assert info.value.errno == errno.ENOTCONN


async def test_a_publish_that_waited_while_its_target_was_rebound_binds_nothing_more(
    tmp_path, cluster
):
    """The target lost its mount; a repeated publish finds it unbound and waits for the key,
    which a re-bind holds: once it gets the key the target is served, and it stacks no
    second bind on it. (Health checks run only when woken here, so the test holds the key.)"""
    await make_dirs(cluster, "/paths-e/v")
    async with supervisor_in_process(tmp_path / "node", health_interval=3600) as sup:
        target = target_of(sup, "pod-e")
        first = await publish(sup, cluster, "/paths-e", target)
        [entry] = sup.table.entries.values()
        answers = []

        async def publish_again():
            answers.append(await publish(sup, cluster, "/paths-e", target))

        async with trio.open_nursery() as nursery:
            async with sup.key_locks.hold(entry.key.id):
                mounts.umount(target)  # from outside
                nursery.start_soon(publish_again)
                lock = sup.key_locks._slots[entry.key.id][0]
                await eventually(
                    lambda: lock.statistics().tasks_waiting == 1,
                    deadline=30,
                    what="the publish waiting for the key",
                )
                assert not await sup._rebind(entry, list(entry.refs.values()), "target_lost")
                assert len(mounts.stack_at(target)) == 1
        assert answers == [{**first, "daemon_started": False}]
        assert len(mounts.stack_at(target)) == 1  # not a second bind on top
        await sup.unpublish("vol-paths", target)
        assert mounts.stack_at(target) == []


async def test_a_failed_publish_leaves_the_daemon_that_serves_other_targets(tmp_path, cluster):
    await make_dirs(cluster, "/paths-f/v")
    async with supervisor_in_process(tmp_path / "node") as sup:
        served = target_of(sup, "pod-f1")
        await publish(sup, cluster, "/paths-f", served)
        assert read_write(served, "f", "still served")
        [entry] = sup.table.entries.values()
        pid = entry.pid
        other = target_of(sup, "pod-f2")
        with pytest.raises(OSError) as info:
            await sup.publish(
                volume_id="vol-f2",
                cluster=cluster.master_addrs,
                fs_path="/paths-f",
                subpath="missing",
                target=other,
                readonly=False,
                secrets={"token": TOKEN},
            )
        assert info.value.errno == errno.ENOENT
        assert "subpath 'missing' is missing under /paths-f" in info.value.strerror
        assert list(sup.table.entries.values()) == [entry] and entry.pid == pid
        assert sup.key_states[entry.key.id].state == "running"
        assert read_text(os.path.join(served, "f")) == "still served"
        await sup.unpublish("vol-paths", served)


def told(caplog, reason: str) -> list[str]:
    """Messages of the pod events of `reason` (logged: no Kubernetes API is configured)."""
    return [
        r.fields["message"]
        for r in caplog.records
        if getattr(r, "fields", {}).get("reason") == reason and "message" in r.fields
    ]


async def test_the_pod_is_told_of_each_recovery_and_of_a_reset_target(
    tmp_path, cluster, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(publishing, "MAX_LAYERS", 2)
    await make_dirs(cluster, "/paths-g/v")
    async with supervisor_in_process(tmp_path / "node") as sup:
        target = target_of(sup, "pod-g")
        await sup.publish(
            volume_id="vol-g",
            cluster=cluster.master_addrs,
            fs_path="/paths-g",
            subpath="v",
            target=target,
            readonly=False,
            secrets={"token": TOKEN},
            pod_namespace="ns",
            pod_name="pod-g",
        )
        [entry] = sup.table.entries.values()
        for restarts in (1, 2):
            os.kill(entry.pid, signal.SIGKILL)
            await eventually(
                lambda n=restarts: len(told(caplog, "MountRecovered")) == n,
                deadline=30,
                what=f"recovery {restarts} told",
            )
        first, second = told(caplog, "MountRecovered")
        start = f"the FUSE mount of volume vol-g at {target} broke ("
        assert first.startswith(start) and second.startswith(start)
        assert first.endswith("was restored; files opened before that must be reopened")
        assert second.endswith(
            "must be reopened; it was reset after 2 recoveries, so running containers keep "
            "the dead mount until they restart"
        )
        assert told(caplog, "MountBroken") == []  # both re-binds worked
        await sup.unpublish("vol-g", target)


async def cancelled_publish(sup, cluster, monkeypatch, step: str, target: str) -> None:
    """A read-only publish cancelled while `mounts.<step>` (done) waits in its thread."""
    entered, gate = threading.Event(), threading.Event()
    real = getattr(mounts, step)

    def held(*args, **flags):
        real(*args, **flags)
        entered.set()
        gate.wait(60)

    monkeypatch.setattr(mounts, step, held)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    sup.publish,
                    volume_id="vol-h",
                    cluster=cluster.master_addrs,
                    fs_path="/paths-h",
                    subpath="v",
                    target=target,
                    readonly=True,
                    secrets={"token": TOKEN},
                )
            )
            await eventually(entered.is_set, deadline=30, what=f"{step} entered")
            nursery.cancel_scope.cancel()
    finally:
        gate.set()
        monkeypatch.setattr(mounts, step, real)


async def test_a_publish_cancelled_after_its_bind_undoes_it_and_releases_its_daemon(
    tmp_path, cluster, monkeypatch
):
    """mountd shutting down cancels a publish: the clean-up still runs to its end (a bind
    left on the target, or a daemon nobody references, would outlive it unnoticed)."""
    await make_dirs(cluster, "/paths-h/v")
    async with supervisor_in_process(tmp_path / "node") as sup:
        target = target_of(sup, "pod-h")
        await cancelled_publish(sup, cluster, monkeypatch, "remount_readonly", target)
        assert mounts.stack_at(target) == []  # its bind was undone
        assert sup.table.entries == {}  # and the daemon released


async def test_a_publish_cancelled_during_its_bind_leaves_no_bind(tmp_path, cluster, monkeypatch):
    """The bind's thread cannot be stopped: when it completes after the publish gave up on
    it, it undoes its own bind, so nothing stays on the target owned by nobody."""
    await make_dirs(cluster, "/paths-h/v")
    async with supervisor_in_process(tmp_path / "node") as sup:
        target = target_of(sup, "pod-h")
        await cancelled_publish(sup, cluster, monkeypatch, "bind_beneath", target)
        assert sup.table.entries == {}
        await eventually(lambda: mounts.stack_at(target) == [], deadline=10, what="bind undone")


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_a_live_daemon_that_lost_its_mount_while_mountd_was_down_is_killed(mountd, cluster):
    """Not adoptable (its mount is gone) but still running: the restarted mountd kills it
    before it starts the replacement, so no orphan daemon stays connected to the cluster."""
    await make_dirs(cluster, "/paths-i/v")
    target = mountd.target("pod-i", "v")
    await mountd.publish("vol-i", "/paths-i", "v", target)
    assert read_write(target, "f", "orphan")
    [row] = await mountd.client.list()
    mountd.kill()
    mounts.umount(row["mountpoint"], lazy=True)
    assert not gone(row["pid"])
    mountd.start()

    async def replaced():
        [now] = await mountd.client.list()
        return now["state"] == "running" and now["pid"] not in (None, row["pid"])

    await eventually(replaced, deadline=30, what="replacement")
    await eventually(lambda: gone(row["pid"]), deadline=30, what="the old daemon killed")
    await eventually(
        lambda: read_text(os.path.join(target, "f")) == "orphan", deadline=30, what="re-bind"
    )
    await mountd.client.unpublish("vol-i", target)


async def test_a_bind_refused_with_another_errno_fails_the_publish_with_that_errno(
    tmp_path, cluster, monkeypatch
):
    await make_dirs(cluster, "/paths-j/v")
    async with supervisor_in_process(tmp_path / "node") as sup:

        def refused(base, subpath, target, **flags):
            raise OSError(errno.EPERM, "bind refused by a security module")

        monkeypatch.setattr(mounts, "bind_beneath", refused)
        target = target_of(sup, "pod-j")
        with pytest.raises(OSError) as info:
            await publish(sup, cluster, "/paths-j", target)
        assert info.value.errno == errno.EPERM
        assert info.value.strerror == "bind refused by a security module"
        assert not exists(target)  # the directory it made is removed again
        assert sup.table.entries == {}


async def test_a_repeated_publish_never_answers_ok_for_a_dead_daemon(tmp_path, cluster):
    """kubelet publishes again while the daemon is dead and its recovery has not run yet: the
    answer waits for a serving daemon (its key's lock), never OK on the dead mount."""
    await make_dirs(cluster, "/paths-r/v")
    async with supervisor_in_process(tmp_path / "node", takeover=False) as sup:
        target = target_of(sup, "pod-r")
        answer = await publish(sup, cluster, "/paths-r", target)
        rt = sup.key_states[answer["key"]]
        held, release = trio.Event(), trio.Event()

        async def hold_the_key_lock() -> None:  # recovery cannot run meanwhile
            async with sup.key_locks.hold(answer["key"]):
                held.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_the_key_lock)
            await held.wait()
            os.kill(rt.daemon.pid, signal.SIGKILL)
            await eventually(lambda: not rt.daemon.alive, deadline=10, what="the daemon seen dead")
            with trio.move_on_after(1) as waited:
                await publish(sup, cluster, "/paths-r", target)
            assert waited.cancelled_caught, "answered OK while the daemon was dead"
            release.set()
        await publish(sup, cluster, "/paths-r", target)  # served again once the lock is free
        assert read_write(target, "after", "served")
