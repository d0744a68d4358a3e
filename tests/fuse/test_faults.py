"""Faults under a live mount: master SIGKILL + restart, worker restart, a master that stays
away (EIO after io-timeout, the daemon lives on). Each test has its own cluster."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
from support.mounts import MiB, block


def test_master_killed_and_restarted_during_writes_loses_no_fsynced_data(own_cluster, own_mount):
    m = own_mount("io-timeout=60")
    acked = [0]  # bytes covered by a completed fsync
    failures: list[OSError] = []
    halfway = threading.Event()

    def writer() -> None:
        try:
            fd = os.open(m / "journal", os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                for i in range(48):
                    os.write(fd, block(i))
                    if i % 4 == 3:
                        os.fsync(fd)
                        acked[0] = (i + 1) * MiB
                    if i == 12:
                        halfway.set()
            finally:
                os.close(fd)
        except OSError as exc:  # allowed: only acknowledged data is promised
            failures.append(exc)
        finally:
            halfway.set()

    thread = threading.Thread(target=writer)
    thread.start()
    halfway.wait(60)
    own_cluster.kill_master()
    time.sleep(0.5)  # writes and fsyncs stall here
    own_cluster.restart_master()
    thread.join(120)
    assert not thread.is_alive()
    assert acked[0] >= 12 * MiB
    fresh = own_mount(name="fresh")  # a new daemon sees only what the cluster kept
    with open(fresh / "journal", "rb") as f:
        for i in range(acked[0] // MiB):
            assert f.read(MiB) == block(i), f"acknowledged block {i} lost ({failures})"
    # the first daemon reconnected: it still serves reads and writes
    assert m.proc.poll() is None
    (m / "after").write_bytes(block(99))
    assert (fresh / "after").read_bytes() == block(99)


def test_worker_restart_during_reads_and_writes(own_cluster, own_mount):
    m = own_mount("io-timeout=60")
    data = b"".join(block(i) for i in range(8))
    (m / "f").write_bytes(data)
    own_cluster.stop_worker(0)
    result: dict = {}

    def reader() -> None:
        try:
            result["data"] = (m / "f").read_bytes()
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(1)  # the read is waiting for the worker
    own_cluster.start_worker(0)
    thread.join(90)
    assert result.get("data") == data, result.get("error")
    (m / "g").write_bytes(data)  # writes work again too
    assert (m / "g").read_bytes() == data


def test_master_gone_fails_with_eio_and_daemon_survives(own_cluster, own_mount):
    m = own_mount("io-timeout=2,attr-timeout=0,entry-timeout=0")
    (m / "before").write_bytes(b"x")
    own_cluster.kill_master()
    with pytest.raises(OSError) as caught:
        os.stat(m / "never-seen")
    assert caught.value.errno == errno.EIO
    with pytest.raises(OSError) as caught:
        (m / "new").write_bytes(b"y")
    assert caught.value.errno == errno.EIO
    assert m.proc.poll() is None  # still serving
    own_cluster.restart_master()
    assert (m / "before").read_bytes() == b"x"
    (m / "after").write_bytes(b"z")
    assert (m / "after").read_bytes() == b"z"
