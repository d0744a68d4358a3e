"""Real clusters (a master and workers as subprocesses on loopback) for the cluster tests."""

from __future__ import annotations

import itertools

import pytest

from fusecsi.cluster.client import ROOT_INO, ClusterClient
from fusecsi.cluster.local import LocalCluster

BLOCK = 1 << 20  # small blocks so tests cross block boundaries cheaply
_names = itertools.count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Master + two workers, 1 MiB blocks, one copy of each block."""
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=2, block_size=BLOCK) as c:
        yield c


@pytest.fixture
async def client(cluster):
    async with ClusterClient(cluster.master_addrs, timeout=20) as c:
        yield c


@pytest.fixture
async def top(client):
    """A fresh directory below the root for one test."""
    return await client.mkdir(ROOT_INO, b"t%d" % next(_names), 0o755, 0, 0)
