"""The SeaweedFS NodeEngine: its Launch run the way mountd runs one, against a real cluster,
through a real `weed mount` (FUSE)."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio
from support import launching

from fusecsi import engines
from fusecsi.engines.base import BadParameter, Launch

NODE = engines.node_engine("seaweedfs")
VOLUME = b"trusted.fusecsi.volume"
MiB = 1 << 20
WEED_SOCKETS = "/tmp/seaweedfs-mount-*.sock"


def mounted_fstype(mountpoint: str) -> str | None:
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields, _, rest = line.partition(" - ")
            point = fields.split()[4].encode().decode("unicode_escape")
            if point == mountpoint:
                return rest.split()[0]
    return None


@contextlib.contextmanager
def running(launch: Launch, private: Path, log: Path):
    """Start `launch` as base.Launch describes (files 0600 in the private directory,
    `{private}` substituted, env over a minimal environment, its own session); kill its
    process group and detach its mount on the way out."""
    sockets_before = set(glob.glob(WEED_SOCKETS))
    proc = launching.start(launch, private, log)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # weed leaves its control socket behind (one per mountpoint, reused by the next
        # weed mount there); tests use a new mountpoint each time, so take theirs away
        for path in set(glob.glob(WEED_SOCKETS)) - sockets_before:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def wait_ready(mountpoint: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"weed mount exited {proc.returncode}: {log.read_text()[-2000:]}")
        if mounted_fstype(mountpoint) == NODE.fstype:
            with contextlib.suppress(OSError):
                os.statvfs(mountpoint)
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no {NODE.fstype} at {mountpoint}: {log.read_text()[-2000:]}")
        time.sleep(0.01)


def detach(mountpoint: str) -> None:
    if mounted_fstype(mountpoint) is not None:
        subprocess.run(["umount", "-l", mountpoint], check=True)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def test_mount_serves_volumes_and_comes_back_after_sigkill(backend, tmp_path):
    cluster = NODE.parse_cluster(backend.parameters, backend.secrets)
    fs_path = f"/node-{os.getpid()}"

    async def prepare() -> None:
        async with engines.open_namespace(cluster, timeout=10) as ns:
            await ns.mkdirs(fs_path)
            for name in ("v1", "v2"):
                await ns.mkdir_tagged(f"{fs_path}/{name}", 0o755, {VOLUME: name.encode()}, MiB)

    trio.run(prepare)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    log = tmp_path / "weed-mount.log"
    launch = NODE.launch(cluster, fs_path, {"cacheMetaTtlSec": "5"}, str(mnt))
    assert launch.ready == "mountinfo" and NODE.takeover is False
    v1, v2 = mnt / "v1", mnt / "v2"
    big = os.urandom(MiB)
    try:
        with running(launch, private, log) as proc:
            first_ready = wait_ready(str(mnt), proc, log)
            assert (private / "cache").is_dir()  # per-key cache stays private

            (v1 / "small").write_bytes(b"one")
            (v2 / "small").write_bytes(b"two-two")
            os.makedirs(v1 / "sub/dir")
            started = time.monotonic()
            with open(v1 / "sub/dir/big", "wb") as f:
                for _ in range(64):
                    f.write(big)
                f.flush()
                os.fsync(f.fileno())
            write_mbps = 64 / (time.monotonic() - started)
            written = digest(v1 / "sub/dir/big")

            assert (v1 / "small").read_bytes() == b"one"
            assert (v2 / "small").read_bytes() == b"two-two"
            assert sorted(os.listdir(v2)) == ["small"]  # volumes are separate directories

            usage = NODE.usage(str(v1))
            assert (usage.used_bytes, usage.total_bytes) == (3 + 64 * MiB, None)
            assert usage.used_inodes == 5  # v1, small, sub, dir, big
            assert NODE.usage(str(v2)).used_bytes == 7
            # the controller's tags are filer attributes the mount does not show
            assert not [x for x in os.listxattr(v1) if "fusecsi" in x]

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            with pytest.raises(OSError) as dead:
                os.stat(v1)
            assert dead.value.errno == errno.ENOTCONN
            detach(str(mnt))  # what mountd does before it starts the key's daemon again

        with running(launch, private, log) as proc:
            second_ready = wait_ready(str(mnt), proc, log)
            started = time.monotonic()
            assert digest(v1 / "sub/dir/big") == written  # read cold, through the new mount
            read_mbps = 64 / (time.monotonic() - started)
            assert (v2 / "small").read_bytes() == b"two-two"
            print(
                f"\nseaweedfs: launch->ready {first_ready * 1000:.0f} ms, after SIGKILL "
                f"{second_ready * 1000:.0f} ms; 64 MiB sequential write {write_mbps:.0f} MB/s, "
                f"cold read {read_mbps:.0f} MB/s"
            )
    finally:
        detach(str(mnt))


def test_read_only_option_reaches_the_mount(backend, tmp_path):
    cluster = NODE.parse_cluster(backend.parameters, backend.secrets)
    fs_path = f"/ro-{os.getpid()}"

    async def prepare() -> None:
        async with engines.open_namespace(cluster, timeout=10) as ns:
            await ns.mkdirs(fs_path + "/v")

    trio.run(prepare)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    log = tmp_path / "weed-mount.log"
    launch = NODE.launch(cluster, fs_path, {"readOnly": "true"}, str(mnt))
    try:
        with running(launch, private, log) as proc:
            wait_ready(str(mnt), proc, log)
            assert os.listdir(mnt) == ["v"]
            with pytest.raises(OSError) as refused:
                (mnt / "v" / "f").write_bytes(b"x")
            assert refused.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
    finally:
        detach(str(mnt))


def test_cluster_and_options_are_checked_in_one_line():
    cluster = NODE.parse_cluster(
        {"filer-addrs": "f1:8888, f2:8888.18888", "master-addrs": "m:9333"},
        {"jwt-filer-signing-key": "s3cret", "unrelated": "x"},
    )
    assert cluster.address == "f1:8888,f2:8888.18888"  # the filers name the cluster
    assert dict(cluster.secrets) == {"jwt-filer-signing-key": "s3cret", "master-addrs": "m:9333"}
    launch = NODE.launch(cluster, "/a/b", {"cacheCapacityMB": "64", "readOnly": "yes"}, "/m")
    assert "-filer=f1:8888,f2:8888.18888" in launch.argv
    assert "-filer.path=/a/b" in launch.argv and "-dir=/m" in launch.argv
    assert "-cacheCapacityMB=64" in launch.argv and "-readOnly=true" in launch.argv
    assert not any("s3cret" in arg for arg in launch.argv) and not launch.env
    assert "s3cret" not in repr(cluster)

    for parameters in ({}, {"filer-addrs": "nohost"}, {"filer-addrs": "h:99999"},
                       {"filer-addrs": "h:1", "master-addrs": "h:1;rm -rf"}):  # fmt: skip
        with pytest.raises(BadParameter) as bad:
            NODE.parse_cluster(parameters, {})
        assert "\n" not in str(bad.value)
    for options in ({"dir": "/etc"}, {"filer.path": "/"}, {"debug": "true"},
                    {"cacheCapacityMB": "lots"}, {"readOnly": "maybe"}, {"umask": "999"}):  # fmt: skip
        with pytest.raises(BadParameter) as bad:
            NODE.check_options(options)
        assert "\n" not in str(bad.value) and "seaweedfs" in str(bad.value)
    NODE.check_options({"writebackCache": "false", "replication": "001", "collection": "k8s"})
    assert NODE.normalize_options({"readOnly": "yes", "cacheCapacityMB": "064"}) == (
        "cacheCapacityMB=64,readOnly=true"
    )
    with pytest.raises(OSError):
        NODE.launch(cluster, "/a/../etc", {}, "/m")


def test_usage_gives_up_rather_than_run_into_mountds_deadline(tmp_path, monkeypatch):
    from fusecsi.engines.seaweedfs import node as node_module

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"12345")
    assert NODE.usage(str(tmp_path)).used_bytes == 5  # any directory walks the same
    monkeypatch.setattr(node_module, "USAGE_WALK_SECONDS", -1.0)
    with pytest.raises(OSError) as unknown:
        NODE.usage(str(tmp_path))
    assert unknown.value.errno == errno.ENODATA  # mountd: statfs only, still healthy
