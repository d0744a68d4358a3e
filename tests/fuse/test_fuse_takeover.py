"""Takeover: a replacement FUSE daemon serves the connection of a killed one, so processes
holding files open, a cwd or an mmap on the mount see no error (fusecsi/fuse/takeover.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fsactor import ActorProcess, pack
from support import takeover_load

from fusecsi.fuse.operations import ORPHANS

KILLS = int(os.environ.get("FUSECSI_TAKEOVER_KILLS", "5"))
ACTOR = Path(__file__).with_name("fsactor.py")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "upgraded"])
def test_open_files_cwd_and_mmap_survive_a_replaced_daemon(make_mount, fs_path, tmp_path, sig):
    """SIGKILL: a crash. SIGTERM: an upgrade, the old daemon commits and leaves the rest."""
    mount = make_mount(fs_path, kept=True)
    (mount / "work").mkdir()
    load = takeover_load.start(mount / "work", tmp_path / "report.json")
    try:
        for _ in range(KILLS):
            time.sleep(0.5)
            mount.replace(sig)
        time.sleep(0.5)
    finally:
        report = takeover_load.finish(load, tmp_path / "report.json")
    print(takeover_load.summary(report))
    for name, worker in report.items():
        assert worker["errors"] == [], name
        assert worker["calls"] > KILLS, name
    # writes acknowledged and not yet fsync'd are journaled: neither a crash nor a handover
    # loses one (fusecsi/fuse/spool.py)
    assert report["appender"]["lost"] == 0


async def _orphans(client, fs_path: str) -> list[bytes] | None:
    try:
        attr = await client.resolve(f"{fs_path}/{ORPHANS.decode()}")
    except OSError:
        return None
    return [name for name, _, _ in await client.readdir(attr.ino, 0, 100)]


def test_an_orphan_held_open_survives_takeovers(make_mount, fs_path, on_cluster):
    """A file unlinked while open: the replacement daemon reads and writes it through the
    held descriptor (written bytes not fsync'd included), shows it unlinked, and removes it
    at its last close."""
    mount = make_mount(fs_path, kept=True)
    actor = ActorProcess(mount.path, 60)
    try:
        fd = actor("open", "f", "rw")["ok"]
        assert actor("write", fd, pack(b"a" * 5000)) == {"ok": 5000}
        assert actor("fsync", fd) == {"ok": None}
        assert actor("write", fd, pack(b"b" * 100)) == {"ok": 100}  # only journaled
        assert actor("unlink", "f") == {"ok": None}
        mount.replace(signal.SIGKILL)
        assert actor("pread", fd, 0, 10_000) == {"ok": pack(b"a" * 5000 + b"b" * 100)}
        assert actor("pwrite", fd, 6000, pack(b"c" * 10)) == {"ok": 10}
        assert actor("fstat", fd) == {"ok": [6010, 0]}
        mount.replace(signal.SIGKILL)  # the orphan is still known to the next one
        want = b"a" * 5000 + b"b" * 100 + b"\0" * 900 + b"c" * 10
        assert actor("pread", fd, 0, 10_000) == {"ok": pack(want)}
        assert actor("fstat", fd) == {"ok": [6010, 0]}
        assert len(on_cluster(_orphans, fs_path)) == 1
        assert actor("listdir", ".") == {"ok": []}
        assert actor("close", fd) == {"ok": None}
    finally:
        actor.close()
    assert on_cluster(_orphans, fs_path) == []


def test_writes_the_journal_cannot_hold_are_committed_before_they_are_acknowledged(
    make_mount, fs_path, tmp_path
):
    """The connection's directory fills up (a 160 KiB tmpfs: the handles file takes 64): each
    write then commits before its reply, so a takeover still loses none; the journal is
    emptied at the last close."""
    conn = tmp_path / "mnt0.conn"  # KeptMount's connection directory
    conn.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k,mode=700", "tmpfs", conn], check=True)
    actor = None
    try:
        mount = make_mount(fs_path, kept=True, name="mnt0")
        actor = ActorProcess(mount.path, 60)
        fd = actor("open", "f", "w")["ok"]
        records = [b"%04095d\n" % i for i in range(300)]  # 4 KiB each, 1.2 MiB in all
        for record in records:
            assert actor("write", fd, pack(record)) == {"ok": len(record)}
        mount.replace(signal.SIGKILL)
        assert "write journal failed" in mount.log_text()
        assert actor("fsync", fd) == {"ok": None}
        assert actor("close", fd) == {"ok": None}
        assert actor("read", "f") == {"ok": pack(b"".join(records))}
        assert os.listdir(conn / "spool") == []
    finally:
        if actor is not None:
            actor.close()
        subprocess.run(["umount", "-l", conn], check=False)
