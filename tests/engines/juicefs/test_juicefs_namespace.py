"""The controller's JuiceFS namespace against a real filesystem (redis-server and SQLite
metadata, local-directory data, the real `juicefs` binary and its FUSE mount)."""

from __future__ import annotations

import errno
import os
import time

import pytest
import trio
from engines.juicefs.launching import Running

from fusecsi.engines import open_namespace
from fusecsi.engines.base import Unreachable
from fusecsi.engines.juicefs import NODE, privmount

MiB = 1024 * 1024
VOLUME = b"trusted.fusecsi.volume"
OWNER = b"trusted.fusecsi.owner"


async def test_tagged_create_is_idempotent_and_tags_read_back(any_fs):
    async with open_namespace(any_fs.cluster, timeout=20) as ns:
        await ns.mkdirs("/pvc/deep")
        await ns.mkdirs("/pvc/deep")  # an existing directory is fine
        quota = 10 * MiB + 12345  # not a round number: read back to the byte
        await ns.mkdir_tagged("/pvc/v1", 0o750, {VOLUME: b"vol-1", OWNER: b"pvc-a"}, quota)

        node = await ns.lookup("/pvc/v1")
        assert node is not None and node.is_dir and node.path == "/pvc/v1"
        assert await ns.lookup("/pvc/missing") is None
        assert await ns.get_tag("/pvc/v1", VOLUME) == b"vol-1"
        assert await ns.get_tag("/pvc/v1", OWNER) == b"pvc-a"
        assert await ns.get_tag("/pvc/v1", b"trusted.fusecsi.parent") is None
        assert await ns.get_quota("/pvc/v1") == quota
        assert await ns.get_quota("/pvc/deep") is None
        names = sorted((n.path, n.is_dir) for n in await ns.listdir("/pvc"))
        assert names == [("/pvc/deep", True), ("/pvc/v1", True)]
        assert sorted(n.path for n in await ns.listdir("/")) == ["/pvc"]  # internals hidden

        with pytest.raises(OSError) as taken:
            await ns.mkdir_tagged("/pvc/v1", 0o750, {VOLUME: b"other"}, None)
        assert taken.value.errno == errno.EEXIST
        assert await ns.get_tag("/pvc/v1", VOLUME) == b"vol-1"  # untouched

        await ns.set_tag("/pvc/v1", OWNER, b"pvc-b")
        assert await ns.get_tag("/pvc/v1", OWNER) == b"pvc-b"
        await ns.remove_tag("/pvc/v1", OWNER)
        await ns.remove_tag("/pvc/v1", OWNER)  # already gone: fine
        assert await ns.get_tag("/pvc/v1", OWNER) is None

        await ns.set_quota("/pvc/v1", 20 * MiB)
        assert await ns.get_quota("/pvc/v1") == 20 * MiB
        with pytest.raises(OSError) as missing:
            await ns.set_quota("/pvc/nope", MiB)
        assert missing.value.errno == errno.ENOENT
        with pytest.raises(OSError) as escape:
            await ns.lookup("/pvc/../etc")
        assert escape.value.errno == errno.EINVAL


async def test_quota_set_outside_fusecsi_reads_as_juicefs_shows_it(redis_fs):
    from fusecsi.engines.juicefs.local import juicefs

    async with open_namespace(redis_fs.cluster, timeout=20) as ns:
        await ns.mkdir_tagged("/v", 0o755, {VOLUME: b"v"}, 5 * MiB)
        env = {"META_PASSWORD": redis_fs.password}
        await trio.to_thread.run_sync(
            lambda: juicefs(
                "quota", "set", redis_fs.cluster.address, "--path", "/v", "--capacity=3G", env=env
            )
        )
        # our record says 5 MiB, JuiceFS enforces 3 GiB: JuiceFS wins
        assert await ns.get_quota("/v") == 3 * 1024 * MiB


def _size(path: str) -> int:
    return os.stat(path).st_size


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _put(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _write(path: str, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


async def test_writing_past_the_quota_fails_edquot(redis_fs, tmp_path):
    async with open_namespace(redis_fs.cluster, timeout=20) as ns:
        await ns.mkdir_tagged("/q", 0o777, {VOLUME: b"q"}, 8 * MiB)
    # through a node's mount (what pods write through), started after the quota was set:
    # a mount loads quotas when it starts (a running one learns a change within seconds,
    # which the controller's own long-lived mount did not always do within 40 s in CI)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    running = Running(NODE.launch(redis_fs.cluster, "/", {}, str(mnt)), tmp_path / "p", mnt)
    try:
        running.wait_ready(NODE.fstype)
        await trio.to_thread.run_sync(_write, f"{mnt}/q/small", 2 * MiB)  # within the quota
        failure = None
        deadline = time.monotonic() + 40
        while failure is None and time.monotonic() < deadline:
            try:
                await trio.to_thread.run_sync(_write, f"{mnt}/q/big", 16 * MiB)
            except OSError as exc:
                failure = exc
            else:
                os.unlink(f"{mnt}/q/big")
                await trio.sleep(1)
        assert failure is not None and failure.errno == errno.EDQUOT, failure
        assert _size(f"{mnt}/q/small") == 2 * MiB
    finally:
        running.stop()


async def test_rename_does_not_replace_and_trees_go(any_fs):
    async with open_namespace(any_fs.cluster, timeout=20) as ns:
        await ns.mkdirs("/a/inner")
        await ns.mkdirs("/b")
        root = ns._mount.root
        _put(f"{root}/a/inner/file", b"data")
        os.symlink("/", f"{root}/a/escape")  # remove_tree must not follow it

        with pytest.raises(OSError) as exists:
            await ns.rename("/a", "/b")
        assert exists.value.errno == errno.EEXIST
        assert await ns.lookup("/a") is not None

        await ns.rename("/a", "/archive-a")
        assert await ns.lookup("/a") is None
        assert (await ns.lookup("/archive-a/inner")).is_dir

        with pytest.raises(OSError) as busy:
            await ns.rmdir("/archive-a")
        assert busy.value.errno == errno.ENOTEMPTY
        await ns.remove_tree("/archive-a")
        assert await ns.lookup("/archive-a") is None
        assert _size("/etc/hostname") > 0  # the symlink's target is untouched
        await ns.rmdir("/b")
        assert await ns.listdir("/") == []
        await ns.sync()


async def test_capacity_is_the_volume_size_or_the_quota_above(any_fs, monkeypatch):
    monkeypatch.setattr(privmount, "IDLE_SECONDS", 0.0)  # each `async with`: a fresh mount
    async with open_namespace(any_fs.cluster, timeout=20) as ns:
        total = any_fs.capacity_gib * 1024 * MiB
        whole = await ns.capacity("/")
        assert total - MiB <= whole <= total
        await ns.mkdir_tagged("/limited", 0o755, {VOLUME: b"l"}, 64 * MiB)
        first = ns._mount
    for _ in range(100):
        if first.process is None:
            break
        await trio.sleep(0.05)
    # a mount started after the quota was set has it at once (a running one within seconds)
    async with open_namespace(any_fs.cluster, timeout=20) as ns:
        assert ns._mount is not first
        for _ in range(80):  # the mount learns the quota within seconds
            if await ns.capacity("/limited") <= 64 * MiB:
                break
            await trio.sleep(0.5)
        assert 60 * MiB <= await ns.capacity("/limited") <= 64 * MiB


async def test_unreachable_metadata_answers_within_the_deadline_and_recovers(redis_fs):
    redis_fs.stop_metadata()
    started = time.monotonic()
    with pytest.raises(Unreachable):
        async with open_namespace(redis_fs.cluster, timeout=3):
            pass
    assert time.monotonic() - started < 15  # the 3 s deadline, with slack for a busy CI machine

    redis_fs.start_metadata()
    async with open_namespace(redis_fs.cluster, timeout=20) as ns:
        await ns.mkdirs("/after")
        assert await ns.lookup("/after") is not None

        redis_fs.stop_metadata()  # an outage while the namespace is open
        ns.timeout = 3
        with pytest.raises(Unreachable):
            await ns.get_quota("/after")
        started = time.monotonic()
        with pytest.raises(Unreachable):
            await ns.mkdirs("/during")
        assert time.monotonic() - started < 15  # the 3 s deadline, with slack for a busy CI machine


async def test_wrong_password_is_one_line_eacces(redis_fs):
    from fusecsi.engines.juicefs import NODE

    wrong = dict(redis_fs.secrets)
    wrong["metaurl"] = wrong["metaurl"].replace(redis_fs.password, "wrong")
    cluster = NODE.parse_cluster(redis_fs.parameters, wrong)
    failure = await NODE.probe(cluster)
    assert failure is not None and failure.errno == errno.EACCES
    assert "wrong" not in str(failure) and "\n" not in str(failure)
    with pytest.raises(OSError) as refused:
        async with open_namespace(cluster, timeout=5):
            pass
    assert refused.value.errno == errno.EACCES


async def test_private_mount_is_shared_then_stopped_when_idle(redis_fs, monkeypatch):
    monkeypatch.setattr(privmount, "IDLE_SECONDS", 0.5)
    async with open_namespace(redis_fs.cluster, timeout=20) as one:
        async with open_namespace(redis_fs.cluster, timeout=20) as two:
            assert one._mount is two._mount  # one mount for both
            base = one._mount.base
            process = one._mount.process
    assert privmount.mounted_fstype(f"{base}/mnt") == "fuse.juicefs"
    for _ in range(100):
        if not _exists(base):
            break
        await trio.sleep(0.1)
    assert not _exists(base)
    assert privmount.mounted_fstype(f"{base}/mnt") is None
    assert process.returncode is not None


HOLDER = """
import sys, trio
from fusecsi.engines import open_namespace
from fusecsi.engines.base import Cluster

async def main():
    cluster = Cluster("juicefs", sys.argv[1], {"metaurl": sys.argv[2]})
    async with open_namespace(cluster, timeout=20) as ns:
        print(ns._mount.base, ns._mount.process.pid, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_killed_controller_leaves_no_mount_behind(redis_fs):
    import subprocess
    import sys

    holder = await trio.to_thread.run_sync(
        lambda: subprocess.Popen(
            [sys.executable, "-c", HOLDER, redis_fs.cluster.address, redis_fs.metaurl],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
    )
    try:
        line = await trio.to_thread.run_sync(holder.stdout.readline)
        base, pid = line.decode().split()
        assert privmount.mounted_fstype(f"{base}/mnt") == "fuse.juicefs"
    finally:
        holder.kill()
        holder.wait()
    for _ in range(100):  # the parent-death signal: JuiceFS unmounts and exits
        if privmount.mounted_fstype(f"{base}/mnt") is None and not _alive(int(pid)):
            break
        await trio.sleep(0.1)
    assert privmount.mounted_fstype(f"{base}/mnt") is None
    assert not _alive(int(pid))
    assert _exists(base)  # the killed controller could not remove it...
    async with open_namespace(redis_fs.cluster, timeout=20):
        assert not _exists(base)  # ...the next private mount sweeps it
