"""Takeover: a replacement FUSE daemon serves the connection of a killed one, so processes
holding files open, a cwd or an mmap on the mount see no error (fusecsi/fuse/takeover.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from support import takeover_load

KILLS = int(os.environ.get("FUSECSI_TAKEOVER_KILLS", "5"))


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
    # a crash loses writes not yet fsync'd (reported, see the README); a handover none
    assert report["appender"]["lost"] <= (KILLS if sig == signal.SIGKILL else 0)
