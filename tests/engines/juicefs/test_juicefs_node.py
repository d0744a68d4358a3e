"""mountd's half of JuiceFS against a real filesystem: the Launch is run as mountd runs it
(real `juicefs mount`, real FUSE), data goes through it, it is SIGKILLed and started again."""

from __future__ import annotations

import errno
import os
import time

import pytest
import trio
from engines.juicefs.launching import Running, detach

from fusecsi.engines import open_namespace
from fusecsi.engines.base import BadParameter
from fusecsi.engines.juicefs import NODE

MiB = 1024 * 1024
VOLUME = b"trusted.fusecsi.volume"


def make_volumes(cluster, *specs: tuple[str, int]) -> None:
    async def make() -> None:
        async with open_namespace(cluster, timeout=30) as ns:
            await ns.mkdirs("/pvc")
            for path, quota in specs:
                await ns.mkdir_tagged(path, 0o777, {VOLUME: path.encode()}, quota)

    trio.run(make)


def test_launch_serves_fs_path_and_survives_sigkill(redis_fs, tmp_path):
    cluster = redis_fs.cluster
    assert redis_fs.password not in cluster.address
    make_volumes(cluster, ("/pvc/v1", 32 * MiB), ("/pvc/v2", 64 * MiB))

    mnt = tmp_path / "key-mount"
    mnt.mkdir()
    launch = NODE.launch(cluster, "/pvc", {"cache-size": "64", "writeback": "false"}, str(mnt))
    assert launch.ready == "mountinfo" and NODE.takeover and NODE.fd_passing
    # served a kept connection only through mountd's descriptor socket (fdpass.py)
    assert launch.env["_FUSE_FD_COMM"] == "{connection}/fd.sock"
    assert launch.env["_FUSE_STATE_PATH"] == "{connection}/state.json"
    assert not any(redis_fs.password in arg for arg in launch.argv)
    assert "--subdir=/pvc" in launch.argv and "--cache-size=64" in launch.argv
    assert "--writeback" not in launch.argv

    running = Running(launch, tmp_path / "private", mnt)
    try:
        running.wait_ready(NODE.fstype)
        cmdline = open(f"/proc/{running.proc.pid}/cmdline", "rb").read()
        assert redis_fs.password.encode() not in cmdline
        assert sorted(os.listdir(mnt)) == ["v1", "v2"]  # the fs-path subtree only

        one, two = os.urandom(4 * MiB), os.urandom(MiB)
        (mnt / "v1" / "data").write_bytes(one)
        (mnt / "v2" / "data").write_bytes(two)
        assert (mnt / "v1" / "data").read_bytes() == one
        assert (mnt / "v2" / "data").read_bytes() == two

        # usage: the volume's quota and what it holds (the mount learns quotas within seconds)
        deadline = time.monotonic() + 40
        usage = NODE.usage(str(mnt / "v1"))
        while (usage.total_bytes, usage.used_bytes >= 4 * MiB) != (32 * MiB, True):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
            usage = NODE.usage(str(mnt / "v1"))
        assert usage.total_bytes == 32 * MiB
        assert 4 * MiB <= usage.used_bytes <= 5 * MiB
        assert usage.used_inodes is not None and usage.used_inodes >= 1

        running.kill()  # the engine's FUSE process dies: the mount with it
        with pytest.raises(OSError) as dead:
            os.stat(mnt / "v1" / "data")
        assert dead.value.errno == errno.ENOTCONN
        detach(mnt)

        running = Running(launch, tmp_path / "private", mnt)
        running.wait_ready(NODE.fstype)
        assert (mnt / "v1" / "data").read_bytes() == one
        assert (mnt / "v2" / "data").read_bytes() == two
    finally:
        running.stop()
    assert not os.path.ismount(mnt)


def test_two_volume_usages_are_their_own(redis_fs, tmp_path):
    make_volumes(redis_fs.cluster, ("/pvc/a", 16 * MiB), ("/pvc/b", 48 * MiB))
    mnt = tmp_path / "m"
    mnt.mkdir()
    running = Running(NODE.launch(redis_fs.cluster, "/pvc", {}, str(mnt)), tmp_path / "p", mnt)
    try:
        running.wait_ready(NODE.fstype)
        (mnt / "b" / "f").write_bytes(os.urandom(2 * MiB))
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            a, b = NODE.usage(str(mnt / "a")), NODE.usage(str(mnt / "b"))
            if (a.total_bytes, b.total_bytes) == (16 * MiB, 48 * MiB) and b.used_bytes:
                break
            time.sleep(0.5)
        assert (a.total_bytes, b.total_bytes) == (16 * MiB, 48 * MiB)
        assert a.used_bytes < MiB <= 2 * MiB <= b.used_bytes
    finally:
        running.stop()


def test_options_outside_the_allow_list_are_one_line_errors():
    for bad in (
        {"subdir": "/etc"},
        {"cache-dir": "/"},
        {"cache-size": "64 --subdir=/"},
        {"attr-cache": "-1"},
        {"atime-mode": "sometimes"},
        {"writeback": "perhaps"},
    ):
        with pytest.raises(BadParameter) as refused:
            NODE.check_options(bad)
        message = str(refused.value)
        assert "\n" not in message and next(iter(bad)) in message
    NODE.check_options({"writeback": "true", "attr-cache": "2s", "prefetch": "3"})


def test_the_metadata_url_comes_only_from_the_secret():
    secret = {"metaurl": "redis://:s3cr%40t@redis.example:6379/1"}
    cluster = NODE.parse_cluster({"engine": "juicefs"}, secret)
    assert cluster.engine == "juicefs" and cluster.address == "redis://redis.example:6379/1"
    assert "s3cr" not in repr(cluster)
    launch = NODE.launch(cluster, "/", {}, "/mnt/x")
    assert launch.env["META_PASSWORD"] == "s3cr@t"  # percent-decoded, only in env
    assert not any("s3cr" in arg for arg in launch.argv)
    assert not any(arg.startswith("--subdir") for arg in launch.argv)  # "/": whole volume
    with pytest.raises(BadParameter, match="secret"):
        NODE.parse_cluster({"metaurl": secret["metaurl"]}, secret)
    with pytest.raises(BadParameter, match="metaurl"):
        NODE.parse_cluster({}, {})
    with pytest.raises(BadParameter):
        NODE.parse_cluster({}, {"metaurl": "not a url"})


async def test_probe_answers_and_then_names_the_outage(redis_fs):
    assert await NODE.probe(redis_fs.cluster) is None
    redis_fs.stop_metadata()
    with trio.fail_after(5):
        failure = await NODE.probe(redis_fs.cluster)
    assert failure is not None and failure.errno in (errno.ECONNREFUSED, errno.ETIMEDOUT)
    assert redis_fs.password not in str(failure)


async def test_probe_of_sqlite(tmp_path):
    from fusecsi.engines.juicefs.local import sqlite_backend

    with sqlite_backend(tmp_path) as fs:
        assert await NODE.probe(fs.cluster) is None
    gone = NODE.parse_cluster({}, {"metaurl": f"sqlite3://{tmp_path}/missing.db"})
    failure = await NODE.probe(gone)
    assert failure is not None and failure.errno == errno.ENOENT
