"""The write path never loses or invents acknowledged data (issue 14 items 1, 2, 6).

What write, fsync and close promise is in README.md ("Data path, caches and durability"):
an fsync'd byte is read back exactly; a failed write changes nothing visible; once data this
open file acknowledged could not be stored, every later fsync and the close report it; the
length published to the cluster never covers bytes that were not stored.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
from support.mounts import MiB, MountSet, block, mkdirs, run_cluster

from fusecsi.cluster.local import LocalCluster

LINES = 150
# The observer: stat, read and list the file as fast as it can, until its stdin closes.
OBSERVER = """
import os, select, sys
path = sys.argv[1]
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        os.stat(path)
        with open(path, "rb") as f:
            f.read()
        os.listdir(os.path.dirname(path))
    except FileNotFoundError:
        pass
"""


def _line(i: int) -> bytes:
    return b"line %05d %s\n" % (i, b"x" * (i % 37))


async def _read_path(client, path: str) -> bytes:
    attr = await client.resolve(path)
    return await client.read(attr.ino, 0, attr.size + 1)


def test_fsynced_appends_survive_a_concurrent_observer(mnt):
    """Item 1: a second process statting, reading and listing the file while one appends with
    O_APPEND + fsync must not make the kernel's size go backwards (a later line landing on an
    earlier one)."""
    path = mnt / "log"
    path.write_bytes(b"")
    observer = subprocess.Popen([sys.executable, "-c", OBSERVER, str(path)], stdin=subprocess.PIPE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(LINES):
                os.write(fd, _line(i))
                os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        observer.stdin.close()
        observer.wait(30)
    want = b"".join(_line(i) for i in range(LINES))
    assert path.read_bytes() == want
    got = run_cluster(_read_path, mnt.master_addrs, f"{mnt.fs_path}/log")
    assert got == want


# ---------------------------------------------------------------- a worker goes away


def _stored(cluster, name: str) -> bytes:
    return run_cluster(_read_path, cluster.master_addrs, f"/vol/{name}")


# Writes 1 MiB chunks (`block(i)`), fsync every EVERY chunks, says
# "writing" on stdout once 2 * EVERY chunks are written, and goes on after an error to see
# what later writes and fsyncs report; prints a JSON summary at the end. A process, not a
# thread: a process with a thread stuck in a FUSE write cannot spawn (the worker restart).
WRITER = """
import hashlib, json, os, sys
path, chunks, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"synced": 0, "errors": [], "after": [], "close": 0}
def call(what, fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        (out["after"] if out["errors"] else out["errors"]).append([what, exc.errno])
        return False
    if out["errors"]:
        out["after"].append([what, 0])
    return True
fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
for i in range(chunks):
    if i == 2 * every:
        print("writing", flush=True)
    call("write", os.write, fd, hashlib.sha256(b"%d" % i).digest() * (1 << 15))
    if i % every == every - 1 and call("fsync", os.fsync, fd) and not out["errors"]:
        out["synced"] = (i + 1) << 20
try:
    os.close(fd)
except OSError as exc:
    out["close"] = exc.errno
print(json.dumps(out), flush=True)
"""


def _write_through_a_fault(path, chunks: int, fault, every: int = 4) -> dict:
    """Run WRITER on `path`; call `fault()` once it is writing; its summary."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(chunks), str(every)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "writing\n"
        fault()
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return json.loads(out)


@pytest.mark.parametrize("short_circuit", ["1", "0"], ids=["short-circuit", "tcp"])
def test_worker_killed_and_back_within_io_timeout_loses_no_write(
    own_cluster, own_mount, short_circuit
):
    """Item 2a: the worker SIGKILLed and restarted a second later in the middle of a large
    write: every write, fsync and the close succeed and the data reads back exactly."""
    m = own_mount("io-timeout=60", env={**os.environ, "FUSECSI_SHORT_CIRCUIT": short_circuit})

    def restart() -> None:
        own_cluster.kill_worker(0)
        time.sleep(1)
        own_cluster.start_worker(0)

    result = _write_through_a_fault(m / "big", 48, restart)
    assert result["errors"] == [] and result["close"] == 0, result
    assert _stored(own_cluster, "big") == b"".join(block(i) for i in range(48))


def test_worker_away_past_io_timeout_fails_every_later_fsync_and_close(own_cluster, own_mount):
    """Items 2b and 2c: a worker away for longer than io-timeout loses writes that write()
    had accepted. From the first error on, no fsync (and not the close) reports success, and
    the length published never covers the bytes that were not stored (no zeros)."""
    m = own_mount("io-timeout=2")
    result = _write_through_a_fault(m / "big", 24, lambda: own_cluster.kill_worker(0))
    own_cluster.start_worker(0)
    assert result["errors"], "a write or fsync must fail"
    assert ["fsync", 0] not in result["after"], result
    assert result["close"] != 0, result
    stored = _stored(own_cluster, "big")
    want = b"".join(block(i) for i in range(24))
    assert len(stored) >= result["synced"]
    assert stored == want[: len(stored)], "bytes that were never written read back"


# ---------------------------------------------------------------- refused writes (item 6)


async def _set_quota(client, path, max_bytes):
    attr = await client.mkdirs(path)
    await client.set_quota(attr.ino, max_bytes, None)


def test_write_at_a_quota_keeps_the_bytes_that_fit(make_mount, fs_path, on_cluster):
    """The write() that crosses the quota is short (the bytes that fit), the next one fails
    with EDQUOT and changes nothing; fsync and close succeed and keep everything accepted."""
    on_cluster(_set_quota, fs_path + "/vol", 4 * MiB)
    mnt = make_mount(fs_path)
    path = mnt / "vol" / "f"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert os.write(fd, b"a" * (7 * MiB // 2)) == 7 * MiB // 2
        assert os.write(fd, b"b" * MiB) == MiB // 2
        with pytest.raises(OSError) as caught:
            os.write(fd, b"c" * 10)
        assert caught.value.errno == errno.EDQUOT
        assert os.fstat(fd).st_size == 4 * MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    want = b"a" * (7 * MiB // 2) + b"b" * (MiB // 2)
    assert path.read_bytes() == want
    assert on_cluster(_read_path, f"{fs_path}/vol/f") == want


def test_write_refused_for_space_changes_nothing(tmp_path):
    """ENOSPC (no worker has room for another block) fails the write() before it is taken:
    the file does not grow, and what was written before stays."""
    with LocalCluster(tmp_path / "c", workers=1, block_size=MiB, worker_capacity=4 * MiB) as c:
        run_cluster(mkdirs, c.master_addrs, "/vol")
        mounts = MountSet(c.master_addrs, tmp_path)
        try:
            m = mounts("/vol")
            fd = os.open(m / "f", os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                written = 0
                with pytest.raises(OSError) as caught:
                    for i in range(16):
                        os.write(fd, block(i))
                        written += MiB
                assert caught.value.errno == errno.ENOSPC
                assert os.fstat(fd).st_size == written
            finally:
                os.close(fd)
            want = b"".join(block(i) for i in range(written // MiB))
            assert (m / "f").read_bytes() == want
            assert _stored(c, "f") == want
        finally:
            mounts.close()


# ---------------------------------------------------------------- commits that fail (issue 23)


def test_fsync_fails_while_the_master_is_away_and_succeeds_once_it_is_back(own_cluster, own_mount):
    """A commit that fails is not a loss: the data is on the workers, the file stays dirty,
    and the next fsync publishes it."""
    m = own_mount("io-timeout=2")
    fd = os.open(m / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, block(0))
        own_cluster.kill_master()
        with pytest.raises(OSError) as caught:
            os.fsync(fd)
        assert caught.value.errno == errno.EIO
        own_cluster.restart_master()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert _stored(own_cluster, "f") == block(0)


def test_close_reports_a_write_lost_at_close(own_cluster, own_mount):
    """The master away at close: close() fails with EIO, the release gives up too, and the
    cluster keeps the file as the last fsync left it (nothing of the lost part reads back)."""
    m = own_mount("io-timeout=2")
    fd = os.open(m / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, block(0))
        os.fsync(fd)
        os.write(fd, block(1))
        own_cluster.kill_master()
    finally:
        with pytest.raises(OSError) as caught:
            os.close(fd)
    assert caught.value.errno == errno.EIO
    # the release that follows tries once more (a master back by then gets the length)
    deadline = time.monotonic() + 30
    while "write lost at close" not in m.log_text():
        assert time.monotonic() < deadline, m.log_text()
        time.sleep(0.05)
    own_cluster.restart_master()
    assert _stored(own_cluster, "f") == block(0)


def test_sigterm_commits_a_file_still_open(own_cluster, own_mount):
    """SIGTERM to the daemon while a process holds a written, never fsync'd file open: the
    daemon commits it before it exits."""
    m = own_mount()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys; fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644); "
            "os.write(fd, b'kept' * 1000); print('written', flush=True); sys.stdin.read()",
            str(m / "open"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "written\n"
        assert m.stop() == 0
    finally:
        holder.kill()
        holder.wait()
    assert _stored(own_cluster, "open") == b"kept" * 1000


# A reader: opens and reads the file as fast as it can (each open drops the kernel's cached
# pages, so every read reaches the daemon), until its stdin closes.
READER = """
import os, select, sys
while not select.select([sys.stdin], [], [], 0)[0]:
    fd = os.open(sys.argv[1], os.O_RDONLY)
    os.pread(fd, 4096, 0)
    os.close(fd)
"""


def test_a_read_racing_a_truncate_never_publishes_the_old_length(mnt):
    """A read commits the file's buffered writes first; a truncate by path at the same time
    must win: the length the cluster keeps is the truncated one, never the written one."""
    path = mnt / "cut"
    path.write_bytes(b"")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE)
    try:
        for round_ in range(40):
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, block(round_)[: MiB // 2], 0)  # buffered in the daemon
                os.truncate(path, 198)
                os.fsync(fd)
            finally:
                os.close(fd)
            assert os.stat(path).st_size == 198, f"round {round_}"
            with open(path, "rb") as f:
                assert f.read() == block(round_)[:198], f"round {round_}"
    finally:
        reader.stdin.close()
        reader.wait()
