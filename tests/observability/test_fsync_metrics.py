"""fsync and fsyncdir through a mount reach the disks: the workers' `sync_blocks` and the
master's `sync_journal` counters show it (real cluster, real FUSE mount). Mutations are
acknowledged once journaled (not yet synced), so without these calls an fsync'd file could
be lost to a power cut although it survived every process crash."""

from __future__ import annotations

import os

import pytest
from support.metrics import metered_cluster, sample, scrape
from support.mounts import MountSet, mkdirs, run_cluster

MASTER, WORKER = "fusecsi_master_rpcs_total", "fusecsi_worker_rpcs_total"


@pytest.fixture
def metered(tmp_path):
    with metered_cluster(tmp_path / "cluster") as cluster:
        run_cluster(mkdirs, cluster.master_addrs, "/vol")
        mounts = MountSet(cluster.master_addrs, tmp_path)
        try:
            mnt = mounts("/vol")
            yield mnt, lambda: (scrape(cluster.metrics_port), scrape(cluster.worker_metrics_port))
        finally:
            mounts.close()


def counts(scrapes) -> tuple[float, float]:
    master, worker = scrapes
    return (
        sample(master, MASTER, method="sync_journal", code="OK"),
        sample(worker, WORKER, method="sync_blocks", code="OK"),
    )


def test_fsync_syncs_blocks_and_journal(metered):
    mnt, metrics = metered
    journal, blocks = counts(metrics())
    fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x" * (1 << 20))
        os.fsync(fd)
        assert counts(metrics()) == (journal + 1, blocks + 1)
        os.fsync(fd)  # nothing new: the journal is asked again, no block is
        assert counts(metrics()) == (journal + 2, blocks + 1)
        os.write(fd, b"y")
    finally:
        os.close(fd)  # a close commits without syncing
    assert counts(metrics()) == (journal + 2, blocks + 1)
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        os.fsync(fd)  # the bytes written before that close reach the disk now
    finally:
        os.close(fd)
    assert counts(metrics()) == (journal + 3, blocks + 2)


def test_fsyncdir_syncs_the_journal(metered):
    mnt, metrics = metered
    journal, blocks = counts(metrics())
    (mnt / "d").mkdir()
    fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert counts(metrics()) == (journal + 1, blocks)
