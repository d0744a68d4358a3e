"""Real mounts over a real cluster: LocalCluster (master + workers as subprocesses on
loopback) and `fusecsi mount` daemons as subprocesses. Every mount is torn down in the
fixture, lazily unmounted if the daemon left anything behind."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from support.mounts import Mount, MountSet, cleanup_mount, mkdirs, run_cluster

from fusecsi.cluster.local import LocalCluster

_names = itertools.count()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=1) as running:
        yield running


@pytest.fixture
def on_cluster(cluster):
    """`on_cluster(fn, *args)` runs `await fn(client, *args)` against the test cluster."""
    return lambda fn, *args: run_cluster(fn, cluster.master_addrs, *args)


@pytest.fixture
def fs_path(cluster) -> str:
    """A fresh directory on the cluster for one test."""
    path = f"/t/{os.getpid()}-{next(_names)}"
    run_cluster(mkdirs, cluster.master_addrs, path)
    return path


@pytest.fixture
def make_mount(cluster, tmp_path):
    mounts = MountSet(cluster.master_addrs, tmp_path)
    try:
        yield mounts
    finally:
        mounts.close()


@pytest.fixture
def public_dir():
    """A directory every user can reach (pytest's own temp tree is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="fusecsi-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        cleanup_mount(path / "mnt")
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["", "writeback-cache=true"], ids=["default", "writeback"])
def mnt(request, make_mount, fs_path) -> Mount:
    """A mount of a fresh cluster directory, with and without the kernel writeback cache."""
    return make_mount(fs_path, request.param)


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of the test's own (one worker), for tests that inject faults."""
    with LocalCluster(tmp_path / "cluster", workers=1) as cluster:
        yield cluster


@pytest.fixture
def own_mount(own_cluster, tmp_path):
    """`own_mount(options, name, env)` mounts /vol of the test's own cluster."""
    mounts = MountSet(own_cluster.master_addrs, tmp_path)
    run_cluster(mkdirs, own_cluster.master_addrs, "/vol")
    try:
        yield lambda options="", name="m", env=None: mounts("/vol", options, name, env=env)
    finally:
        mounts.close()
