"""mountd's half of Curvine: cluster parameters, the option allow-list, the curvine-fuse
command line, the probe (on stand-in masters) and usage (on a local directory: what
usage() reads through a live mount is plain files and one xattr)."""

from __future__ import annotations

import errno
import os

import pytest

from fusecsi import engines
from fusecsi.engines.base import BadParameter, Cluster, Unreachable
from fusecsi.engines.curvine import node as curvine_node
from fusecsi.engines.curvine.namespace import QUOTA_XATTR

NODE = engines.node_engine("curvine")


def test_identity():
    assert (NODE.name, NODE.fstype, NODE.takeover) == ("curvine", "fuse.curvinefs", False)


def test_parse_cluster():
    cluster = NODE.parse_cluster({"master-addrs": "M2:8995, m1"}, {"token": "ignored"})
    assert cluster == Cluster("curvine", "m1:8995,m2:8995")
    assert dict(cluster.secrets) == {}  # Curvine has no authentication
    with pytest.raises(BadParameter):
        NODE.parse_cluster({}, {})
    with pytest.raises(BadParameter):
        NODE.parse_cluster({"master-addrs": "m1:99999"}, {})


def test_options_are_allow_listed_and_canonical():
    NODE.check_options({})
    NODE.check_options({"io-threads": "8", "direct-io": "TRUE", "meta-cache-ttl": "2m"})
    assert NODE.normalize_options({"direct-io": "yes", "io-threads": "08"}) == (
        "direct-io=true,io-threads=8"
    )
    assert NODE.normalize_options({"io-threads": "8", "direct-io": "1"}) == (
        NODE.normalize_options({"direct-io": "true", "io-threads": "8"})
    )
    for bad in (
        {"mnt-path": "/elsewhere"},
        {"master-addrs": "evil:1"},
        {"web-port": "1"},
        {"conf": "/etc/passwd"},
        {"io-threads": "0"},
        {"io-threads": "-1"},
        {"direct-io": "maybe"},
        {"meta-cache-ttl": "2 minutes"},
    ):
        with pytest.raises(BadParameter) as raised:
            NODE.check_options(bad)
        assert "\n" not in str(raised.value)


def test_launch_argv(monkeypatch, tmp_path):
    binary = tmp_path / "curvine-fuse"
    monkeypatch.setenv("FUSECSI_CURVINE_FUSE", str(binary))
    cluster = Cluster("curvine", "m1:8995,m2:8995")
    launch = NODE.launch(
        cluster, "/base", {"readonly": "true", "io-threads": "4"}, "/var/lib/fusecsi/mnt/k1"
    )
    assert launch.argv == [
        str(binary),
        "--conf",
        "{private}/curvine-cluster.toml",
        "--master-addrs",
        "m1:8995,m2:8995",
        "--fs-path",
        "/base",
        "--mnt-path",
        "/var/lib/fusecsi/mnt/k1",
        "--io-threads",
        "4",
        "--readonly",
    ]
    assert set(launch.files) == {"curvine-cluster.toml"}
    assert b"[fuse]" in launch.files["curvine-cluster.toml"]
    assert launch.ready == "mountinfo" and launch.env == {}
    off = NODE.launch(cluster, "/base", {"readonly": "false"}, "/m")
    assert "--readonly" not in off.argv


def test_launch_finds_the_binary_on_path_or_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSECSI_CURVINE_FUSE", raising=False)
    monkeypatch.setattr(curvine_node, "BINARY_IMAGE_PATH", str(tmp_path / "absent"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(OSError) as raised:
        NODE.launch(Cluster("curvine", "m:8995"), "/", {}, "/m")
    assert raised.value.errno == errno.ENOENT
    assert "FUSECSI_CURVINE_FUSE" in str(raised.value)
    binary = tmp_path / "curvine-fuse"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert NODE.launch(Cluster("curvine", "m:8995"), "/", {}, "/m").argv[0] == str(binary)


async def test_probe(master):
    assert await NODE.probe(Cluster("curvine", master.address)) is None
    master.leader = False
    curvine_node.PROBE_TIMEOUT, saved = 0.3, curvine_node.PROBE_TIMEOUT
    try:
        failure = await NODE.probe(Cluster("curvine", master.address))
    finally:
        curvine_node.PROBE_TIMEOUT = saved
    assert isinstance(failure, Unreachable)
    assert "not the leader" in str(failure)


def test_usage_counts_files_and_reads_the_recorded_size(tmp_path):
    volume = tmp_path / "pvc-1"
    (volume / "sub").mkdir(parents=True)
    (volume / "a").write_bytes(b"x" * 1000)
    (volume / "sub" / "b").write_bytes(b"y" * 24)
    os.symlink("/etc/passwd", volume / "link")  # not followed
    usage = NODE.usage(str(volume))
    assert (usage.used_bytes, usage.total_bytes, usage.used_inodes) == (1024, None, 4)
    os.setxattr(volume, QUOTA_XATTR, b"1073741824")
    assert NODE.usage(str(volume)).total_bytes == 1 << 30


def test_usage_of_a_huge_volume_is_unknown_not_wrong(tmp_path, monkeypatch):
    for n in range(6):
        (tmp_path / str(n)).write_bytes(b"z")
    monkeypatch.setattr(curvine_node, "USAGE_ENTRY_LIMIT", 5)
    with pytest.raises(OSError) as raised:
        NODE.usage(str(tmp_path))
    assert raised.value.errno == errno.ENODATA
