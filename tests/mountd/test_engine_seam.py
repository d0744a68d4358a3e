"""mountd through the engine seam, on the fake engine (tests/support/fake_engine.py): what any
engine gets from mountd, without a cluster — readiness by mountinfo, a daemon that fails or
never mounts, secrets kept only once they work, check() under the key lock, adoption after
a restart, and leftover clean-up that spares another driver's mounts of the same fstype."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from dataclasses import replace

import pytest
import trio
from support.fake_engine import FAKE, TOKEN, FakeNode, fake_cluster, fake_target, supervisor_on_fake

from fusecsi.engines.base import Launch
from fusecsi.mountd import mounts


async def publish(sup, cluster, target, *, volume_id="vol-1", subpath="v1", token=TOKEN):
    return await sup.publish(
        volume_id=volume_id,
        engine="fake",
        cluster=str(cluster),
        fs_path="/base",
        subpath=subpath,
        target=target,
        readonly=False,
        secrets={"token": token} if token else {},
    )


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class NeverMounts(FakeNode):
    """The fake, but its daemon lives on without ever mounting (readiness must time out)."""

    def launch(self, cluster, fs_path, options, mountpoint) -> Launch:
        code = "import signal; signal.pause()"
        return Launch(argv=[sys.executable, "-c", code, mountpoint], ready="mountinfo")


class ExitsAtOnce(FakeNode):
    def launch(self, cluster, fs_path, options, mountpoint) -> Launch:
        code = "print('cannot reach the metadata engine', flush=True); raise SystemExit(2)"
        return Launch(argv=[sys.executable, "-c", code, mountpoint], ready="mountinfo")


@pytest.mark.parametrize(
    ("engine", "code", "message"),
    [
        (NeverMounts(), errno.ETIMEDOUT, "did not become ready within 1s"),
        (ExitsAtOnce(), errno.EIO, "cannot reach the metadata engine"),
    ],
)
async def test_a_daemon_that_does_not_mount_fails_the_publish_and_leaves_nothing(
    tmp_path, engine, code, message
):
    with fake_cluster(tmp_path) as cluster:
        async with supervisor_on_fake(tmp_path, ready_timeout=1) as sup:
            sup.engines = lambda name: engine
            target = fake_target(sup)
            with trio.fail_after(15):
                with pytest.raises(OSError) as info:
                    await publish(sup, cluster, target)
            assert info.value.errno == code and message in info.value.strerror, info.value
            assert sup.table.entries == {}
            assert mounts.mounts_under(sup.state_dir) == []
            assert mounts.top_mount(target) is None


async def test_secrets_are_kept_as_a_file_and_a_digest_and_replaced_only_once_they_work(tmp_path):
    with fake_cluster(tmp_path) as cluster:
        async with supervisor_on_fake(tmp_path) as sup:
            first = await publish(sup, cluster, fake_target(sup))
            kept = os.path.join(sup.secrets_dir, first["key"])
            assert json.loads(read(kept)) == {"secrets": {"token": TOKEN}}
            assert os.stat(kept).st_mode & 0o777 == 0o600
            [entry] = sup.table.entries.values()
            digest = entry.secrets_digest
            assert digest and TOKEN.encode() not in read(sup.table.path)
            # a stale secret still binds (the daemon is up) but does not become the kept one
            await publish(sup, cluster, fake_target(sup), volume_id="vol-2", token="stale")
            assert entry.secrets_digest == digest
            assert json.loads(read(kept)) == {"secrets": {"token": TOKEN}}
            # a rotated secret that works replaces it, so a recovery starts with it
            (cluster / ".token").write_text("rotated")
            await publish(sup, cluster, fake_target(sup), volume_id="vol-3", token="rotated")
            assert entry.secrets_digest not in ("", digest)
            assert json.loads(read(kept)) == {"secrets": {"token": "rotated"}}
            assert b"rotated" not in read(sup.table.path)


async def test_check_diagnoses_only_under_the_key_lock(tmp_path, monkeypatch):
    with fake_cluster(tmp_path) as cluster:
        async with supervisor_on_fake(tmp_path, health_interval=3600) as sup:
            answer = await publish(sup, cluster, fake_target(sup))
            key = answer["key"]
            state = sup.key_states[key]
            diagnosed = []
            real = sup._diagnose

            async def diagnose(entry, key_state):
                diagnosed.append(sup.key_locks.busy(key))
                return await real(entry, key_state)

            monkeypatch.setattr(sup, "_diagnose", diagnose)
            os.kill(state.daemon.pid, signal.SIGKILL)
            with trio.fail_after(10):
                await state.daemon.exited.wait()
            async with sup.key_locks.hold(key):  # a publish or unpublish of the key
                await sup.check(key)
                assert diagnosed == [] and state.state == "running" and not state.broken_since
            await sup.check(key)
            assert diagnosed == [True]
            assert state.state == "running" and sup.table.entries[key].restarts == 1


async def test_a_restarted_mountd_adopts_the_daemon_and_spares_foreign_mounts(tmp_path):
    with fake_cluster(tmp_path) as cluster:
        async with supervisor_on_fake(tmp_path, kill_daemons=False) as sup:
            target = fake_target(sup)
            answer = await publish(sup, cluster, target)
            pid = sup.key_states[answer["key"]].daemon.pid
        # another driver's mount of the same fstype in the kubelet dir is not ours
        foreign = fake_target(sup, "foreign-pod")
        os.makedirs(foreign)
        await trio.run_process(["mount", "-t", "tmpfs", "tmpfs", foreign])
        # a bind of ours that the table lost (mountd died between bind and persist)
        orphan = fake_target(sup, "orphan-pod")
        os.makedirs(orphan)
        mounts.bind(os.path.join(sup.mounts_dir, answer["key"]), orphan)
        async with supervisor_on_fake(tmp_path) as again:
            state = again.key_states[answer["key"]]
            assert state.state == "running" and state.daemon.pid == pid
            assert mounts.top_mount(target).fstype == FAKE.fstype
            assert mounts.top_mount(foreign) is not None  # spared
            assert mounts.top_mount(orphan) is None  # removed
            await again.unpublish("vol-1", target)
            assert again.table.entries == {} and mounts.top_mount(target) is None


async def test_another_engine_with_the_same_address_is_another_daemon(tmp_path):
    twin = replace_name(FakeNode(), "fake-twin")
    with fake_cluster(tmp_path) as cluster:
        async with supervisor_on_fake(tmp_path) as sup:
            sup.engines = lambda name: twin if name == "fake-twin" else FAKE
            a = await publish(sup, cluster, fake_target(sup))
            b = await sup.publish(
                volume_id="vol-2",
                engine="fake-twin",
                cluster=str(cluster),
                fs_path="/base",
                subpath="v2",
                target=fake_target(sup),
                readonly=False,
                secrets={"token": TOKEN},
            )
            assert a["key"] != b["key"] and b["daemon_started"]
            assert sorted(row["engine"] for row in sup.list()) == ["fake", "fake-twin"]


def replace_name(engine: FakeNode, name: str) -> FakeNode:
    engine.name = name
    return engine


def test_launch_placeholders_are_the_only_substitutions():
    from fusecsi.mountd.daemons import fill

    values = {"private": "/p", "ready_fd": "7"}
    assert fill("{private}/token", values) == "/p/token"
    assert fill("--x={ready_fd}", values) == "--x=7"
    assert fill("{unknown} {}", values) == "{unknown} {}"  # braces of its own stay
    assert replace(Launch(argv=["a"]), ready="ready-fd").takeover_argv == []


def test_a_daemon_gets_a_minimal_environment_and_its_launch_env(monkeypatch):
    from fusecsi.mountd.daemons import daemon_env

    monkeypatch.setenv("FUSECSI_TOKEN", "mountd-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-daemons")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    env = daemon_env({"META_PASSWORD": "given"})
    assert "FUSECSI_TOKEN" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["PATH"] == os.environ["PATH"] and env["LC_ALL"] == "C.UTF-8"
    assert env["META_PASSWORD"] == "given"
